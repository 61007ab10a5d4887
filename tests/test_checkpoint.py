"""Checkpoints: only the delta on disk, atomic saves, no unpickling, clean failures on mismatch."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from odelta_fast import AdapterModel, AutoDeltaModel, LoraModel
from odelta_fast import checkpoint as ckpt
from helpers import main_output, randomize_, routed_modules
from tiny_models import tiny_model


def _trained_lora(arch="llama"):
    model, inputs = tiny_model(arch)
    delta = LoraModel(model, lora_r=4, unfrozen_modules=["deltas", "lm_head"])
    randomize_(delta.parameters())
    return model, inputs, delta


def test_checkpoint_holds_only_the_delta_and_unfrozen_modules(tmp_path):
    model, _, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    config, tensors = ckpt.load_checkpoint(tmp_path)
    expected = {n for n, _ in delta.named_parameters()} | {"lm_head.weight"}
    assert set(tensors) == expected
    assert config["delta_type"] == "lora" and config["lora_r"] == 4
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["config.json", config["weights_file"]]
    assert config["weights_file"].endswith(".safetensors")


def test_resave_replaces_old_weights_file(tmp_path):
    model, _, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    first = ckpt.read_config(tmp_path)["weights_file"]
    randomize_(delta.parameters(), seed=5)
    delta.save_finetuned(str(tmp_path))
    second = ckpt.read_config(tmp_path)["weights_file"]
    assert first != second
    assert not (tmp_path / first).exists()


def test_interrupted_save_leaves_the_previous_checkpoint_loadable(tmp_path, monkeypatch):
    model, inputs, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    saved_output = main_output(model, inputs)
    randomize_(delta.parameters(), seed=7)

    real_replace = os.replace

    def crash_on_config(src, dst, *args, **kwargs):
        if str(dst).endswith("config.json"):
            raise KeyboardInterrupt("simulated interruption")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        delta.save_finetuned(str(tmp_path))
    monkeypatch.undo()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    fresh, _ = tiny_model("llama")
    AutoDeltaModel.from_finetuned(str(tmp_path), fresh)
    assert torch.equal(main_output(fresh, inputs), saved_output)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model, inputs, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    import pickle

    def forbidden(*args, **kwargs):
        raise AssertionError("loading a delta must not unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    fresh, _ = tiny_model("llama")
    AutoDeltaModel.from_finetuned(str(tmp_path), fresh)


def test_mismatched_backbone_raises_and_stays_untouched(tmp_path):
    model, _, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    other, inputs = tiny_model("llama", hidden_size=48)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    output_before = main_output(other, inputs)
    with pytest.raises(ckpt.CheckpointError) as err:
        LoraModel.from_finetuned(str(tmp_path), other)
    assert "self_attn.q_proj" in str(err.value) and "shape" in str(err.value)
    assert routed_modules(other) == []
    after = other.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(main_output(other, inputs), output_before)
    assert "_odelta_deltas" not in other.__dict__ or not other.__dict__["_odelta_deltas"]


def test_other_targets_are_named_in_the_error(tmp_path):
    model, _, delta = _trained_lora()
    delta.save_finetuned(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["modified_modules"] = ["attn.q"]  # the checkpoint says q and v; this selects q only
    (tmp_path / "config.json").write_text(json.dumps(config))
    fresh, _ = tiny_model("llama")
    with pytest.raises(ckpt.CheckpointError, match="v_proj"):
        AutoDeltaModel.from_finetuned(str(tmp_path), fresh)
    assert routed_modules(fresh) == []


def test_wrong_type_and_missing_directory_are_clear(tmp_path):
    model, _ = tiny_model("llama")
    AdapterModel(model).save_finetuned(str(tmp_path / "adapter"))
    fresh, _ = tiny_model("llama")
    with pytest.raises(ckpt.CheckpointError, match="holds a 'adapter' delta"):
        LoraModel.from_finetuned(str(tmp_path / "adapter"), fresh)
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        AutoDeltaModel.from_finetuned(str(tmp_path / "nowhere"), fresh)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        AutoDeltaModel.from_finetuned(str(tmp_path / "empty"), fresh)


def test_checkpoint_is_small(tmp_path):
    model, _ = tiny_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4)
    LoraModel(model, lora_r=4).save_finetuned(str(tmp_path))
    backbone_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ckpt.file_size(tmp_path) < 0.05 * backbone_bytes


def test_saving_a_merged_delta_is_refused(tmp_path):
    model, _, delta = _trained_lora()
    delta.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        delta.save_finetuned(str(tmp_path))
    assert not Path(tmp_path / "config.json").exists()


def test_two_checkpoints_saved_under_one_name_load_side_by_side(tmp_path):
    first_model, inputs, first = _trained_lora()
    first.save_finetuned(str(tmp_path / "a"))
    second_model, _, second = _trained_lora()
    randomize_(second.parameters(), seed=21)
    second.save_finetuned(str(tmp_path / "b"))  # also named "lora"

    model, _ = tiny_model("llama")
    a = AutoDeltaModel.from_finetuned(str(tmp_path / "a"), model)
    b = AutoDeltaModel.from_finetuned(str(tmp_path / "b"), model)  # saved name taken: loads as lora_1
    c = AutoDeltaModel.from_finetuned(str(tmp_path / "b"), tiny_model("llama")[0], name="task_b")
    assert (a.name, b.name, c.name) == ("lora", "lora_1", "task_b")
    for loaded, source in ((a, first), (b, second), (c, second)):
        ours = dict(loaded.named_parameters())
        for (name, param), (_, expected) in zip(sorted(ours.items()), sorted(source.named_parameters())):
            assert torch.equal(param, expected), name
    a.detach()
    only_b, _ = tiny_model("llama")
    AutoDeltaModel.from_finetuned(str(tmp_path / "b"), only_b)
    assert torch.equal(main_output(model, inputs), main_output(only_b, inputs))
