"""PrefixModel and SoftPromptModel on tiny bert, gpt2, llama, t5 and bart.

Beyond "it runs": the prefix is checked against an independent reference (the same keys and
values handed to the model as a pre-filled ``DynamicCache``, with the real tokens' positions
pinned), the soft prompt against the model called with the prompt already in ``inputs_embeds``,
and ``generate()`` with a KV cache against a greedy loop that recomputes everything each step.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from odelta_fast import AutoDeltaModel
from odelta_fast.markers import DELTA_PARAM_ATTR
from odelta_fast.integrations import enable_activation_checkpointing
from odelta_fast.methods.kv_cache import cache_in, cache_parameter
from odelta_fast.methods.prefix import PrefixModel, PrefixReparameterization
from odelta_fast.methods.soft_prompt import SoftPromptModel

from tiny_models import tiny_model

ARCHS = ["bert", "gpt2", "llama", "t5", "bart"]
DECODERS = ["gpt2", "llama"]
P = 3  # prefix / prompt length: small enough for BERT's 64 positions

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")


def _prefix(model, **kw):
    kw = {"prefix_token_num": P, "embed_dim": 16, "mid_dim": 24, **kw}
    return PrefixModel(model, **kw)


def _soft_prompt(model, **kw):
    return SoftPromptModel(model, **{"soft_token_num": P, **kw})


METHODS = {"prefix": _prefix, "soft_prompt": _soft_prompt}


def _logits(model, inputs):
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _real_positions(logits, model_type, method):
    """The logits of the caller's tokens (a soft prompt adds P leading positions to the output of
    decoder-only models); encoder-decoder and classification logits are compared whole."""
    if method == "soft_prompt" and model_type in DECODERS:
        return logits[:, P:]
    return logits


def _grad_step(model, inputs, seed=0):
    model.train()
    torch.manual_seed(seed)  # same dropout masks in every run being compared
    model(**inputs).logits.float().pow(2).mean().backward()


def _set_attention(model, impl):
    model.set_attn_implementation(impl)


# ---------------------------------------------------------------------- shared lifecycle checks

@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_train_step_reaches_only_the_delta(model_type, method):
    model, inputs = tiny_model(model_type)
    base = _logits(model, inputs)
    delta = METHODS[method](model)
    delta.freeze_module()
    changed = _real_positions(_logits(model, inputs), model_type, method)
    assert changed.shape == base.shape
    assert not torch.allclose(changed, base, atol=1e-5), "a non-zero prefix/prompt must change the output"

    _grad_step(model, inputs)
    own = dict(delta.named_parameters())
    assert own, "the delta has parameters"
    for name, param in own.items():
        assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
    for name, param in model.named_parameters():
        if not hasattr(param, DELTA_PARAM_ATTR):
            assert param.grad is None and not param.requires_grad, f"backbone parameter {name} got a gradient"
    assert {id(p) for p in own.values()} <= {id(p) for p in model.parameters()}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_detach_is_bit_exact_and_attach_reapplies(model_type, method):
    model, inputs = tiny_model(model_type)
    base = _logits(model, inputs)
    delta = METHODS[method](model)
    with_delta = _logits(model, inputs)
    delta.detach()
    assert torch.equal(_logits(model, inputs), base)
    assert not any(name.endswith(delta.name) for name, _ in model.named_modules())
    delta.attach()
    assert torch.equal(_logits(model, inputs), with_delta)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_save_and_load_round_trip(model_type, method, tmp_path):
    model, inputs = tiny_model(model_type)
    delta = METHODS[method](model)
    delta.freeze_module()
    with torch.no_grad():  # move away from the initialisation so loading is what makes outputs equal
        for param in delta.parameters():
            param.add_(0.1 * torch.randn_like(param))
    expected = _logits(model, inputs)
    delta.save_finetuned(str(tmp_path / "ckpt"))

    fresh, _ = tiny_model(model_type)
    loaded = AutoDeltaModel.from_finetuned(str(tmp_path / "ckpt"), fresh)
    assert type(loaded) is type(delta)
    assert [s.path for s in loaded.slots] == [s.path for s in delta.slots]
    assert torch.equal(_logits(fresh, inputs), expected)


@pytest.mark.parametrize("reentrant", [None, True])
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ARCHS)
def test_gradient_checkpointing(model_type, method, reentrant):
    grads = []
    for checkpointing in (False, True):
        model, inputs = tiny_model(model_type)
        torch.manual_seed(0)
        delta = METHODS[method](model)
        delta.freeze_module()
        if checkpointing:
            enable_activation_checkpointing(model, use_reentrant=reentrant)
        _grad_step(model, inputs)
        grads.append({name: p.grad for name, p in delta.named_parameters()})
    for name, grad in grads[1].items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, grads[0][name], rtol=1e-4, atol=1e-7)


def test_prefix_state_deep_copies_after_a_training_step():
    """The prefixes kept for checkpoint recomputation carry a graph; a deep copy must not trip on
    them (torch refuses to deep-copy non-leaf tensors)."""
    model, inputs = tiny_model("llama")
    delta = _prefix(model)
    delta.freeze_module()
    _grad_step(model, inputs)
    for slot in delta.slots:
        clone = copy.deepcopy(slot.delta)
        assert not clone.state.values
    stack = next(slot.delta for slot in delta.slots if not hasattr(slot.delta, "layout"))
    assert copy.deepcopy(stack).state.reparam is not stack.state.reparam


# ---------------------------------------------------------------------- prefix

@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("reparameterize", [True, False])
@pytest.mark.parametrize("model_type", DECODERS)
def test_prefix_equals_a_prefilled_cache(model_type, reparameterize, impl, masked):
    """Prefix tuning is exactly "the prefix as un-rotated past keys/values": hand the same
    tensors to the plain model as a DynamicCache and pin the positions of the real tokens."""
    model, inputs = tiny_model(model_type)
    _set_attention(model, impl)
    delta = _prefix(model, reparameterize=reparameterize)
    ids = inputs["input_ids"]
    batch, length = ids.shape
    mask = inputs["attention_mask"] if masked else torch.ones_like(ids)
    call = {"input_ids": ids, "attention_mask": mask} if masked else {"input_ids": ids}
    with torch.no_grad():
        got = model(**call).logits
        prefixes = [slot.delta.prefix() for slot in delta.slots if hasattr(slot.delta, "layout")]
    delta.detach()

    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer, (keys, values) in enumerate(prefixes):
        cache.update(keys.expand(batch, -1, -1, -1).contiguous(), values.expand(batch, -1, -1, -1).contiguous(), layer)
    with torch.no_grad():
        want = model(input_ids=ids, **{cache_parameter(model): cache}, position_ids=torch.arange(length).expand(batch, -1),
                     attention_mask=torch.cat([torch.ones(batch, P, dtype=mask.dtype), mask], dim=1)).logits
    keep = mask.bool()
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["bert", "t5", "bart"])
def test_prefix_eager_and_sdpa_agree(model_type):
    """Covers the masks the other tests do not: SDPA's implicit causal mask (T5/BART decoders
    without padding) and no mask at all (encoders)."""
    outs = []
    for impl in ("eager", "sdpa"):
        model, inputs = tiny_model(model_type)
        _set_attention(model, impl)
        torch.manual_seed(0)
        _prefix(model)
        inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
        outs.append(_logits(model, inputs))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def _greedy(model, ids, mask, steps):
    """Greedy decoding that recomputes the whole sequence each step (no cache)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", DECODERS)
def test_generate_with_cache_matches_full_recompute(model_type, method):
    model, inputs = tiny_model(model_type)
    torch.manual_seed(0)
    delta = METHODS[method](model)
    ids = inputs["input_ids"]
    mask = torch.ones_like(ids)
    if model_type == "llama":
        # Left padding in the second row. Not for GPT-2: its positions under a cache follow the
        # mask and without one do not, so even the plain model's two greedy paths differ there.
        mask[1, :2] = 0
    steps = 6
    generate = dict(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                    return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        out = model.generate(**generate)
    assert torch.equal(out.sequences, _greedy(model, ids, mask, steps))
    # The cache holds the real tokens (and a soft prompt's positions) but never a prefix.
    extra = P if method == "soft_prompt" else 0
    assert cache_in(dict(out)).get_seq_length() == ids.shape[1] + steps - 1 + extra
    delta.detach()
    with torch.no_grad():
        plain = model.generate(**generate)
    for with_delta, without in zip(out.logits, plain.logits):  # the delta acts at every step
        assert not torch.allclose(with_delta, without, atol=1e-4)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_encoder_decoder_generate_with_cache_matches_no_cache(model_type, method):
    model, inputs = tiny_model(model_type)
    METHODS[method](model)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], max_new_tokens=5,
                  min_new_tokens=5, do_sample=False)
    with torch.no_grad():
        cached = model.generate(**kwargs)
        uncached = model.generate(**kwargs, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("model_type,stacks", [("llama", 1), ("bert", 1), ("t5", 2), ("bart", 2)])
def test_prefix_mlp_runs_once_per_stack_call(model_type, stacks):
    model, inputs = tiny_model(model_type)
    delta = _prefix(model)
    reparam = next(m for m in model.modules() if isinstance(m, PrefixReparameterization))
    calls = []
    reparam.register_forward_hook(lambda *_: calls.append(1))
    _logits(model, inputs)
    assert len(calls) == stacks
    layers = sum(1 for slot in delta.slots if hasattr(slot.delta, "layout"))
    hidden = model.config.hidden_size if model_type != "llama" else 2 * 8  # llama: 2 kv heads of 8
    assert reparam.out.out_features == 2 * layers * hidden


def test_prefix_on_some_layers_of_t5():
    """The T5 position bias handed from layer to layer stays that of the real keys, so prefixed
    and plain layers mix (OpenDelta broke generate() here)."""
    model, inputs = tiny_model("t5")
    base = _logits(model, inputs)
    delta = _prefix(model, modified_modules=["encoder.block.1.attn", "decoder.block.0.attn"])
    assert len([s for s in delta.slots if hasattr(s.delta, "layout")]) == 2
    assert not torch.allclose(_logits(model, inputs), base)
    with torch.no_grad():
        cached = model.generate(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False)
        uncached = model.generate(input_ids=inputs["input_ids"], max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_prefix_without_reparameterization_has_per_layer_parameters():
    model, _ = tiny_model("llama")
    delta = _prefix(model, reparameterize=False)
    shapes = {name: tuple(p.shape) for name, p in delta.named_parameters()}
    assert shapes == {
        f"model.layers.{i}.self_attn.prefix.prefix_{kind}": (2, P, 8) for i in range(2) for kind in ("keys", "values")
    }


@pytest.mark.parametrize("method", list(METHODS))
def test_low_precision_and_inference_mode(method):
    model, inputs = tiny_model("llama")
    model.to(torch.bfloat16)
    delta = METHODS[method](model)
    assert {p.dtype for p in delta.parameters()} == {torch.bfloat16}
    with torch.inference_mode():  # inference tensors have no version counter to key caches on
        first = model(**inputs).logits
        again = model(**inputs).logits
    assert first.dtype == torch.bfloat16 and torch.equal(first, again)


def test_prefix_rejects_unsupported_modules():
    model, _ = tiny_model("distilbert")
    with pytest.raises(TypeError, match="DistilBertSelfAttention"):
        PrefixModel(model)
    model, _ = tiny_model("bart")
    with pytest.raises(ValueError, match="cross-attention"):
        PrefixModel(model, modified_modules=["crossattn"], common_structure=True)
    model, _ = tiny_model("llama")
    with pytest.raises(TypeError, match="Linear"):
        PrefixModel(model, modified_modules=["attn.q"], common_structure=True)
    assert not any("prefix" in name for name, _ in model.named_modules()), "a failed build leaves no trace"
    # Another kind of delta replacing the attention's forward cannot be combined with a prefix.
    from odelta_fast import routing
    from odelta_fast.delta import DeltaModule

    class Replacing(DeltaModule):
        route_kind = "replace"

        def replace(self, target, original, args, kwargs, extra_bias=None):
            return original(*args, **kwargs)

    routing.attach(model.model.layers[0].self_attn, "replacing", Replacing())
    with pytest.raises(ValueError, match="already carries a delta that replaces its forward .Replacing."):
        PrefixModel(model, prefix_token_num=2, embed_dim=8, mid_dim=8)


@pytest.mark.parametrize("reparameterize", [False, True])
@pytest.mark.parametrize("model_type", ["bert", "llama", "t5"])
def test_two_prefix_deltas_on_one_attention_put_their_prefixes_side_by_side(model_type, reparameterize):
    """OpenDelta's user_defined.py loads a prefix delta again onto modules that carry one: both
    prefixes apply, as one prefix of both lengths would, and detaching one leaves the other."""
    model, inputs = tiny_model(model_type)
    first = _prefix(model, reparameterize=reparameterize, prefix_token_num=2, name="first")
    second = _prefix(model, reparameterize=reparameterize, prefix_token_num=3, name="second")
    torch.manual_seed(0)
    for p in [*first.parameters(), *second.parameters()]:
        nn.init.normal_(p, std=0.5)
    both = _logits(model, inputs)

    def reference(*deltas):
        plain, _ = tiny_model(model_type)
        joint = _prefix(plain, reparameterize=False, prefix_token_num=sum(d.prefix_token_num for d in deltas))
        layers = [[s.delta for s in d.slots if hasattr(s.delta, "layout")] for d in deltas]
        with torch.no_grad():
            for slot, parts in zip([s for s in joint.slots], zip(*layers)):
                pairs = [part.prefix() for part in parts]
                slot.delta.prefix_keys.copy_(torch.cat([k for k, _ in pairs], dim=-2))
                slot.delta.prefix_values.copy_(torch.cat([v for _, v in pairs], dim=-2))
        return _logits(plain, inputs)

    torch.testing.assert_close(both, reference(first, second), rtol=1e-5, atol=1e-5)
    first.detach()
    torch.testing.assert_close(_logits(model, inputs), reference(second), rtol=1e-5, atol=1e-5)
    first.attach()
    torch.testing.assert_close(_logits(model, inputs), both, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- soft prompt

@pytest.mark.parametrize("model_type", ARCHS)
def test_soft_prompt_equals_prompt_in_inputs_embeds(model_type):
    model, inputs = tiny_model(model_type)
    delta = _soft_prompt(model)
    inputs = dict(inputs, attention_mask=inputs["attention_mask"].clone())
    if model_type == "bert":
        inputs["token_type_ids"] = torch.ones_like(inputs["input_ids"])
    got = _logits(model, inputs)
    prompt = delta.slots[0].delta.soft_embeds
    delta.detach()
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    batch = embeds.shape[0]
    manual = {k: v for k, v in inputs.items() if k != "input_ids"}
    manual["inputs_embeds"] = torch.cat([prompt.expand(batch, -1, -1), embeds], dim=1)
    manual["attention_mask"] = torch.cat([torch.ones(batch, P, dtype=torch.long), inputs["attention_mask"]], 1)
    if model_type == "bert":
        manual["token_type_ids"] = torch.cat([torch.zeros(batch, P, dtype=torch.long), inputs["token_type_ids"]], 1)
    torch.testing.assert_close(got, _logits(model, manual), rtol=0, atol=0)


def test_soft_prompt_labels_are_masked_for_the_prompt():
    model, inputs = tiny_model("llama")
    delta = _soft_prompt(model)
    labels = inputs["input_ids"].clone()
    model.eval()
    with torch.no_grad():
        loss = model(**inputs, labels=labels).loss
        prompt = delta.slots[0].delta.soft_embeds
        delta.detach()
        embeds = torch.cat([prompt.expand(2, -1, -1), model.get_input_embeddings()(inputs["input_ids"])], 1)
        mask = torch.cat([torch.ones(2, P, dtype=torch.long), inputs["attention_mask"]], 1)
        padded = torch.cat([torch.full((2, P), -100), labels], 1)
        want = model(inputs_embeds=embeds, attention_mask=mask, labels=padded).loss
    torch.testing.assert_close(loss, want)
    assert torch.equal(labels, inputs["input_ids"]), "the caller's tensors are not modified"


def test_soft_prompt_accepts_inputs_embeds_without_input_ids():
    """OpenDelta issue #7: BERT called with inputs_embeds only."""
    model, inputs = tiny_model("bert")
    _soft_prompt(model)
    from_ids = _logits(model, inputs)
    embeds = model.get_input_embeddings()(inputs["input_ids"]).detach()
    from_embeds = _logits(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
    torch.testing.assert_close(from_embeds, from_ids, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_soft_prompt_is_a_parameter_of_the_embedding_dtype(dtype):
    model, inputs = tiny_model("gpt2")
    model.to(dtype)
    delta = _soft_prompt(model, token_init=True)
    (name, prompt), = delta.named_parameters()
    assert isinstance(prompt, nn.Parameter) and prompt.dtype == dtype
    assert any(p is prompt for p in model.parameters())
    assert name == "soft_prompt.soft_embeds"
    torch.testing.assert_close(prompt.detach(), model.get_input_embeddings().weight[:P].detach(), rtol=0, atol=0)
    assert _logits(model, inputs).dtype == dtype


def test_soft_prompt_init_range_and_validation():
    model, _ = tiny_model("llama")
    delta = _soft_prompt(model, token_init=False, init_range=0.25)
    prompt = delta.slots[0].delta.soft_embeds
    assert prompt.abs().max() <= 0.25
    delta.remove()
    with pytest.raises(ValueError, match="vocabulary"):
        SoftPromptModel(model, soft_token_num=1000)
    with pytest.raises(ValueError, match="soft_token_num"):
        SoftPromptModel(model, soft_token_num=0)


# ---------------------------------------------------------------------- the cache argument
MORE_DECODERS = ["opt", "mistral", "qwen2", "gemma2", "phi3", "gptj", "gpt_neox", "falcon"]


@pytest.mark.parametrize("model_type", MORE_DECODERS)
def test_prefix_on_the_other_listed_decoders(model_type):
    """The README lists these beyond the five tested in depth: training reaches only the prefix,
    detach is exact, and generate() with a KV cache equals recomputing every step."""
    model, inputs = tiny_model(model_type)
    base = _logits(model, inputs)
    delta = _prefix(model)
    delta.freeze_module()
    assert not torch.allclose(_logits(model, inputs), base, atol=1e-5)
    _grad_step(model, inputs)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in delta.named_parameters())
    ids, mask = inputs["input_ids"], torch.ones_like(inputs["input_ids"])
    model.eval()  # no dropout while comparing decodes
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, pad_token_id=0)
    assert torch.equal(out, _greedy(model, ids, mask, 4))
    delta.detach()
    assert torch.equal(_logits(model, inputs), base)


def test_cache_argument_is_found_by_what_it_is():
    from transformers.cache_utils import Cache, DynamicCache

    class Renamed(nn.Module):  # a future release renames the argument again
        def forward(self, hidden_states, attention_mask=None, kv_store: Cache | None = None):
            return hidden_states

    class StringAnnotated(nn.Module):
        def forward(self, hidden_states, memory: "Optional[EncoderDecoderCache]" = None):  # noqa: F821
            return hidden_states

    class Unannotated(nn.Module):
        def forward(self, hidden_states, layer_past=None):
            return hidden_states

    class NoCache(nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache_position=None):
            return hidden_states

    assert cache_parameter(Renamed()) == "kv_store"
    assert cache_parameter(StringAnnotated()) == "memory"
    assert cache_parameter(Unannotated()) == "layer_past"
    assert cache_parameter(NoCache()) is None  # cache_position is a tensor of positions, not a cache
    cache = DynamicCache()
    assert cache_in({"use_cache": True, "whatever": cache}) is cache
    assert cache_in({"cache_position": torch.arange(3)}) is None
