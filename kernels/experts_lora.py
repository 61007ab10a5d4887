"""LoRA on MoE experts: grouped shrink / expand over rows sorted by expert, and the per-expert
factor gradients (``odelta_fast/ops/experts_lora.py`` owns the math and the reference).

The rows of expert ``e`` are ``starts[e] : starts[e] + counts[e]`` (contiguous: the op gathers them
in expert order, as the multi-delta segments layout does through its sort). Programs follow a
block schedule computed on the device: block ``b`` serves expert ``block_expert[b]`` from row
``block_row[b]`` of its segment, so the grid holds ``cdiv(S, BLOCK_M) + E`` programs instead of
``cdiv(S, BLOCK_M) x E`` (a program per expert per possible block, as the multi-delta kernels'
grid has, would be 65k programs at 128 experts and 8k rows); programs past the schedule exit.
Nothing reads the counts on the host, so no synchronisation.

Ranks are padded inside to a power of two >= 16 (``tl.dot``'s minimum); masked loads give zeros.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .common import Tuning, dot_dtype, dot_precision, new_output, pad_dim, segment_schedule

# Factor gradients: the widest column tile of ``segment_outer`` (narrower outputs get their padded width).
_OUTER_BLOCK_Q = 64


@triton.jit
def _shrink_kernel(
    x_ptr, a_ptr, t_ptr, starts_ptr, counts_ptr, bexp_ptr, brow_ptr,
    K, R,
    stride_xm, stride_xk, stride_ae, stride_ar, stride_ak, stride_tm, stride_tr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[rows] = x[rows] A[e]^T for one block of expert e's rows."""
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid)
    if e >= 0:
        e64 = e.to(tl.int64)
        m0 = tl.load(brow_ptr + pid)
        start = tl.load(starts_ptr + e64)
        count = tl.load(counts_ptr + e64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = (start + offs_m).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            a = tl.load(a_ptr + e64 * stride_ae + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        tl.store(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr, acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_kernel(
    y_ptr, t_ptr, b_ptr, starts_ptr, counts_ptr, bexp_ptr, brow_ptr, scaling,
    N, R,
    stride_ym, stride_yn, stride_tm, stride_tr, stride_be, stride_bn, stride_br,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[rows, n-block] += s t[rows] B[e, n-block]^T; program (block, column block)."""
    pid = tl.program_id(0)
    e = tl.load(bexp_ptr + pid)
    if e >= 0:
        e64 = e.to(tl.int64)
        m0 = tl.load(brow_ptr + pid)
        start = tl.load(starts_ptr + e64)
        count = tl.load(counts_ptr + e64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = (start + offs_m).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        # t is fp32; the dot takes it in the data dtype (16-bit tensor-core inputs, fp32 accumulate).
        t = tl.load(t_ptr + rows[:, None] * stride_tm + offs_r[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        bt = tl.load(b_ptr + e64 * stride_be + offs_r[:, None] * stride_br + offs_n.to(tl.int64)[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        update = tl.dot(t, bt, input_precision=PRECISION) * scaling
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + update).to(y_ptr.dtype.element_ty), mask=mask)


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
# 16-row blocks waste least when an expert owns few rows (4096 tokens x top-2 over 128 experts:
# 64 rows each on average); the interpreter pays per program, so it takes bigger blocks.
SHRINK = Tuning("experts_lora_shrink", _shrink_kernel, [triton.Config({"BLOCK_M": 16, "BLOCK_K": 64}, num_warps=4)],
                interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4))
EXPAND = Tuning("experts_lora_expand", _expand_kernel, [triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4)],
                interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4))
# Factor gradients: reduction over rows in chunks of BLOCK_M (the dot's K side).
OUTER = Tuning("experts_lora_outer", _outer_kernel, [triton.Config({"BLOCK_M": 32}, num_warps=4)])


# ============================================================================ launchers


def shrink(x: Tensor, a: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """``t (S, R)`` float32: ``t[rows of e] = x[rows of e] A[e]^T`` for ``a (E, R, K)`` (any strides);
    rows of no expert are zero."""
    S, K = x.shape
    R = a.shape[1]
    t = torch.zeros((S, R), dtype=torch.float32, device=x.device)
    if S == 0 or R == 0:
        return t
    bexp, brow, grid = segment_schedule(counts, S, SHRINK.config().kwargs["BLOCK_M"])
    SHRINK.launch(
        lambda meta: (grid,),
        x, a, t, starts, counts, bexp, brow, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), t.stride(0), t.stride(1),
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype), BLOCK_R=pad_dim(R),
    )
    return t


def expand_(y: Tensor, t: Tensor, b: Tensor, starts: Tensor, counts: Tensor, scaling: float) -> Tensor:
    """``y[rows of e] += scaling * t[rows of e] B[e]^T`` in place for ``b (E, N, R)`` (any strides)."""
    S, N = y.shape
    R = b.shape[2]
    if S == 0 or R == 0 or N == 0:
        return y
    bexp, brow, grid = segment_schedule(counts, S, EXPAND.config().kwargs["BLOCK_M"])
    EXPAND.launch(
        lambda meta: (grid, triton.cdiv(N, meta["BLOCK_N"])),
        y, t, b, starts, counts, bexp, brow, float(scaling), N, R,
        y.stride(0), y.stride(1), t.stride(0), t.stride(1), b.stride(0), b.stride(1), b.stride(2),
        DOT_DTYPE=dot_dtype(y.dtype), PRECISION=dot_precision(y.dtype), BLOCK_R=pad_dim(R),
    )
    return y


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
