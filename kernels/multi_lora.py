"""Multi-delta LoRA: every row of the batch uses its own delta (shrink ``x A^T``, expand ``t B^T``).

Two layouts of the same math (see ``odelta_fast/ops/multi_lora.py``):

* rows (BGMV style, decode): one program per row (times column blocks / reduction splits). A row
  is a vector, so the products are multiply-and-sum on CUDA cores instead of ``tl.dot``, which
  would waste 15 of its 16 tile rows on a single token.
* segments (SGMV style, prefill): each program gathers one block of the rows of one delta ``d``
  through the stably sorted row order, so dense ``tl.dot`` tiles run on the tensor cores. A block
  schedule built on the device (``common.segment_schedule``) gives ``cdiv(M, BLOCK_M) + D``
  programs instead of a program per delta per possible block; the few past the schedule exit.

The rank is padded inside the kernels to ``BLOCK_R = pad_dim(R)`` (a power of two >= 16, the
smallest ``tl.dot`` side on NVIDIA): masked loads give zeros, so padding adds nothing. Ids outside
``[0, D)`` (``-1``: backbone only) select no delta: shrink leaves zeros, expand leaves ``y`` alone,
and no load uses them as an address. The shrink writes a float32 ``t`` (zero-initialised,
rows without a delta are never written); the expand reads ``y``, adds in fp32, rounds once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .common import Tuning, deterministic, dot_dtype, dot_precision, num_sms, pad_dim, segment_schedule

# ============================================================================ kernels


@triton.jit
def _shrink_rows_kernel(
    x_ptr, a_ptr, ids_ptr, t_ptr,
    K, R, D,
    stride_xm, stride_xk, stride_ad, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    SPLIT_K: tl.constexpr, PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[i] (+)= x[i, k-slice] A[d]^T for row i = program_id(0), reduction split program_id(1)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    d = tl.load(ids_ptr + row).to(tl.int64)
    valid = (d >= 0) & (d < D)
    d = tl.where(valid, d, 0)
    # A row without a delta runs its loop zero times: it reads neither x nor any A.
    k_end = tl.where(valid, K, 0)
    offs_r = tl.arange(0, BLOCK_R)
    rr = offs_r.to(tl.int64)
    mask_r = offs_r < R
    store_r = offs_r < tl.where(valid, R, 0)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(split * BLOCK_K, k_end, SPLIT_K * BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        rk = offs_k.to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(x_ptr + row * stride_xm + rk * stride_xk, mask=mask_k, other=0.0).to(tl.float32)
        a = tl.load(a_ptr + d * stride_ad + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    if SPLIT_K == 1 or PARTIALS:
        # Partial sums (one (M, R) slab per split) are added by torch in a fixed order.
        tl.store(t_ptr + split.to(tl.int64) * stride_ts + row * stride_tm + rr * stride_tr, acc, mask=store_r)
    else:
        tl.atomic_add(t_ptr + row * stride_tm + rr * stride_tr, acc, mask=store_r, sem="relaxed")


@triton.jit
def _expand_rows_kernel(
    y_ptr, t_ptr, b_ptr, ids_ptr, scal_ptr,
    N, R, D,
    stride_ym, stride_yn, stride_tm, stride_tr, stride_bd, stride_bn, stride_br,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[i, n-block] += s[d] * t[i] B[d, n-block]^T for row i = program_id(0)."""
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.load(ids_ptr + row).to(tl.int64)
    valid = (d >= 0) & (d < D)
    d = tl.where(valid, d, 0)
    offs_r = tl.arange(0, BLOCK_R)
    rr = offs_r.to(tl.int64)
    # Bounds of zero for a row without a delta: every access is masked off.
    mask_r = offs_r < tl.where(valid, R, 0)
    mask_n = offs_n < tl.where(valid, N, 0)
    t = tl.load(t_ptr + row * stride_tm + rr * stride_tr, mask=mask_r, other=0.0)
    b = tl.load(b_ptr + d * stride_bd + offs_n.to(tl.int64)[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)
    s = tl.load(scal_ptr + d)
    update = tl.sum(b * t[None, :], axis=1) * s
    y_ptrs = y_ptr + row * stride_ym + offs_n.to(tl.int64) * stride_yn
    y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptrs, (y + update).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _shrink_segments_kernel(
    x_ptr, a_ptr, order_ptr, starts_ptr, counts_ptr, bseg_ptr, brow_ptr, t_ptr,
    K, R,
    stride_xm, stride_xk, stride_ad, stride_ar, stride_ak, stride_tm, stride_tr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """t[rows] = x[rows] A[d]^T for one block of delta d's rows (the block schedule's program_id(0))."""
    pid = tl.program_id(0)
    seg = tl.load(bseg_ptr + pid)
    if seg >= 0:
        d = seg.to(tl.int64)
        m0 = tl.load(brow_ptr + pid)
        start = tl.load(starts_ptr + d)
        count = tl.load(counts_ptr + d)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
        offs_r = tl.arange(0, BLOCK_R)
        rr = offs_r.to(tl.int64)
        mask_r = offs_r < R
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            rk = offs_k.to(tl.int64)
            mask_k = offs_k < K
            x = tl.load(x_ptr + rows[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
            a = tl.load(a_ptr + d * stride_ad + rk[:, None] * stride_ak + rr[None, :] * stride_ar,
                        mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            acc = tl.dot(x, a, acc, input_precision=PRECISION)
        tl.store(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr, acc,
                 mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _expand_segments_kernel(
    y_ptr, t_ptr, b_ptr, order_ptr, starts_ptr, counts_ptr, bseg_ptr, brow_ptr, scal_ptr,
    N, R,
    stride_ym, stride_yn, stride_tm, stride_tr, stride_bd, stride_bn, stride_br,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """y[rows, n-block] += s[d] t[rows] B[d, n-block]^T; program (scheduled row block of delta d,
    column block)."""
    pid = tl.program_id(0)
    seg = tl.load(bseg_ptr + pid)
    if seg >= 0:
        d = seg.to(tl.int64)
        m0 = tl.load(brow_ptr + pid)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        start = tl.load(starts_ptr + d)
        count = tl.load(counts_ptr + d)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < count
        rows = tl.load(order_ptr + start + offs_m, mask=mask_m, other=0)
        offs_r = tl.arange(0, BLOCK_R)
        rr = offs_r.to(tl.int64)
        mask_r = offs_r < R
        mask_n = offs_n < N
        # t is fp32; the dot takes it in the weights' dtype (16-bit tensor-core inputs, fp32 accumulate).
        t = tl.load(t_ptr + rows[:, None] * stride_tm + rr[None, :] * stride_tr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        bt = tl.load(b_ptr + d * stride_bd + rr[:, None] * stride_br + offs_n.to(tl.int64)[None, :] * stride_bn,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        update = tl.dot(t, bt, input_precision=PRECISION) * tl.load(scal_ptr + d)
        mask = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n.to(tl.int64)[None, :] * stride_yn
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + update).to(y_ptr.dtype.element_ty), mask=mask)


# ============================================================================ launch configurations

# Reduction tile of the per-row shrink: 16-byte loads for 8 x 16-bit lanes across a warp's 32
# threads = 256 elements; the interpreter pays per iteration, so it gets the whole row at once.
SHRINK_ROWS = Tuning("multi_lora_shrink_rows", _shrink_rows_kernel,
                     [triton.Config({"BLOCK_K": 256}, num_warps=4)],
                     interpreter=triton.Config({"BLOCK_K": 512}, num_warps=4))
# Column tile of the per-row expand: each program reads BLOCK_N x R of B (8 KB at R = 16, bf16).
EXPAND_ROWS = Tuning("multi_lora_expand_rows", _expand_rows_kernel, [triton.Config({"BLOCK_N": 256}, num_warps=4)])
# Segment tiles: 16-row blocks (the tl.dot minimum) waste least when a delta owns few rows.
SHRINK_SEGMENTS = Tuning("multi_lora_shrink_segments", _shrink_segments_kernel,
                         [triton.Config({"BLOCK_M": 16, "BLOCK_K": 128}, num_warps=4)],
                         interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4))
EXPAND_SEGMENTS = Tuning("multi_lora_expand_segments", _expand_segments_kernel,
                         [triton.Config({"BLOCK_M": 16, "BLOCK_N": 128}, num_warps=4)],
                         interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=4))


# ============================================================================ host launchers

def _split_k(M: int, K: int, device: torch.device, requested: int) -> int:
    """Reduction splits for the per-row shrink: enough programs for ~2 waves of SMs when the batch
    has few rows (decode: 64 rows would occupy under half of an H100's 132 SMs)."""
    k_blocks = triton.cdiv(K, SHRINK_ROWS.config().kwargs["BLOCK_K"])
    if requested > 0:
        return max(1, min(requested, k_blocks))
    if device.type != "cuda":
        return 1
    return max(1, min(k_blocks, (2 * num_sms(device)) // max(M, 1)))


@triton_op("odelta_fast::multi_lora_shrink_rows_triton", mutates_args=())
def shrink_rows(x: Tensor, stacked_a: Tensor, ids: Tensor, split_k: int) -> Tensor:
    """``t (M, R)`` float32 with ``t[i] = x[i] A[ids[i]]^T``; ``split_k`` 0 picks one."""
    M, K = x.shape
    D, R, _ = stacked_a.shape
    splits = _split_k(M, K, x.device, split_k)
    # Deterministic mode: one (M, R) slab per split, summed by torch, instead of atomics into t.
    partials = splits > 1 and deterministic()
    t = torch.zeros((splits if partials else 1, M, R), dtype=torch.float32, device=x.device)
    SHRINK_ROWS.launch(
        lambda meta: (M, splits),
        x, stacked_a, ids, t, K, R, D,
        x.stride(0), x.stride(1), stacked_a.stride(0), stacked_a.stride(1), stacked_a.stride(2),
        t.stride(0), t.stride(1), t.stride(2),
        SPLIT_K=splits, PARTIALS=partials, BLOCK_R=pad_dim(R),
    )
    return t.sum(0) if partials else t[0]


@triton_op("odelta_fast::multi_lora_expand_rows_triton", mutates_args={"y"})
def expand_rows(y: Tensor, t: Tensor, stacked_b: Tensor, ids: Tensor, scalings: Tensor) -> None:
    """``y[i] += s[ids[i]] t[i] B[ids[i]]^T`` in place."""
    M, N = y.shape
    D, _, R = stacked_b.shape
    EXPAND_ROWS.launch(
        lambda meta: (M, triton.cdiv(N, meta["BLOCK_N"])),
        y, t, stacked_b, ids, scalings, N, R, D,
        y.stride(0), y.stride(1), t.stride(0), t.stride(1),
        stacked_b.stride(0), stacked_b.stride(1), stacked_b.stride(2),
        BLOCK_R=pad_dim(R),
    )


@triton_op("odelta_fast::multi_lora_shrink_segments_triton", mutates_args=())
def shrink_segments(x: Tensor, stacked_a: Tensor, order: Tensor, starts: Tensor, counts: Tensor) -> Tensor:
    """Like ``shrink_rows`` with rows grouped by delta (``ops.multi_lora.sort_segments``)."""
    M, K = x.shape
    D, R, _ = stacked_a.shape
    t = torch.zeros((M, R), dtype=torch.float32, device=x.device)
    if M == 0:
        return t
    bseg, brow, blocks = segment_schedule(counts, M, SHRINK_SEGMENTS.config().kwargs["BLOCK_M"])
    SHRINK_SEGMENTS.launch(
        lambda meta: (blocks,),
        x, stacked_a, order, starts, counts, bseg, brow, t, K, R,
        x.stride(0), x.stride(1), stacked_a.stride(0), stacked_a.stride(1), stacked_a.stride(2),
        t.stride(0), t.stride(1),
        DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype), BLOCK_R=pad_dim(R),
    )
    return t


@triton_op("odelta_fast::multi_lora_expand_segments_triton", mutates_args={"y"})
def expand_segments(y: Tensor, t: Tensor, stacked_b: Tensor, order: Tensor, starts: Tensor, counts: Tensor,
                    scalings: Tensor) -> None:
    """Like ``expand_rows`` with rows grouped by delta."""
    M, N = y.shape
    D, _, R = stacked_b.shape
    if M == 0:
        return
    bseg, brow, blocks = segment_schedule(counts, M, EXPAND_SEGMENTS.config().kwargs["BLOCK_M"])
    EXPAND_SEGMENTS.launch(
        lambda meta: (blocks, triton.cdiv(N, meta["BLOCK_N"])),
        y, t, stacked_b, order, starts, counts, bseg, brow, scalings, N, R,
        y.stride(0), y.stride(1), t.stride(0), t.stride(1),
        stacked_b.stride(0), stacked_b.stride(1), stacked_b.stride(2),
        DOT_DTYPE=dot_dtype(y.dtype), PRECISION=dot_precision(y.dtype), BLOCK_R=pad_dim(R),
    )
