"""Activation memory of one LoRA layer: what autograd keeps between forward and backward.

Bound (eager and Triton, dropout on): ``x.nbytes + M * r * itemsize`` (the input, which the caller
holds anyway, and ``drop(x) A^T``) plus a few bytes for the dropout seed, and for the Triton path
the dropout mask packed to 1 bit per element (M * K / 8 bytes: drawn once in forward, read by dX
and dA); parameters' storages are not counted. PEFT's ``lora.Linear`` keeps more (a dropped copy of x, per layer).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from odelta_fast.ops import lora_linear
from opcheck import DEVICE, needs_triton

SEED_BYTES = 8


def saved_bytes(fn, params):
    """Bytes of distinct storages autograd packs while ``fn`` runs, parameters excluded."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_storages:
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


M, K, N, R = 64, 96, 80, 8


def layer(dtype=torch.float32):
    torch.manual_seed(0)
    base = nn.Linear(K, N).to(DEVICE, dtype)
    base.requires_grad_(False)
    a = nn.Parameter(torch.randn(R, K, device=DEVICE, dtype=dtype) / K ** 0.5)
    b = nn.Parameter(torch.randn(N, R, device=DEVICE, dtype=dtype))
    return base, a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["eager", pytest.param("triton", marks=needs_triton)])
def test_lora_saves_only_x_and_xa(backend, p, dtype):
    base, a, b = layer(dtype)
    x = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    nbytes, y = saved_bytes(
        lambda: lora_linear(x, base.weight, base.bias, a, b, 2.0, p, backend=backend),
        [base.weight, base.bias, a, b])
    mask_bytes = M * -(-K // 8) if backend == "triton" and p > 0 else 0
    bound = x.nbytes + M * R * x.element_size() + SEED_BYTES + mask_bytes
    assert nbytes <= bound, f"{backend}: autograd keeps {nbytes} B > {bound} B"
    y.sum().backward()  # and the saved tensors suffice for backward
    assert a.grad is not None and b.grad is not None and x.grad is not None


def test_peft_lora_layer_keeps_more():
    peft_layer = pytest.importorskip("peft.tuners.lora.layer")
    from peft import LoraConfig

    base = nn.Linear(K, N).to(DEVICE)
    config = LoraConfig(r=R, lora_alpha=16, lora_dropout=0.1, target_modules=["x"])
    peft_lin = peft_layer.Linear(base, "default", config=config, r=R, lora_alpha=16, lora_dropout=0.1)
    peft_lin.train()
    nn.init.normal_(peft_lin.lora_B["default"].weight)
    base.requires_grad_(False)
    x = torch.randn(M, K, device=DEVICE, requires_grad=True)
    nbytes, y = saved_bytes(lambda: peft_lin(x), list(peft_lin.parameters()))
    bound = x.nbytes + M * R * x.element_size() + SEED_BYTES
    assert nbytes > bound, f"PEFT keeps {nbytes} B, expected more than our bound {bound} B"
    # and ours, same layer, same dropout, stays within it
    ours, _ = saved_bytes(
        lambda: lora_linear(x, base.weight, base.bias, peft_lin.lora_A["default"].weight,
                            peft_lin.lora_B["default"].weight, 2.0, 0.1),
        list(peft_lin.parameters()))
    assert ours <= bound < nbytes
