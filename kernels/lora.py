"""Fused LoRA linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` and its backward.

Forward, two launches:
  1. shrink   ``xa = drop(x) A^T``           (M x r; the only thing saved besides x)
  2. GEMM     ``y = x W^T`` whose epilogue adds ``s * xa B^T`` and the bias; y is written once.
Backward, three launches (W is frozen: no dW unless it requires grad, then torch computes it):
  1. dY pass  ``g = dY B`` (M x r) and, from the same dY tiles, ``dB = s dY^T xa`` and ``db = sum dY``
              (atomics into fp32 buffers across row blocks)
  2. GEMM     ``dX = dY W`` whose epilogue adds ``s (g A) * mask/(1-p)``
  3. ``dA = s g^T drop(x)``                  (mask regenerated from the seed)
The dropout mask never exists in memory: every kernel that needs it draws it with philox from the
seed and the element offset (see ``common.dropout_keep``).

Grouped shrink (q/k/v sharing one input): ``lora_shrink_grouped`` computes ``drop_g(x) A_g^T`` for
every group in one launch; group g draws its mask from ``seed + g``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import (
    INTERPRET, dot_dtype, dot_precision, dropout_keep, m_bucket, new_output, num_sms, pad_dim, swizzle_2d,
)

# ============================================================================ kernels


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ag, stride_ar, stride_ak, stride_og, stride_om, stride_or,
    p, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[g] = drop_g(x) @ A[g]^T for row block program_id(0) and group program_id(1)."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr) + g
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * dropout_keep(seed, offs_m, offs_k, K, p, inv_keep)).to(DOT_DTYPE)
        a = tl.load(a_ptr + g * stride_ag + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                    mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    tl.store(out_ptr + g * stride_og + rm[:, None] * stride_om + offs_r[None, :] * stride_or,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_am, stride_ar, stride_bn, stride_br,
    stride_ym, stride_yn,
    scaling, M_BUCKET,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x W^T (+ bias) + s * xa B^T, the low-rank term and bias in the epilogue."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = swizzle_2d(tl.program_id(0), num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + rn[None, :] * stride_wn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    # Epilogue: the rank-r expand rides on the accumulator still in registers.
    mask_r = offs_r < R
    xa = tl.load(xa_ptr + rm[:, None] * stride_am + offs_r[None, :] * stride_ar,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    bt = tl.load(b_ptr + offs_r[:, None] * stride_br + rn[None, :] * stride_bn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
    acc += scaling * tl.dot(xa, bt, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_dy_kernel(
    dy_ptr, b_ptr, xa_ptr, g_ptr, db_ptr, dbias_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_am, stride_ar, stride_gm, stride_gr,
    scaling,
    NEED_G: tl.constexpr, NEED_DB: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over dY for a row block: g = dY B (stored), and the row block's share of
    dB = s dY^T xa and db = sum_m dY added atomically into fp32 buffers (N x R and N)."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_r = offs_r < R
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if NEED_DB:
        xa = tl.load(xa_ptr + rm[:, None] * stride_am + offs_r[None, :] * stride_ar,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        if NEED_G:
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:
            part = tl.dot(tl.trans(dy), xa, input_precision=PRECISION) * scaling
            tl.atomic_add(db_ptr + offs_n[:, None] * BLOCK_R + offs_r[None, :], part,
                          mask=mask_n[:, None] & mask_r[None, :])
        if NEED_BIAS:
            tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n)
    if NEED_G:
        tl.store(g_ptr + rm[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                 g.to(g_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, dx_ptr, seed_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_dxm, stride_dxk,
    scaling, p, inv_keep, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX = dY W + s * (g A) * mask/(1-p); BLOCK_K tiles the output columns, BLOCK_N the reduction."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = swizzle_2d(tl.program_id(0), num_m, num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        rn = offs_n.to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptr + rn[:, None] * stride_wn + offs_k[None, :] * stride_wk,
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    mask_r = offs_r < R
    g = tl.load(g_ptr + rm[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
    low = tl.dot(g, a, input_precision=PRECISION)
    if HAS_DROPOUT:
        low = low * dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p, inv_keep)
    acc += scaling * low
    tl.store(dx_ptr + rm[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _lora_bwd_da_kernel(
    x_ptr, g_ptr, da_ptr, seed_ptr,
    M, K, R, rows_per_split,
    stride_xm, stride_xk, stride_gm, stride_gr,
    scaling, p, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dA[:, k-block] += s * g[rows]^T drop(x)[rows, k-block] for the row range of program_id(1)
    (split over M so a long token axis still fills the GPU), atomically into an fp32 R x K buffer."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        mask_m = offs_m < m_end
        x = tl.load(x_ptr + rm[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            x = (x.to(tl.float32) * dropout_keep(seed, offs_m, offs_k, K, p, inv_keep)).to(DOT_DTYPE)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(g), x, acc, input_precision=PRECISION)
    tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], acc * scaling,
                  mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _dropout_keep_kernel(seed_ptr, out_ptr, M, K, p, inv_keep, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Materialises the multiplier the other kernels draw, for tests and debugging only."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p, inv_keep)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep,
             mask=(offs_m < M)[:, None] & (offs_k < K)[None, :])


# ============================================================================ autotuned GEMMs

def _gemm_configs():
    if INTERPRET:
        # One config (autotune with several needs a GPU driver to benchmark); big tiles because the
        # interpreter costs ~5 ms per tile iteration whatever the tile size.
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=4)]
    return [
        # Large-M, H100-class: 128x256 tiles keep the tensor cores fed at M >= 4096.
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        # Small M (decode, short batches): a 16-row tile (tl.dot minimum) wastes no rows.
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 1}, num_warps=4, num_stages=4),
    ]


def _prune_small_m(configs, named_args, **kwargs):
    # Tiles taller than the bucket only waste rows; keep at least one config.
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or configs[-1:]


_AUTOTUNE = dict(
    key=["M_BUCKET", "N", "K", "R"],
    prune_configs_by=None if INTERPRET else {"early_config_prune": _prune_small_m},
)

_lora_fwd = triton.autotune(configs=_gemm_configs(), **_AUTOTUNE)(_lora_fwd_kernel)
_lora_bwd_dx = triton.autotune(configs=_gemm_configs(), **_AUTOTUNE)(_lora_bwd_dx_kernel)

# Non-GEMM kernels use fixed tiles: they are bandwidth-bound passes and some accumulate with atomics,
# which autotuning would replay.
_PASS_BLOCK_M = 64  # rows per program of the shrink / dY pass / dA loop
_PASS_BLOCK_N = 128  # reduction tile of the dY pass
_PASS_BLOCK_K = 128  # reduction tile of the shrink, column tile of dA
# 2 pipeline stages: these passes are bandwidth-bound, and 3 stages of fp32 tiles would need more
# shared memory than an A100 (164 KB) has.
_PASS_STAGES = 2


# ============================================================================ host launchers

def _inv_keep(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


def lora_shrink_into(out: Tensor, x: Tensor, a: Tensor, p: float, seed: Tensor) -> None:
    """out[g] = drop_g(x) @ a[g]^T; ``x (M, K)``, ``a (G, R, K)``, ``out (G, M, R)``."""
    M, K = x.shape
    G, R, _ = a.shape
    block_r = pad_dim(R)
    grid = (triton.cdiv(M, _PASS_BLOCK_M), G)
    wrap_triton(_lora_shrink_kernel)[grid](
        x, a, out, seed, M, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        p, _inv_keep(p),
        HAS_DROPOUT=p > 0.0, DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_M=_PASS_BLOCK_M, BLOCK_K=_PASS_BLOCK_K, BLOCK_R=block_r,
        num_warps=4, num_stages=_PASS_STAGES,
    )


def _gemm_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


@triton_op("odelta_fast::lora_linear_triton_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """``(y, xa)`` for 2-D ``x (M, K)``; ``xa = drop(x) A^T`` is what backward needs besides x."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    xa = new_output((1, M, R), x.dtype, x.device)
    lora_shrink_into(xa, x, lora_a.unsqueeze(0), dropout_p, seed)
    xa = xa[0]
    y = new_output((M, N), x.dtype, x.device)
    wrap_triton(_lora_fwd)[_gemm_grid(M, N)](
        x, weight, bias if bias is not None else x, xa, lora_b, y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xa.stride(0), xa.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1),
        scaling, m_bucket(M),
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_R=pad_dim(R),
    )
    return y, xa


@triton_op("odelta_fast::lora_linear_triton_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xa: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, need_x: bool, need_bias: bool, need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_bias, grad_a, grad_b)``; a gradient not asked for comes back empty."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dev, dtype = x.device, x.dtype
    block_r = pad_dim(R)
    dot_t, prec = dot_dtype(dtype), dot_precision(dtype)
    empty = grad_y.new_empty(0)
    need_g = need_x or need_lora
    g = new_output((M, R), dtype, dev) if need_g else empty
    db_acc = torch.zeros((N, block_r), dtype=torch.float32, device=dev) if need_lora else empty
    dbias_acc = torch.zeros((N,), dtype=torch.float32, device=dev) if need_bias else empty
    if need_g or need_bias:
        wrap_triton(_lora_bwd_dy_kernel)[(triton.cdiv(M, _PASS_BLOCK_M),)](
            grad_y, lora_b, xa, g if need_g else grad_y, db_acc if need_lora else grad_y,
            dbias_acc if need_bias else grad_y,
            M, N, R,
            grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
            xa.stride(0), xa.stride(1), g.stride(0) if need_g else 0, g.stride(1) if need_g else 0,
            scaling,
            NEED_G=need_g, NEED_DB=need_lora, NEED_BIAS=need_bias, DOT_DTYPE=dot_t, PRECISION=prec,
            BLOCK_M=_PASS_BLOCK_M, BLOCK_N=_PASS_BLOCK_N, BLOCK_R=block_r, num_warps=4, num_stages=_PASS_STAGES,
        )
    # Distinct empties: a custom op's outputs may not alias each other.
    grad_x, grad_bias, grad_a, grad_b = (grad_y.new_empty(0) for _ in range(4))
    if need_x:
        grad_x = new_output((M, K), dtype, dev)
        wrap_triton(_lora_bwd_dx)[_gemm_grid(M, K)](
            grad_y, weight, g, lora_a, grad_x, seed,
            M, N, K, R,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), g.stride(0), g.stride(1),
            lora_a.stride(0), lora_a.stride(1), grad_x.stride(0), grad_x.stride(1),
            scaling, dropout_p, _inv_keep(dropout_p), m_bucket(M),
            HAS_DROPOUT=dropout_p > 0.0, DOT_DTYPE=dot_t, PRECISION=prec, BLOCK_R=block_r,
        )
    if need_lora:
        da_acc = torch.zeros((R, K), dtype=torch.float32, device=dev)
        k_blocks = triton.cdiv(K, _PASS_BLOCK_K)
        m_blocks = triton.cdiv(M, _PASS_BLOCK_M)
        # Split the token axis so k_blocks x splits covers ~2 waves of SMs (1 under the interpreter).
        splits = max(1, min(m_blocks, (2 * num_sms(dev)) // k_blocks)) if dev.type == "cuda" else 1
        rows = triton.cdiv(m_blocks, splits) * _PASS_BLOCK_M
        splits = triton.cdiv(M, rows)
        wrap_triton(_lora_bwd_da_kernel)[(k_blocks, splits)](
            x, g, da_acc, seed, M, K, R, rows,
            x.stride(0), x.stride(1), g.stride(0), g.stride(1),
            scaling, dropout_p, _inv_keep(dropout_p),
            HAS_DROPOUT=dropout_p > 0.0, DOT_DTYPE=dot_t, PRECISION=prec,
            BLOCK_M=_PASS_BLOCK_M, BLOCK_K=_PASS_BLOCK_K, BLOCK_R=block_r, num_warps=4, num_stages=_PASS_STAGES,
        )
        grad_a = da_acc.to(lora_a.dtype)
        grad_b = db_acc[:, :R].to(lora_b.dtype)
    if need_bias:
        grad_bias = dbias_acc.to(dtype)
    return grad_x, grad_bias, grad_a, grad_b


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    # Saved: x (the caller holds it anyway), xa (M x r), the seed; parameters are not copies.
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _backward(ctx, grad_y, _grad_xa):
    x, weight, lora_a, lora_b, xa, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_bias, grad_a, grad_b = lora_linear_bwd(
        grad_y, x, weight, lora_a, lora_b, xa, ctx.scaling, ctx.dropout_p, seed,
        need[0], need[2], need[3] or need[4],
    )
    # The base weight is frozen in LoRA; if a caller trains it anyway, torch computes dW.
    grad_w = grad_y.t() @ x if need[1] else None
    return (grad_x if need[0] else None, grad_w, grad_bias if need[2] else None,
            grad_a if need[3] else None, grad_b if need[4] else None, None, None, None)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


def lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                scaling: float, dropout_p: float, seed: Tensor) -> Tensor:
    """Differentiable fused LoRA linear over 2-D ``x``; ``seed`` is an int64 tensor of one element
    on x's device (ignored when ``dropout_p == 0``)."""
    return lora_linear_fwd(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)[0]


# ============================================================================ grouped shrink

@triton_op("odelta_fast::lora_shrink_grouped_triton", mutates_args=())
def lora_shrink_grouped_fwd(x: Tensor, lora_a_stacked: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """``out[g] = drop_g(x) @ A[g]^T`` for ``lora_a_stacked (G, R, K)``: one launch, x read once per
    row block for all groups' tiles (the groups run as grid axis 1 over the same x rows)."""
    M, _ = x.shape
    G, R, _ = lora_a_stacked.shape
    out = new_output((G, M, R), x.dtype, x.device)
    lora_shrink_into(out, x, lora_a_stacked, dropout_p, seed)
    return out


# ============================================================================ dropout mask

def dropout_keep_scale(seed, shape, p: float, device=None) -> Tensor:
    """The fp32 multiplier (0 or 1/(1-p)) the kernels apply for ``seed`` over an input of ``shape``
    (leading dimensions flattened into M, as the op does): feed it to ``lora_linear_reference``."""
    if not isinstance(seed, Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    device = seed.device if device is None else torch.device(device)
    seed = seed.to(device=device, dtype=torch.int64).reshape(1)
    K = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    out = torch.empty((M, K), dtype=torch.float32, device=device)
    if p == 0.0:
        return out.fill_(1.0).reshape(shape)
    grid = (triton.cdiv(M, 64), triton.cdiv(K, 128))
    _dropout_keep_kernel[grid](seed, out, M, K, p, _inv_keep(p), BLOCK_M=64, BLOCK_K=128)
    return out.reshape(shape)
