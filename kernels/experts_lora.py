"""LoRA on MoE experts: grouped shrink / expand over rows sorted by expert, and the per-expert
factor gradients (``odelta_fast/ops/experts_lora.py`` owns the math and the reference).

The rows of expert ``e`` are ``starts[e] : starts[e] + counts[e]`` (contiguous: the op gathers them
in expert order). Shrink and expand are the multi-delta segments kernels (``multi_lora``), one
segment per expert, launched over a device-side block schedule of ``cdiv(S, BLOCK_M) + E``
programs (no host read of the counts, so no synchronisation). The factor gradients are this
module's own kernel: one program per expert and output tile, reducing over the expert's rows.

Ranks are padded inside to a power of two >= 16 (``tl.dot``'s minimum); masked loads give zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import multi_lora
from .common import Tuning, dot_dtype, dot_precision, new_output, pad_dim

# Factor gradients: the widest column tile of ``segment_outer`` (narrower outputs get their padded width).
_OUTER_BLOCK_Q = 64


@triton.jit
def _outer_kernel(
    u_ptr, v_ptr, out_ptr, starts_ptr, counts_ptr,
    P, Q,
    stride_um, stride_up, stride_vm, stride_vq, stride_oe, stride_op, stride_oq,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr,
):
    """out[e, p-block, q-block] = sum over expert e's rows of u[row, p]^T v[row, q] (fp32)."""
    e = tl.program_id(0).to(tl.int64)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = tl.program_id(2) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    start = tl.load(starts_ptr + e)
    count = tl.load(counts_ptr + e)
    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for m0 in range(0, count, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = (start + offs_m).to(tl.int64)
        ut = tl.load(u_ptr + rows[None, :] * stride_um + offs_p[:, None] * stride_up,
                     mask=mask_p[:, None] & mask_m[None, :], other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + rows[:, None] * stride_vm + offs_q[None, :] * stride_vq,
                    mask=mask_m[:, None] & mask_q[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(ut, v, acc, input_precision=PRECISION)
    tl.store(out_ptr + e * stride_oe + offs_p[:, None] * stride_op + offs_q[None, :] * stride_oq, acc,
             mask=mask_p[:, None] & mask_q[None, :])


# ============================================================================ launch configurations
# Factor gradients: reduction over rows in chunks of BLOCK_M (the dot's K side).
OUTER = Tuning("experts_lora_outer", _outer_kernel, [triton.Config({"BLOCK_M": 32}, num_warps=4)])


# ============================================================================ launchers


def shrink(x: Tensor, a: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """``t (S, R)`` float32: ``t[rows of e] = x[rows of e] A[e]^T`` for ``a (E, R, K)`` (any strides);
    rows of no expert are zero. The multi-delta segments kernel, with the rows already in expert
    order."""
    S, K = x.shape
    R = a.shape[1]
    if S == 0 or R == 0:
        return torch.zeros((S, R), dtype=torch.float32, device=x.device)
    return multi_lora.shrink_segments(x, a, _in_order(S, x.device), starts, counts)


def expand_(y: Tensor, t: Tensor, b: Tensor, starts: Tensor, counts: Tensor, scaling: float) -> Tensor:
    """``y[rows of e] += scaling * t[rows of e] B[e]^T`` in place for ``b (E, N, R)`` (any strides)."""
    S, N = y.shape
    R = b.shape[2]
    if S == 0 or R == 0 or N == 0:
        return y
    scalings = torch.full((counts.shape[0],), float(scaling), dtype=torch.float32, device=y.device)
    multi_lora.expand_segments(y, t, b, _in_order(S, y.device), starts, counts, scalings)
    return y


def _in_order(rows: int, device) -> Tensor:
    # The segments kernels gather rows through an order; expert rows are contiguous already.
    return torch.arange(rows, dtype=torch.int64, device=device)


def segment_outer(u: Tensor, v: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """``out (E, P, Q)`` float32 with ``out[e] = u[rows of e]^T v[rows of e]``: the factor gradients
    ``(dY B_e)^T X_e`` and ``dY_e^T (X_e A_e^T)``. The dot takes both tiles in the dtype of the
    16-bit one (fp32 when both are fp32)."""
    E = counts.shape[0]
    P, Q = u.shape[1], v.shape[1]
    out = new_output((E, P, Q), torch.float32, u.device)
    if E == 0 or P == 0 or Q == 0:
        return out
    data = u.dtype if u.dtype != torch.float32 else v.dtype
    block_p = pad_dim(P) if P <= 64 else 64
    block_q = pad_dim(Q) if Q <= _OUTER_BLOCK_Q else _OUTER_BLOCK_Q
    OUTER.launch(
        lambda meta: (E, triton.cdiv(P, block_p), triton.cdiv(Q, block_q)),
        u, v, out, starts, counts, P, Q,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1), out.stride(2),
        DOT_DTYPE=dot_dtype(data), PRECISION=dot_precision(data), BLOCK_P=block_p, BLOCK_Q=block_q,
    )
    return out
