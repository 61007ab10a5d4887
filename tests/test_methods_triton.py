"""The methods on the Triton backend (Triton's interpreter on CPU) agree with the eager backend on
whole models: forward outputs and the gradients of every delta parameter, with dropout off.
Covers what op-level tests cannot: GPT-2's transposed Conv1D weights, biases folded from BitFit
into the fused LoRA epilogue, adapters on attention outputs given as tuples."""
from __future__ import annotations

import pytest
import torch

from odelta_fast import AdapterModel, BitFitModel, LoraModel
from helpers import randomize_
from tiny_models import tiny_model

pytest.importorskip("triton", reason="triton is not installed")


def _run(arch: str, backend: str):
    model, inputs = tiny_model(arch)
    deltas = [
        LoraModel(model, lora_r=4, backend=backend),
        AdapterModel(model, bottleneck_dim=8, backend=backend),
        BitFitModel(model, backend=backend),
    ]
    for i, delta in enumerate(deltas):
        randomize_(delta.parameters(), std=0.1, seed=i)
        delta.freeze_module(set_state_dict=False)
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits.float().pow(2).mean().backward()
    grads = {n: p.grad.detach().clone() for d in deltas for n, p in d.named_parameters()}
    return logits.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_triton_backend_matches_eager_on_a_model(arch):
    eager_out, eager_grads = _run(arch, "eager")
    triton_out, triton_grads = _run(arch, "triton")
    assert torch.allclose(triton_out, eager_out, atol=1e-4, rtol=1e-4)
    assert eager_grads.keys() == triton_grads.keys()
    for name, grad in eager_grads.items():
        assert torch.allclose(triton_grads[name], grad, atol=1e-4, rtol=1e-3), name


def test_log_names_what_each_module_runs():
    """``backend_for`` (what ``log()`` prints) is the op layer's decision for the target's own
    device and dtype: a float64 module runs eager whatever ``auto`` would pick for float32, and a
    Triton LoRA names its path (split until a GPU has measured the shape)."""
    model, _ = tiny_model("llama")
    lora = LoraModel(model, lora_r=4, backend="triton")
    bitfit = BitFitModel(model, backend="triton")
    slot = lora.slots[0]
    assert slot.delta.backend_for(slot.target) == "split"
    assert bitfit.slots[0].delta.backend_for(bitfit.slots[0].target) == "triton"
    auto_model, _ = tiny_model("llama")
    auto = LoraModel(auto_model.double(), lora_r=4)
    slot = auto.slots[0]
    assert slot.delta.backend_for(slot.target) == "eager"
    from rich.console import Console

    console = Console(record=True, width=200)
    auto.log(console=console)
    assert "lora:eager" in console.export_text()
