"""MultiDelta: several LoRA checkpoints served on one backbone, one delta per sequence.

The yardstick is the ordinary single-delta path: each sequence run alone with its own delta
attached by ``AutoDeltaModel.from_finetuned`` (the backbone alone for base rows). Deltas differ in
rank, alpha (and rsLoRA) and target modules, so banks mix ranks and some modules carry only some
deltas.
"""
from __future__ import annotations

import pytest
import torch

from helpers import randomize_, routed_modules
from odelta_fast import AutoDeltaModel, LoraModel, checkpoint
from odelta_fast.multi import MultiDelta
from tiny_models import tiny_model

# name -> (rank, alpha, use_rslora, targets per architecture; None = the method's defaults)
SPECS = {
    "llama": {
        "a": (2, 5, False, None),
        "b": (4, 8, True, ["attn.q", "attn.k", "attn.v", "attn.o"]),
        "c": (8, 16, False, ["attn.o", "ff.w1", "ff.w2"]),
        "d": (16, 12, False, ["attn.q", "ff.gate"]),
    },
    "gpt2": {
        "a": (2, 5, False, None),
        "b": (4, 8, True, ["attn.qkv", "attn.o"]),
        "c": (8, 16, False, ["attn.o", "ff.w1", "ff.w2"]),
        "d": (16, 12, False, ["ff.w1"]),
    },
}
# Base rows between delta rows, a delta used twice: the batch is not sorted by delta.
MIXED = ["a", "base", "b", "c", None, "d", "a", -1]
SEQ = 6


def _build(arch, tmp_path_factory):
    model, _ = tiny_model(arch)
    root = tmp_path_factory.mktemp(f"multi_{arch}")
    paths = {}
    for i, (name, (r, alpha, rslora, targets)) in enumerate(SPECS[arch].items()):
        delta = LoraModel(model, lora_r=r, lora_alpha=alpha, use_rslora=rslora, modified_modules=targets, name=name)
        randomize_(delta.parameters(), std=0.3, seed=10 + i)
        paths[name] = str(root / name)
        delta.save_finetuned(paths[name])
        delta.remove()
    assert not routed_modules(model)
    return model, paths


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def served(request, tmp_path_factory):
    return request.param, *_build(request.param, tmp_path_factory)


def _tokens(batch, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _alone(model, path, **inputs):
    """The single-delta reference: attach with from_finetuned, run, remove."""
    delta = AutoDeltaModel.from_finetuned(path, model) if path is not None else None
    try:
        with torch.no_grad():
            return model(**inputs).logits
    finally:
        if delta is not None:
            delta.remove()


def _path(paths, item):
    return None if item in (None, "base", -1) else paths[item]


def test_mixed_batch_matches_each_sequence_alone(served):
    arch, model, paths = served
    ids = _tokens(len(MIXED), SEQ)
    multi = MultiDelta(model, paths)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, delta_ids=MIXED).logits
            # The context manager is the same thing.
            with multi.use(MIXED):
                again = model(input_ids=ids).logits
    finally:
        multi.close()
    assert torch.equal(out, again)
    assert not routed_modules(model), "close() must restore every forward"
    for i, item in enumerate(MIXED):
        ref = _alone(model, _path(paths, item), input_ids=ids[i:i + 1])
        # fp32: batched and single matmuls differ only in summation order.
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"row {i} ({item}): {m}")
    # The deltas do something: every delta row differs from the backbone's output.
    base = _alone(model, None, input_ids=ids)
    for i, item in enumerate(MIXED):
        if _path(paths, item) is not None:
            assert (out[i] - base[i]).abs().max() > 1e-3, f"delta {item} changed nothing"


def test_mixed_batch_through_the_triton_kernels(served):
    """The same comparison through the Triton kernels (interpreted on CPU), both layouts."""
    import importlib.util
    import os

    if not torch.cuda.is_available() and (importlib.util.find_spec("triton") is None
                                          or os.environ.get("TRITON_INTERPRET") != "1"):
        pytest.skip("triton not installed or TRITON_INTERPRET unset without CUDA")
    arch, model, paths = served
    if arch != "llama":
        pytest.skip("one architecture is enough for the kernel path; the eager test covers Conv1D routing")
    # 8 x 3 = 24 rows: per-row kernels; 8 x 12 = 96 rows: sorted segments.
    batches = {length: _tokens(len(MIXED), length, seed=length) for length in (3, 12)}
    refs = {length: [_alone(model, _path(paths, item), input_ids=ids[i:i + 1])[0] for i, item in enumerate(MIXED)]
            for length, ids in batches.items()}
    multi = MultiDelta(model, paths, backend="triton")
    try:
        for length, ids in batches.items():
            with torch.no_grad():
                out = model(input_ids=ids, delta_ids=MIXED).logits
            for i, ref in enumerate(refs[length]):
                torch.testing.assert_close(out[i], ref, rtol=1e-4, atol=1e-4)
    finally:
        multi.close()


def test_generate_with_kv_cache_matches_per_sequence_generate(served):
    """Greedy generate of a left-padded mixed batch (prefill, then decode steps of one token per
    sequence through the KV cache) equals each prompt generated alone with its own delta."""
    arch, model, paths = served
    batch = ["a", "base", "b", "c", "d", "a"]
    lengths = [5, 3, 4, 5, 2, 4]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(batch), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = p
        attention_mask[i, width - len(p):] = 1
    new = 6
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=True,
                  output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    multi = MultiDelta(model, paths)
    try:
        with multi.use(batch), torch.no_grad():
            mixed = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        multi.close()
    assert mixed.sequences.shape == (len(batch), width + new)
    for i, (item, prompt) in enumerate(zip(batch, prompts)):
        path = _path(paths, item)
        delta = AutoDeltaModel.from_finetuned(path, model) if path is not None else None
        try:
            with torch.no_grad():
                alone = model.generate(input_ids=prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                       **kwargs)
        finally:
            if delta is not None:
                delta.remove()
        assert torch.equal(mixed.sequences[i, width:], alone.sequences[0, len(prompt):]), f"sequence {i} ({item}) diverged"
        for step, (s_mixed, s_alone) in enumerate(zip(mixed.scores, alone.scores)):
            torch.testing.assert_close(s_mixed[i], s_alone[0], rtol=1e-4, atol=1e-4,
                                       msg=lambda m: f"sequence {i} step {step}: {m}")


def test_add_and_remove_never_reload_the_backbone(served):
    arch, model, paths = served
    weights = {name: (p, p.data_ptr(), p.detach().clone()) for name, p in model.named_parameters()}
    ids = _tokens(4, SEQ, seed=5)
    base = _alone(model, None, input_ids=ids[:1])[0]
    multi = MultiDelta(model, {"a": paths["a"], "b": paths["b"]})
    try:
        with torch.no_grad():
            before = model(input_ids=ids, delta_ids=["a", "b", "a", None]).logits
        multi.add("c", paths["c"])
        multi.add("d", paths["d"])
        with torch.no_grad():
            after = model(input_ids=ids, delta_ids=["a", "b", "c", "d"]).logits
        torch.testing.assert_close(after[:2], before[:2], rtol=0, atol=0)
        multi.remove("a")
        assert multi.names == ["b", "c", "d"]
        with pytest.raises(KeyError, match="'a'"):
            model(input_ids=ids, delta_ids=["a", "b", "c", "d"])
        with torch.no_grad():
            later = model(input_ids=ids, delta_ids=["base", "b", "c", "d"]).logits
        torch.testing.assert_close(later[1:], after[1:], rtol=0, atol=0)
        torch.testing.assert_close(later[0], base, rtol=1e-5, atol=1e-5)
        # A freed slot is reused; ids by index follow the slots.
        multi.add("a2", paths["a"])
        assert multi.index("a2") == 0
        with torch.no_grad():
            again = model(input_ids=ids, delta_ids=[0, "b", "c", "d"]).logits
        torch.testing.assert_close(again[0], before[0], rtol=0, atol=0)
        # Deltas live on the CPU; device copies are rebuilt on demand after offload().
        multi.offload()
        with torch.no_grad():
            rebuilt = model(input_ids=ids, delta_ids=[0, "b", "c", "d"]).logits
        torch.testing.assert_close(rebuilt, again, rtol=0, atol=0)
    finally:
        multi.close()
    assert not routed_modules(model)
    for name, p in model.named_parameters():
        orig, ptr, value = weights[name]
        assert p is orig and p.data_ptr() == ptr, f"{name} was replaced"
        assert torch.equal(p, value), f"{name} changed"
    assert "odelta_multi" not in str(model)


def test_errors_are_clear(served, tmp_path):
    arch, model, paths = served
    ids = _tokens(2, SEQ)
    multi = MultiDelta(model, {"a": paths["a"]})
    try:
        with pytest.raises(RuntimeError, match="delta_ids"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="3 delta ids for a batch of 2 sequences"):
            model(input_ids=ids, delta_ids=["a", "a", "a"])
        # A list that divides the batch is not silently repeated (the first sequence's delta
        # would reach the second), neither as a keyword nor through use().
        four = _tokens(4, SEQ)
        with pytest.raises(ValueError, match="2 delta ids for a batch of 4 sequences"):
            model(input_ids=four, delta_ids=["a", None])
        with pytest.raises(ValueError, match="one id per sequence"), multi.use(["a", None]):
            model(input_ids=four)
        # generate() with beams runs k adjacent copies of each sequence: that is expected.
        with torch.no_grad():
            beams = multi.generate(input_ids=ids, delta_ids=["a", None], num_beams=2, max_new_tokens=2,
                                   do_sample=False, pad_token_id=0)
        assert beams.shape[0] == 2
        with pytest.raises(KeyError, match="'zzz'"):
            model(input_ids=ids, delta_ids=["a", "zzz"])
        with pytest.raises(ValueError, match="already loaded"):
            multi.add("a", paths["a"])
        # A bad checkpoint leaves the object as it was.
        bad = tmp_path / "bad"
        config, tensors = checkpoint.load_checkpoint(paths["b"])
        first = next(k for k in tensors if k.endswith("lora_A"))
        tensors[first] = tensors[first][:, :-1]
        checkpoint.save_checkpoint(bad, {k: v for k, v in config.items() if k not in ("weights_file", "format_version")},
                                   tensors)
        with pytest.raises(checkpoint.CheckpointError, match="do not fit"):
            multi.add("bad", str(bad))
        assert multi.names == ["a"]
        with torch.no_grad():
            model(input_ids=ids, delta_ids=["a", None])
    finally:
        multi.close()
