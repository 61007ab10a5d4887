"""Nothing lost, nothing silently wrong: saving a merged model, merge_and_unload, what remove()
and detach() give back, unreadable checkpoints, file modes, attach-order independence, backend
checks at attach time. Each test here failed before the fix it guards."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from odelta_fast import AdapterModel, AutoDeltaModel, BitFitModel, LoraModel, routing
from odelta_fast.checkpoint import CheckpointError
from odelta_fast.delta import has_state_dict_filter
from odelta_fast.markers import REGISTRY_ATTR
from helpers import main_output, randomize_, routed_modules
from tiny_models import tiny_model


def _trained_lora(model, **kw):
    delta = LoraModel(model, lora_r=4, **kw)
    randomize_(delta.parameters())
    delta.freeze_module()
    return delta


# ---------------------------------------------------------------------- saving the model
def test_save_pretrained_of_a_merged_model_writes_every_weight(tmp_path):
    model, inputs = tiny_model("llama")
    delta = _trained_lora(model)
    delta.merge()
    merged = main_output(model, inputs)
    model.save_pretrained(str(tmp_path / "merged"))
    reloaded = type(model).from_pretrained(str(tmp_path / "merged")).eval()
    torch.testing.assert_close(main_output(reloaded, inputs), merged, rtol=1e-5, atol=1e-5)
    plain, _ = tiny_model("llama")
    assert set(reloaded.state_dict()) == set(plain.state_dict())


def test_merge_and_unload_returns_a_plain_backbone_that_saves_whole(tmp_path):
    model, inputs = tiny_model("gpt2")
    lora = _trained_lora(model)
    bitfit = BitFitModel(model)
    randomize_(bitfit.parameters(), seed=4)
    expected = main_output(model, inputs)
    backbone = lora.merge_and_unload()
    assert backbone is model
    backbone = bitfit.merge_and_unload()
    assert routed_modules(model) == [] and REGISTRY_ATTR not in model.__dict__
    assert not has_state_dict_filter(model)  # the filter went with the last delta
    plain, _ = tiny_model("gpt2")
    assert set(model.state_dict()) == set(plain.state_dict())
    torch.testing.assert_close(main_output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(str(tmp_path / "plain"))
    reloaded = type(model).from_pretrained(str(tmp_path / "plain")).eval()
    torch.testing.assert_close(main_output(reloaded, inputs), expected, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_refuses_what_cannot_fold_and_changes_nothing():
    model, inputs = tiny_model("llama")  # no biases anywhere: BitFit on its projections cannot fold
    lora = _trained_lora(model)
    bitfit = BitFitModel(model)
    adapter = AdapterModel(model, bottleneck_dim=4)
    for d in (bitfit, adapter):
        randomize_(d.parameters(), seed=5)
    before = main_output(model, inputs)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for delta, kind in ((bitfit, "BitFitModel"), (adapter, "AdapterModel")):
        with pytest.raises(ValueError, match=f"{kind} .* cannot be folded .* adds computation"):
            delta.merge_and_unload()
    assert torch.equal(main_output(model, inputs), before)
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    assert lora.attached and bitfit.attached and adapter.attached


def test_merge_and_unload_under_another_merged_delta_keeps_both_exact():
    model, inputs = tiny_model("gpt2")
    a = _trained_lora(model, name="a")
    b = LoraModel(model, lora_r=2, name="b")
    randomize_(b.parameters(), seed=9)
    b.detach()
    only_a = main_output(model, inputs)
    b.attach()
    b.merge()
    both = main_output(model, inputs)
    a.merge_and_unload()  # b is merged into the same c_attn weights
    torch.testing.assert_close(main_output(model, inputs), both, rtol=1e-5, atol=1e-5)
    b.unmerge()  # back to "the backbone with a baked in", with b routed
    torch.testing.assert_close(main_output(model, inputs), both, rtol=1e-5, atol=1e-5)
    b.remove()
    torch.testing.assert_close(main_output(model, inputs), only_a, rtol=1e-5, atol=1e-5)


def test_removing_the_last_delta_gives_the_state_dict_back():
    model, _ = tiny_model("llama")
    keys = set(model.state_dict())
    delta = _trained_lora(model)
    assert set(model.state_dict()) != keys
    delta.remove()
    assert set(model.state_dict()) == keys
    assert not has_state_dict_filter(model) and REGISTRY_ATTR not in model.__dict__
    model.load_state_dict(tiny_model("llama")[0].state_dict())  # strict load: no hook left to interfere


def test_removing_one_of_two_deltas_keeps_the_filter_for_the_other():
    model, _ = tiny_model("llama")
    a = _trained_lora(model, name="a")
    b = _trained_lora(model, name="b")
    a.remove()
    assert set(model.state_dict()) == {n for n, _ in b.named_parameters()}


# ---------------------------------------------------------------------- unfrozen backbone modules
def test_detach_restores_backbone_modules_the_delta_trained():
    model, inputs = tiny_model("bert")
    original = model.classifier.weight.detach().clone()
    base = main_output(model, inputs)
    delta = LoraModel(model, unfrozen_modules=["deltas", "classifier"])
    delta.freeze_module()
    with torch.no_grad():  # what training the head in place does
        model.classifier.weight.add_(1.0)
    trained = main_output(model, inputs)
    delta.detach()
    assert torch.equal(model.classifier.weight, original)
    assert torch.equal(main_output(model, inputs), base)
    saved = delta.delta_state_dict()  # still the delta's own (trained) head
    assert torch.equal(saved["classifier.weight"], original + 1.0)
    delta.attach()
    assert torch.equal(main_output(model, inputs), trained)
    delta.remove()
    assert torch.equal(model.classifier.weight, original)


def test_loading_a_delta_with_a_head_is_undone_by_detach(tmp_path):
    model, inputs = tiny_model("bert")
    delta = LoraModel(model, unfrozen_modules=["deltas", "classifier"])
    delta.freeze_module()
    randomize_([model.classifier.weight], seed=7)
    randomize_(delta.parameters(), seed=8)
    delta.save_finetuned(str(tmp_path / "ckpt"))

    fresh, _ = tiny_model("bert")
    head = fresh.classifier.weight.detach().clone()
    base = main_output(fresh, inputs)
    loaded = AutoDeltaModel.from_finetuned(str(tmp_path / "ckpt"), fresh)
    assert not torch.equal(fresh.classifier.weight, head)
    loaded.detach()
    assert torch.equal(fresh.classifier.weight, head) and torch.equal(main_output(fresh, inputs), base)


def test_peft_modules_to_save_are_restored_on_detach(tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = tiny_model("bert")
    config = peft.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"],
                             task_type="SEQ_CLS")
    peft_model = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                p.add_(0.1)
    peft_model.save_pretrained(str(tmp_path / "peft"))

    fresh, _ = tiny_model("bert")
    head = {n: p.detach().clone() for n, p in fresh.classifier.named_parameters()}
    base = main_output(fresh, inputs)
    delta = LoraModel.from_peft(str(tmp_path / "peft"), fresh)
    assert not torch.equal(fresh.classifier.weight, head["weight"])
    delta.detach()
    for name, p in fresh.classifier.named_parameters():
        assert torch.equal(p, head[name]), name
    assert torch.equal(main_output(fresh, inputs), base)


def test_seq_cls_saved_in_peft_format_loads_in_peft(tmp_path):
    """task_type SEQ_CLS makes PEFT expect the classifier in the file (it raised KeyError)."""
    peft = pytest.importorskip("peft")
    model, inputs = tiny_model("bert")
    delta = _trained_lora(model)  # the head was not unfrozen: its current values are saved
    expected = main_output(model, inputs)
    delta.save_finetuned(str(tmp_path / "peft"), format="peft")
    fresh, _ = tiny_model("bert")
    randomize_(fresh.classifier.parameters(), seed=3)  # another head, as a fresh from_pretrained has
    loaded = peft.PeftModel.from_pretrained(fresh, str(tmp_path / "peft")).eval()
    torch.testing.assert_close(main_output(loaded, inputs), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- unreadable files
def test_truncated_checkpoint_raises_checkpoint_error_naming_the_file(tmp_path):
    model, _ = tiny_model("llama")
    delta = _trained_lora(model)
    path = tmp_path / "ckpt"
    delta.save_finetuned(str(path))
    weights = next(path.glob("delta-*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    fresh, inputs = tiny_model("llama")
    before = main_output(fresh, inputs)
    with pytest.raises(CheckpointError, match=f"{weights.name}.*truncated or corrupt"):
        AutoDeltaModel.from_finetuned(str(path), fresh)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*not valid JSON"):
        AutoDeltaModel.from_finetuned(str(path), fresh)
    assert routed_modules(fresh) == [] and torch.equal(main_output(fresh, inputs), before)
    assert issubclass(CheckpointError, ValueError)


def test_loading_onto_another_architecture_names_the_one_it_was_trained_on(tmp_path):
    model, _ = tiny_model("gpt2")
    _trained_lora(model, modified_modules=["ff.w1"]).save_finetuned(str(tmp_path / "ckpt"))
    other, _ = tiny_model("llama")
    with pytest.raises(CheckpointError, match="trained on a gpt2 model .*this backbone is a llama model"):
        AutoDeltaModel.from_finetuned(str(tmp_path / "ckpt"), other)


@pytest.mark.parametrize("fmt", ["odelta", "peft"])
def test_written_files_honour_the_umask(tmp_path, fmt):
    model, _ = tiny_model("llama")
    delta = _trained_lora(model)
    old = os.umask(0o022)
    try:
        delta.save_finetuned(str(tmp_path / fmt), format=fmt)
    finally:
        os.umask(old)
    files = list((tmp_path / fmt).iterdir())
    assert files
    for file in files:
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


# ---------------------------------------------------------------------- attach order, backends
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
def test_bitfit_targets_do_not_depend_on_attach_order(arch):
    first, _ = tiny_model(arch)
    LoraModel(first, modified_modules=["all-linear"])
    after_lora = [s.path for s in BitFitModel(first).slots]
    second, _ = tiny_model(arch)
    alone = [s.path for s in BitFitModel(second).slots]
    assert after_lora == alone


def test_ff_works_wherever_its_projections_do():
    model, _ = tiny_model("bert")  # no single feed-forward module: intermediate + output
    paths = [s.path for s in BitFitModel(model, modified_modules=["ff"]).slots]
    assert paths == [f"bert.encoder.layer.{i}.{m}.dense" for i in range(2) for m in ("intermediate", "output")]
    assert "bert.encoder.layer.0.intermediate.dense" in [s.path for s in BitFitModel(tiny_model("bert")[0]).slots]


def test_an_unusable_backend_is_refused_at_attach(monkeypatch):
    model, inputs = tiny_model("llama")
    with pytest.raises(ValueError, match="LoraModel on Linear at 'model.layers.0.self_attn.q_proj'.*no 'cuda'"):
        LoraModel(model, backend="cuda")
    with pytest.raises(ValueError, match="BitFitModel on .*no 'cuda' implementation"):
        BitFitModel(model, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="backend='triton'.*needs CUDA tensors"):
        LoraModel(model, backend="triton")
    assert routed_modules(model) == []


def test_second_lora_on_a_triton_module_runs(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model, inputs = tiny_model("llama")
    a = LoraModel(model, lora_r=4, modified_modules=["attn.q"], backend="triton")
    b = LoraModel(model, lora_r=2, modified_modules=["attn.q"], backend="triton")
    randomize_(list(a.parameters()) + list(b.parameters()))
    got = main_output(model, inputs)
    for d in (a, b):
        for slot in d.slots:
            slot.delta.backend = "eager"
    torch.testing.assert_close(got, main_output(model, inputs), rtol=1e-4, atol=1e-4)
    assert isinstance(routing.routes(model.model.layers[0].self_attn.q_proj)[1], type(b.slots[0].delta))
