"""PEFT checkpoints both ways, with the real ``peft`` package: ours saved in PEFT's layout load
in PEFT and transformers' ``load_adapter``; PEFT's load in ours; the outputs agree."""
from __future__ import annotations

import json
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")

from odelta_fast import AutoDeltaModel, LoraModel  # noqa: E402
from odelta_fast.checkpoint import CheckpointError  # noqa: E402
from helpers import main_output, randomize_, routed_modules  # noqa: E402
from tiny_models import tiny_model  # noqa: E402

def _transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int(minor)


CASES = {
    # arch: (our spec, PEFT target_modules, modules_to_save)
    "gpt2": (["attn.qkv", "attn.o"], ["c_attn", "attn.c_proj"], None),  # Conv1D: fan_in_fan_out
    "bert": (["attn.q", "attn.v"], ["query", "value"], ["classifier"]),
    "llama": (["attn.q", "attn.k", "attn.v", "ff.w2"], ["q_proj", "k_proj", "v_proj", "down_proj"], None),
    "t5": (["attn.q", "attn.v"], ["q", "v"], None),
}


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("arch", sorted(CASES))
def test_ours_saved_as_peft_loads_in_peft_with_equal_outputs(arch, use_rslora, tmp_path):
    spec, _, to_save = CASES[arch]
    model, inputs = tiny_model(arch)
    unfrozen = ["deltas", *(to_save or [])]
    delta = LoraModel(model, lora_r=4, lora_alpha=8, modified_modules=spec, use_rslora=use_rslora,
                      unfrozen_modules=unfrozen)
    randomize_(delta.parameters())
    if to_save:
        randomize_(model.classifier.parameters(), seed=9)
    expected = main_output(model, inputs)
    delta.save_finetuned(str(tmp_path), format="peft")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")

    base, _ = tiny_model(arch)
    if to_save:
        randomize_(base.classifier.parameters(), seed=123)  # must be overwritten by modules_to_save
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert torch.allclose(main_output(peft_model, inputs), expected, atol=1e-5, rtol=1e-4)

    if arch == "gpt2" and _transformers_version() < (5, 6):
        return  # transformers < 5.6's load_adapter maps no GPT-2 Conv1D key (its bug, fixed in 5.6); PEFT's loader passed
    if arch in ("llama", "gpt2"):  # transformers' own loader
        hf, _ = tiny_model(arch)
        hf.load_adapter(str(tmp_path))
        assert torch.allclose(main_output(hf, inputs), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_saved_loads_in_ours_with_equal_outputs(arch, tmp_path):
    _, targets, to_save = CASES[arch]
    base, inputs = tiny_model(arch)
    first = targets[0]
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets, modules_to_save=to_save,
                             init_lora_weights=False,  # random A and B, so the delta matters
                             rank_pattern={first: 2}, alpha_pattern={first: 3}, use_rslora=(arch == "llama"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's fan_in_fan_out notice for Conv1D
        peft_model = peft.get_peft_model(base, config)
    if to_save:
        randomize_(peft_model.base_model.model.classifier.modules_to_save.parameters(), seed=4)
    expected = main_output(peft_model, inputs)
    peft_model.save_pretrained(str(tmp_path))

    fresh, _ = tiny_model(arch)
    delta = AutoDeltaModel.from_finetuned(str(tmp_path), fresh)  # recognised by peft_type
    assert isinstance(delta, LoraModel)
    assert torch.allclose(main_output(fresh, inputs), expected, atol=1e-5, rtol=1e-4)
    ranks = {s.delta.r for s in delta.slots}
    assert ranks == {2, 4}

    # ... and round-trips through our own format exactly.
    delta.save_finetuned(str(tmp_path / "ours"))
    again, _ = tiny_model(arch)
    AutoDeltaModel.from_finetuned(str(tmp_path / "ours"), again)
    assert torch.equal(main_output(again, inputs), main_output(fresh, inputs))


def test_unsupported_peft_types_and_features_raise_clearly(tmp_path):
    (tmp_path / "prefix").mkdir()
    (tmp_path / "prefix" / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    model, _ = tiny_model("llama")
    with pytest.raises(CheckpointError, match="PREFIX_TUNING"):
        AutoDeltaModel.from_finetuned(str(tmp_path / "prefix"), model)
    (tmp_path / "bias").mkdir()  # DoRA loads now (tests/test_lora_variants.py); LoRA bias terms do not
    (tmp_path / "bias" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True}))
    with pytest.raises(CheckpointError, match="LoRA bias terms"):
        LoraModel.from_peft(str(tmp_path / "bias"), model)
    # LoRA variants whose forward is not plain LoRA's: loading their factors as plain LoRA would be wrong
    for key, value, feature in [("kasa_config", {"r": 4}, "KaSA"), ("alora_invocation_tokens", [5, 6], "aLoRA"),
                                ("arrow_config", {"top_k": 2}, "Arrow"), ("use_bdlora", {"nblocks": 2}, "block-diagonal"),
                                ("monteclora_config", {"num_samples": 2}, "MonteCLoRA"),
                                ("trainable_token_indices", [0, 1], "trainable tokens")]:
        (tmp_path / key).mkdir()
        (tmp_path / key / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", key: value}))
        with pytest.raises(CheckpointError, match=feature):
            LoraModel.from_peft(str(tmp_path / key), model)
    assert routed_modules(model) == []


def test_unknown_config_keys_warn_and_mismatch_leaves_backbone_untouched(tmp_path):
    base, inputs = tiny_model("llama")
    peft_model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["a_key_from_the_future"] = 1
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    fresh, _ = tiny_model("llama")
    with pytest.warns(UserWarning, match="a_key_from_the_future"):
        LoraModel.from_peft(str(tmp_path), fresh)
    other, _ = tiny_model("llama", hidden_size=48)
    before = main_output(other, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(CheckpointError, match="q_proj"):
            LoraModel.from_peft(str(tmp_path), other)
    assert routed_modules(other) == [] and torch.equal(main_output(other, inputs), before)


def test_non_lora_delta_cannot_be_saved_as_peft(tmp_path):
    from odelta_fast import AdapterModel

    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match="LoRA deltas only"):
        AdapterModel(model).save_finetuned(str(tmp_path), format="peft")


def test_checkpoints_name_exactly_the_modules_when_one_name_is_the_tail_of_another(tmp_path):
    """``lin0`` and ``block.lin0``: a PEFT adapter on the first (a regex target: whole names) loads
    onto the first only, and ours saved in PEFT's layout makes PEFT adapt exactly our modules, with
    per-module ranks that do not leak to the other."""
    from torch import nn

    def nested():
        torch.manual_seed(0)
        model = nn.Module()
        model.lin0, model.block = nn.Linear(6, 6), nn.Module()
        model.block.lin0 = nn.Linear(6, 6)
        return model

    peft_model = peft.get_peft_model(nested(), peft.LoraConfig(r=2, target_modules="lin0", init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        delta = LoraModel.from_peft(str(tmp_path / "peft"), nested())
    assert [slot.path for slot in delta.slots] == ["lin0"]

    model = nested()
    ours = LoraModel(model, lora_r=4, modified_modules=["lin0"], rank_pattern={"^block\\.lin0$": 2})
    assert [(s.path, s.delta.r) for s in ours.slots] == [("lin0", 4), ("block.lin0", 2)]
    only_top = LoraModel(nested(), lora_r=2, modified_modules=["[r]^lin0"])
    for delta, name in ((ours, "both"), (only_top, "top")):
        delta.save_finetuned(str(tmp_path / name), format="peft")
        reloaded = peft.PeftModel.from_pretrained(nested(), str(tmp_path / name))
        layers = {p: m.r["default"] for p, m in reloaded.base_model.model.named_modules() if hasattr(m, "lora_A")}
        assert layers == {s.path: s.delta.r for s in delta.slots}
