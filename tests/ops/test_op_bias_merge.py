"""Bias delta (``bias_add``) and merge/unmerge (``lora_merge_``, ``bias_merge_``, ``lora_delta_weight``):
eager and Triton against float64.

Triton runs compiled with CUDA, otherwise through Triton's interpreter (``tests/conftest.py``).
fp32 and fp16 run everywhere; bfloat16 only on a GPU (skipped with a reason on CPU: the
interpreter has no bfloat16). Tolerance rule and poisoning: see ``opcheck.py``.
"""
from __future__ import annotations

import pytest
import torch

from odelta_fast.ops import bias_add, bias_merge_, lora_delta_weight, lora_merge_
from opcheck import DEVICE, assert_close_to_ref, kernel_dtypes, needs_triton, noncontiguous

BACKENDS = ["eager", pytest.param("triton", marks=needs_triton)]


def rnd(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


# ----------------------------------------------------------------------------- bias_add
@pytest.mark.parametrize("shape", [(1, 33), (37, 70), (300, 45), (2, 19, 50)], ids=str)
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_add_matches_reference(backend, dtype, shape, poison):
    y = rnd(*shape, dtype=dtype).requires_grad_()
    b = rnd(shape[-1], dtype=dtype, seed=1).requires_grad_()
    out = bias_add(y, b, backend=backend)
    gy = rnd(*shape, dtype=dtype, seed=2)
    gyy, gb = torch.autograd.grad(out, [y, b], gy)
    y64, b64 = y.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    o64 = y64 + b64
    g64 = torch.autograd.grad(o64, [y64, b64], gy.double())
    yt, bt = y.detach().requires_grad_(), b.detach().requires_grad_()
    ot = yt + bt
    gt = torch.autograd.grad(ot, [yt, bt], gy)
    assert_close_to_ref(out, o64, ot, dtype, f"{backend} bias_add")
    assert_close_to_ref(gyy, g64[0], gt[0], dtype, f"{backend} grad y")
    # torch sums the bias gradient in fp32 for 16-bit inputs too; so do the kernels.
    assert_close_to_ref(gb, g64[1], gt[1], dtype, f"{backend} grad bias")


@needs_triton
def test_bias_add_noncontiguous_and_mixed_dtype(poison):
    y = noncontiguous(rnd(37, 50, dtype=torch.float16)).requires_grad_()
    b = rnd(50, dtype=torch.float32, seed=1).requires_grad_()  # bias kept wider than activations
    out = bias_add(y, b, backend="triton")
    assert out.dtype == torch.float16
    ref = (y.detach().float() + b.detach()).half()
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    gb, = torch.autograd.grad(out, [b], torch.ones_like(out))
    assert gb.dtype == torch.float32
    torch.testing.assert_close(gb, torch.full_like(gb, 37.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_add_bad_inputs(backend):
    y = rnd(5, 10, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'bias'.*\(10\)"):
        bias_add(y, rnd(9, dtype=torch.float32), backend=backend)
    with pytest.raises(ValueError, match=r"'bias'.*\(10\)"):
        bias_add(y, rnd(1, 10, dtype=torch.float32), backend=backend)
    with pytest.raises(ValueError, match="'y'"):
        bias_add(y.long(), rnd(10, dtype=torch.float32), backend=backend)


# ----------------------------------------------------------------------------- merge
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("shape", [(33, 20, 1), (70, 50, 8), (45, 90, 16), (130, 40, 64)], ids=str)
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_merge_unmerge(backend, dtype, shape, fan_in_fan_out, poison):
    n, k, r = shape
    w0 = rnd(*((k, n) if fan_in_fan_out else (n, k)), dtype=dtype)
    a = rnd(r, k, dtype=dtype, seed=1, scale=k ** -0.5)
    b = rnd(n, r, dtype=dtype, seed=2, scale=r ** -0.5)
    s = 1.7
    delta64 = s * (b.double() @ a.double())
    if fan_in_fan_out:
        delta64 = delta64.t()
    ref64 = w0.double() + delta64
    # torch's same-dtype computation: the delta rounded to dtype before the add
    delta_same = s * (b @ a)
    torch_same = w0 + (delta_same.t() if fan_in_fan_out else delta_same)
    w = w0.clone()
    out = lora_merge_(w, a, b, s, fan_in_fan_out=fan_in_fan_out, backend=backend)
    assert out is w
    assert_close_to_ref(w, ref64, torch_same, dtype, f"{backend} merge")
    lora_merge_(w, a, b, s, fan_in_fan_out=fan_in_fan_out, sign=-1, backend=backend)
    unmerge_err = (w.double() - w0.double()).abs().max().item()
    assert unmerge_err <= 2 * torch.finfo(dtype).eps * max(1.0, ref64.abs().max().item()), unmerge_err


@needs_triton
def test_lora_merge_noncontiguous_weight():
    w0 = rnd(40, 70, dtype=torch.float32).t()  # (70, 40) view with transposed strides
    a, b = rnd(8, 40, dtype=torch.float32, seed=1), rnd(70, 8, dtype=torch.float32, seed=2)
    w = w0.clone().t().contiguous().t()
    assert not w.is_contiguous()
    lora_merge_(w, a, b, 0.5, backend="triton")
    torch.testing.assert_close(w, w0 + 0.5 * (b @ a), rtol=1e-6, atol=1e-6)


def test_lora_delta_weight_and_bias_merge():
    a, b = rnd(4, 12, dtype=torch.float16), rnd(10, 4, dtype=torch.float16, seed=1)
    d = lora_delta_weight(a, b, 2.0)
    assert d.dtype == torch.float32 and d.shape == (10, 12)
    torch.testing.assert_close(d.double(), 2.0 * (b.double() @ a.double()), rtol=1e-6, atol=1e-6)
    assert lora_delta_weight(a, b, 2.0, fan_in_fan_out=True).shape == (12, 10)
    bias = rnd(10, dtype=torch.float16, seed=3)
    before = bias.clone()
    delta = rnd(10, dtype=torch.float32, seed=4)
    bias_merge_(bias, delta)
    torch.testing.assert_close(bias, (before.float() + delta).half(), rtol=0, atol=0)
    bias_merge_(bias, delta, sign=-1)
    assert (bias.double() - before.double()).abs().max() <= 2e-3 * before.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_merge_bad_inputs(backend):
    w = rnd(10, 12, dtype=torch.float32)
    a, b = rnd(4, 12, dtype=torch.float32), rnd(10, 4, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"'lora_a'.*\(\*, 12\)"):
        lora_merge_(w, a[:, :11], b, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"'lora_b'.*\(10, 4\)"):
        lora_merge_(w, a, b[:9], 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"'lora_b'.*\(12, 4\)"):
        lora_merge_(w, a[:, :10], b, 1.0, fan_in_fan_out=True, backend=backend)
    with pytest.raises(ValueError, match="'sign'"):
        lora_merge_(w, a, b, 1.0, sign=2, backend=backend)
    with pytest.raises(ValueError, match=r"'delta'.*\(10\)"):
        bias_merge_(rnd(10, dtype=torch.float32), rnd(9, dtype=torch.float32))
