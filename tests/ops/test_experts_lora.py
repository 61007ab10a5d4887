"""``experts_lora_linear`` (LoRA on MoE experts): eager and Triton against the float64 reference
(PEFT's dense formula ``x (W_e + s B_e A_e)^T + b_e``), forward and every gradient, odd shapes,
experts with no rows, both weight orientations. Tolerance rule: see ``opcheck.py`` (torch's own
error is the same formula computed in the working dtype)."""
from __future__ import annotations

import pytest
import torch

from odelta_fast.ops import experts_lora as xl
from opcheck import DEVICE, assert_close_to_ref, kernel_dtypes, needs_triton

TRITON = pytest.param("triton", marks=needs_triton)
# (tokens, top_k, experts, K in, N out, r): one token, an expert with no rows (E > T * k), rank 1,
# widths that are not tile multiples.
SHAPES = [(1, 2, 4, 33, 20, 4), (13, 2, 5, 40, 70, 3), (9, 1, 3, 24, 16, 1), (10, 3, 6, 32, 130, 16)]


def rnd(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def make_case(T, k, E, K, N, r, dtype, transposed, seed=0):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    index = scores.topk(k, dim=1).indices.to(DEVICE)
    rows = xl.route_tokens(index, E)
    hidden = rnd(T, K, dtype=dtype, seed=seed + 1)
    x = xl.gather_rows(hidden, rows)
    w = rnd(E, K, N, dtype=dtype, seed=seed + 2, scale=K ** -0.5) if transposed else \
        rnd(E, N, K, dtype=dtype, seed=seed + 2, scale=K ** -0.5)
    bias = rnd(E, N, dtype=dtype, seed=seed + 3, scale=0.1)
    a = rnd(E, r, K, dtype=dtype, seed=seed + 4, scale=K ** -0.5)
    b = rnd(E, N, r, dtype=dtype, seed=seed + 5, scale=r ** -0.5)
    dy = rnd(x.shape[0], N, dtype=dtype, seed=seed + 6)
    return rows, x, w, bias, a, b, dy


def grads(fn, tensors, dy):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    out.backward(dy.to(out.dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("backend", ["eager", TRITON])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape,transposed", [(shape, False) for shape in SHAPES] + [(SHAPES[1], True), (SHAPES[3], True)])
def test_forward_and_every_gradient_match_reference(backend, dtype, transposed, shape, poison):
    check_experts(backend, dtype, shape, transposed)


def check_experts(backend, dtype, shape, transposed):
    """Forward and the gradients of x, weight, bias, A and B against float64 (also run by
    ``test_every_gpu_config.py`` under every GPU config)."""
    rows, x, w, bias, a, b, dy = make_case(*shape, dtype, transposed)
    s = 1.7
    tensors = (x, w, bias, a, b)

    def ours(x, w, bias, a, b):
        return xl.experts_lora_linear(x, w, bias, a, b, s, rows, transposed=transposed, backend=backend)

    def reference(x, w, bias, a, b):
        return xl.experts_lora_reference(x, w, bias, a, b, s, rows, transposed=transposed)

    def same_dtype(x, w, bias, a, b):  # torch's own computation in the working dtype: the yardstick
        delta = xl.experts_delta_weight(a, b, s, transposed=transposed).to(dtype)
        full = w + delta
        out = []
        start = 0
        for e, c in enumerate(rows.counts.tolist()):
            we = full[e] if transposed else full[e].t()
            out.append(x[start:start + c] @ we + bias[e])
            start += c
        return torch.cat(out)

    out, got = grads(ours, tensors, dy)
    ref, want = grads(reference, [t.double() for t in tensors], dy.double())
    yard, yard_grads = grads(same_dtype, tensors, dy)
    assert_close_to_ref(out, ref, yard, dtype, f"{backend} forward")
    for name, g, r_, y in zip(("x", "weight", "bias", "lora_a", "lora_b"), got, want, yard_grads):
        assert_close_to_ref(g, r_, y, dtype, f"{backend} d{name}")


@pytest.mark.parametrize("backend", ["eager", TRITON])
def test_frozen_weight_gets_no_gradient_and_base_alone_works(backend):
    rows, x, w, bias, a, b, dy = make_case(13, 2, 5, 40, 70, 3, torch.float32, False)
    xg = x.clone().requires_grad_()
    a = a.clone().requires_grad_()
    y = xl.experts_lora_linear(xg, w, None, a, b, 1.0, rows, backend=backend)
    y.backward(dy)
    assert w.grad is None and xg.grad is not None and a.grad is not None
    base = xl.experts_lora_linear(x, w, None, None, None, 0.0, rows, backend=backend)
    ref = xl.experts_lora_reference(x, w, None, None, None, 0.0, rows)
    assert (base.double() - ref).abs().max() <= 1e-5


def test_route_and_combine_are_the_experts_sum():
    g = torch.Generator().manual_seed(0)
    T, k, E, H = 9, 2, 4, 6
    index = torch.rand(T, E, generator=g).topk(k, dim=1).indices
    weights = torch.rand(T, k, generator=g)
    hidden = torch.randn(T, H, generator=g)
    rows = xl.route_tokens(index, E)
    assert torch.equal(rows.counts, torch.bincount(index.reshape(-1), minlength=E))
    assert torch.all(rows.expert[1:] >= rows.expert[:-1])
    out = xl.combine_rows(xl.gather_rows(hidden, rows) * 2, weights, rows, torch.float32)
    assert torch.allclose(out, 2 * hidden * weights.sum(1, keepdim=True), atol=1e-6)


def test_merge_folds_every_expert_and_unmerge_returns():
    rows, x, w, bias, a, b, dy = make_case(13, 2, 5, 40, 70, 3, torch.float32, True)
    before = w.clone()
    xl.experts_lora_merge_(w, a, b, 0.5, transposed=True)
    merged = xl.experts_lora_linear(x, w, None, None, None, 0.0, rows, transposed=True, backend="eager")
    ref = xl.experts_lora_reference(x, before, None, a, b, 0.5, rows, transposed=True)
    assert (merged.double() - ref).abs().max() <= 1e-5
    xl.experts_lora_merge_(w, a, b, 0.5, transposed=True, sign=-1)
    assert (w - before).abs().max() <= 1e-6


def test_bad_inputs_name_the_argument():
    rows, x, w, bias, a, b, dy = make_case(13, 2, 5, 40, 70, 3, torch.float32, False)
    with pytest.raises(ValueError, match="'lora_b'"):
        xl.experts_lora_linear(x, w, None, a, b[:, :, :2], 1.0, rows)
    with pytest.raises(ValueError, match="both 'lora_a' and 'lora_b'"):
        xl.experts_lora_linear(x, w, None, a, None, 1.0, rows)
    with pytest.raises(ValueError, match="'weight'"):
        xl.experts_lora_linear(x, w[0], None, a, b, 1.0, rows)
