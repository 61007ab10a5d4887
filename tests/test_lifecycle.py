"""Lifecycle across methods: several named deltas on one backbone, detach/attach in any order,
freezing, the state_dict filter, merge/unmerge exactness, log(), configs."""
from __future__ import annotations

import io
import itertools

import pytest
import torch
from rich.console import Console

from odelta_fast import (AdapterModel, AutoDeltaConfig, AutoDeltaModel, BitFitModel, LoraModel,
                         LowRankAdapterModel, ParallelAdapterModel)
from helpers import main_output, randomize_, routed_modules
from tiny_models import tiny_model


def _three_deltas(model):
    a = LoraModel(model, lora_r=4)
    b = LoraModel(model, lora_r=2, modified_modules=["attn.q", "ff.w1"])  # shares attn.q with a
    c = AdapterModel(model, bottleneck_dim=4)
    for i, d in enumerate((a, b, c)):
        randomize_(d.parameters(), seed=10 + i)
    return a, b, c


def test_several_deltas_get_distinct_names_and_children():
    model, _ = tiny_model("llama")
    a, b, c = _three_deltas(model)
    assert (a.name, b.name, c.name) == ("lora", "lora_1", "adapter")
    q = model.model.layers[0].self_attn.q_proj
    assert hasattr(q, "lora") and hasattr(q, "lora_1")
    with pytest.raises(ValueError, match="already carries a delta named 'lora'"):
        LoraModel(model, name="lora")


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_detach_in_any_order_restores_the_original_exactly(order):
    model, inputs = tiny_model("llama")
    original = main_output(model, inputs)
    deltas = _three_deltas(model)
    full = main_output(model, inputs)
    assert not torch.allclose(full, original)
    for i in order:
        deltas[i].detach()
    assert routed_modules(model) == []
    assert torch.equal(main_output(model, inputs), original)
    for i in reversed(order):
        deltas[i].attach()
    assert torch.allclose(main_output(model, inputs), full, atol=1e-6)


def test_detaching_one_delta_leaves_the_others_working():
    model, inputs = tiny_model("llama")
    a, b, c = _three_deltas(model)
    b.detach()
    without_b = main_output(model, inputs)
    reference, _ = tiny_model("llama")
    a2 = LoraModel(reference, lora_r=4)
    c2 = AdapterModel(reference, bottleneck_dim=4)
    a2.load_delta_state_dict(dict(a.delta_state_dict()))
    c2.load_delta_state_dict(dict(c.delta_state_dict()))
    assert torch.allclose(without_b, main_output(reference, inputs), atol=1e-6)


def test_freeze_module_twice_and_state_dict_filter():
    model, _ = tiny_model("bert")
    delta = LoraModel(model, unfrozen_modules=["deltas", "classifier"])
    delta.freeze_module()
    delta.freeze_module()  # OpenDelta raised on the second call
    keys = set(model.state_dict())
    expected = {n for n, _ in delta.named_parameters()} | {"classifier.weight", "classifier.bias"}
    assert keys == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected


def test_freeze_without_deltas_freezes_this_delta_but_not_others():
    model, _ = tiny_model("llama")
    a = LoraModel(model)
    b = BitFitModel(model)
    a.freeze_module(exclude=[], set_state_dict=False)
    assert not any(p.requires_grad for p in a.parameters())
    assert all(p.requires_grad for p in b.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_unmerge_cycles_restore_exact_bits(dtype):
    model, inputs = tiny_model("gpt2")  # Conv1D: the fan_in_fan_out layout
    model.to(dtype)
    lora = LoraModel(model, lora_r=4)
    bitfit = BitFitModel(model)
    randomize_(lora.parameters())
    randomize_(bitfit.parameters(), seed=3)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    unmerged = main_output(model, inputs).float()
    for _ in range(1000):
        lora.merge()
        bitfit.merge()
        lora.unmerge()
        bitfit.unmerge()
    for name, param in model.named_parameters():
        assert torch.equal(param, weights[name]), name
    lora.merge()
    bitfit.merge()
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 0.1, torch.float16: 2e-2}[dtype]
    merged = main_output(model, inputs).float()
    assert (merged - unmerged).abs().max() <= tolerance * max(1.0, unmerged.abs().max().item())


def test_merged_lora_matches_the_dense_formula():
    model, inputs = tiny_model("llama")
    lora = LoraModel(model, lora_r=4, lora_alpha=8, use_rslora=True)
    randomize_(lora.parameters())
    slot = lora.slots[0]
    before = slot.target.weight.detach().clone()
    lora.merge()
    expected = before + (8 / 2.0) * (slot.delta.lora_B @ slot.delta.lora_A)  # rsLoRA: alpha / sqrt(r)
    assert torch.allclose(slot.target.weight, expected, atol=1e-6)


def test_low_rank_adapter_uses_a_true_matrix_product_for_rank_above_one():
    model, _ = tiny_model("bert")
    delta = LowRankAdapterModel(model, reduction_factor=8, low_rank_rank=3)
    randomize_(delta.parameters())
    d = delta.slots[0].delta
    down, up = d.projections()
    assert torch.allclose(down, (d.down_left @ d.down_right).t())
    assert torch.linalg.matrix_rank(down.detach()).item() == 3


def test_parallel_adapter_scaled_is_applied():
    model, inputs = tiny_model("llama")
    base = main_output(model, inputs)
    delta = ParallelAdapterModel(model, bottleneck_dim=4, scaled=1.0)
    randomize_(delta.parameters())
    full = main_output(model, inputs) - base
    delta.remove()
    model2, _ = tiny_model("llama")
    half = ParallelAdapterModel(model2, bottleneck_dim=4, scaled=0.5)
    randomize_(half.parameters())
    half_out = main_output(model2, inputs) - base
    assert not torch.allclose(full, half_out, atol=1e-6)


def test_log_prints_folded_tree_and_parameter_line():
    model, _ = tiny_model("llama")
    delta = LoraModel(model)
    delta.freeze_module()
    buffer = io.StringIO()
    delta.log(console=Console(file=buffer, width=200, color_system=None))
    text = buffer.getvalue()
    assert "0-1 (LlamaDecoderLayer)" in text
    assert "lora_A:[8,32]" in text and "eager" in text
    trainable = sum(p.numel() for p in delta.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}" in text


def test_auto_config_round_trip_and_unknown_keys():
    config = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 4, "modified_modules": ["attn.q"]})
    model, _ = tiny_model("llama")
    delta = AutoDeltaModel.from_config(config, model)
    assert isinstance(delta, LoraModel) and delta.lora_r == 4 and len(delta.slots) == 2
    # As in OpenDelta, keys a method does not take are dropped, with a warning that catches typos.
    with pytest.warns(UserWarning, match="does not take 'lora_rank' \\(did you mean 'lora_r'\\?\\); ignored"):
        dropped = AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_rank": 4})
    assert dropped.lora_r == 8
    with pytest.raises(ValueError, match="lora_r must be a positive integer"):  # values stay strict
        AutoDeltaConfig.from_dict({"delta_type": "lora", "lora_r": 0})
    with pytest.raises(ValueError, match="unknown delta_type 'loraa'"):
        AutoDeltaConfig.from_dict({"delta_type": "loraa"})


def test_bad_hyperparameters_are_rejected_before_touching_the_model():
    model, _ = tiny_model("llama")
    for make, message in [
        (lambda: LoraModel(model, lora_r=0), "lora_r"),
        (lambda: LoraModel(model, lora_dropout=1.5), "lora_dropout"),
        (lambda: AdapterModel(model, non_linearity="nope"), "non_linearity"),
        (lambda: LoraModel(model, backend="cuda-fast"), "backend"),
    ]:
        with pytest.raises(ValueError, match=message):
            make()
    assert routed_modules(model) == []


def test_deepcopy_of_a_routed_model_routes_through_its_own_deltas():
    import copy

    model, inputs = tiny_model("llama")
    delta = LoraModel(model)
    randomize_(delta.parameters())
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in delta.parameters():
            p.zero_()
    assert not torch.allclose(main_output(clone, inputs), main_output(model, inputs))


def test_deepcopy_and_pickle_keep_routes_that_call_the_original_forward():
    import copy
    import pickle

    model, inputs = tiny_model("llama")
    delta = AdapterModel(model, bottleneck_dim=4)  # sequential: calls the original forward
    randomize_(delta.parameters())
    expected = main_output(model, inputs)
    assert torch.equal(main_output(copy.deepcopy(model), inputs), expected)
    assert torch.equal(main_output(pickle.loads(pickle.dumps(model)), inputs), expected)


@pytest.mark.parametrize("make", [
    lambda m: LoraModel(m), lambda m: AdapterModel(m, bottleneck_dim=4), lambda m: BitFitModel(m),
    lambda m: ParallelAdapterModel(m, bottleneck_dim=4), lambda m: LowRankAdapterModel(m, reduction_factor=8),
])
def test_moving_a_backbone_with_deltas_moves_the_deltas(make):
    model, inputs = tiny_model("llama")
    delta = make(model)
    model.to(torch.float64)  # nn.Module._apply must not be shadowed by a delta module
    assert all(p.dtype == torch.float64 for p in delta.parameters())
    assert main_output(model, inputs).dtype == torch.float64


def test_bitfit_bias_rides_in_the_gemm_that_produces_the_output(monkeypatch):
    from odelta_fast import ops

    model, inputs = tiny_model("llama")
    q = model.model.layers[0].self_attn.q_proj
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(2, 5, 32)
    base_q, base_norm = q(x), norm(x)
    bitfit = BitFitModel(model, modified_modules=["q_proj", "input_layernorm"])
    randomize_(bitfit.parameters())
    delta_q, delta_norm = q.bitfit.bias, norm.bitfit.bias

    calls = {"bias_add": 0, "lora_bias": []}
    real_bias_add, real_lora = ops.bias_add, ops.lora_linear

    def counting_bias_add(*args, **kwargs):
        calls["bias_add"] += 1
        return real_bias_add(*args, **kwargs)

    def recording_lora(x, weight, bias, *args, **kwargs):
        calls["lora_bias"].append(bias)
        return real_lora(x, weight, bias, *args, **kwargs)

    monkeypatch.setattr(ops, "bias_add", counting_bias_add)
    monkeypatch.setattr(ops, "lora_linear", recording_lora)
    with torch.no_grad():
        assert torch.allclose(q(x), base_q + delta_q, atol=1e-6)
        assert calls["bias_add"] == 0  # a Linear: folded into F.linear's bias
        assert torch.allclose(norm(x), base_norm + delta_norm, atol=1e-6)
        assert calls["bias_add"] == 1  # RMSNorm has no GEMM: added to its output

        lora = LoraModel(model, lora_r=4, modified_modules=["q_proj"])
        randomize_(lora.parameters(), seed=3)
        slot = lora.slots[0].delta
        expected = base_q + delta_q + slot.scaling * (x @ slot.lora_A.t()) @ slot.lora_B.t()
        assert torch.allclose(q(x), expected, atol=1e-5)
        assert calls["bias_add"] == 1 and torch.equal(calls["lora_bias"][-1], delta_q)  # in LoRA's epilogue
