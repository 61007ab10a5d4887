"""LoRA linear launchers: ``y = x W^T + b + s * (drop(x) A^T) B^T`` and its gradients, two paths.
The autograd around them (one for every path) lives in ``odelta_fast.ops.lora``; this module only
launches kernels.

*fused*: the Triton GEMMs carry the low-rank terms in their accumulators. Forward, two launches:
  1. shrink   ``xs = s drop(x) A^T``          (M x r, scaled), drawing the dropout mask once and
              storing it packed, 1 bit per element (M x K / 8 bytes)
  2. GEMM     ``y = x W^T`` accumulated onto ``xs B^T``, plus the bias; y is written once.
Backward, three launches (W is frozen: no dW unless it requires grad, then torch computes it):
  1. dY pass  ``gs = s/(1-p) dY B`` (M x r) and, from the same dY tiles, ``dB = dY^T xs`` and
              ``db = sum dY`` (relaxed atomics into fp32 buffers across row blocks; torch's own
              reductions instead in deterministic mode)
  2. GEMM     ``dX = dY W`` accumulated onto ``(gs A) * mask``
  3. ``dA = gs^T (x * mask)``                  (per-split partial sums, reduced in a fixed order)
The dropout mask is drawn with philox from the seed and the element offset (``common.draw_uniform``)
once, in the shrink; dX and dA read its bits (``common.load_keep``) instead of drawing it again, so
the three uses agree bit for bit and backward pays a byte load per element instead of a philox
round. Scaling and ``1/(1-p)`` are folded into
the rank-r operands, so each GEMM's low-rank term is one more ``tl.dot`` into its accumulator (no
second accumulator: a 128 x 256 fp32 tile already takes half the register file).

*persistent*: the fused path with both GEMMs on one persistent kernel (``grid = #SMs``, each program
walking output tiles) whose big operands move through TMA tensor descriptors, for Hopper and later;
an operand TMA cannot copy (fp32, rows not 16-byte multiples, a unit stride on the wrong side)
sends that GEMM to the pointer-based kernel (``tma_ready``).

*split*: cuBLAS runs the two big GEMMs; Triton runs the shrink, the dY pass and dA as above, and
writes the low-rank terms ``xs B^T + b`` and ``(gs A) * mask`` once each, which cuBLAS adds its GEMM
onto (beta = 1): one write and one read of M x N (M x K) more than fused, no Triton GEMM.

Grouped shrink (q/k/v sharing one input): ``lora_shrink_grouped`` computes ``drop_g(x) A_g^T`` for
every group in one launch; group g draws its mask from ``seed + g``.
"""
from __future__ import annotations

import contextvars
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .common import (
    INTERPRET, Tuning, deterministic, dot_dtype, dot_precision, draw_uniform, load_keep, m_bucket, new_output, num_sms,
    pack_keep, step64,
    pad_dim, swizzle_2d,
)

# ============================================================================ kernels


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, out_ptr, seed_ptr, bits_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_ag, stride_ar, stride_ak, stride_og, stride_om, stride_or, stride_bits,
    p, scale,
    HAS_DROPOUT: tl.constexpr, STORE_BITS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[g] = scale * drop_g(x) @ A[g]^T for row block program_id(0) and group program_id(1);
    with STORE_BITS the keep mask drawn here is written packed (1 bit per element) for backward."""
    pid_m = tl.program_id(0)
    g = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr) + g
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    a_ptrs = (a_ptr + g.to(tl.int64) * stride_ag + offs_k.to(tl.int64)[:, None] * stride_ak
              + offs_r.to(tl.int64)[None, :] * stride_ar)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            uniform = draw_uniform(seed, offs_m, k0, K, BLOCK_M, BLOCK_K)
            # A multiply, not tl.where: a select on the comparison makes the compiler move the
            # 1-bit mask between layouts through shared memory, which it then rejects.
            x = (x * tl.where(uniform >= p, 1.0, 0.0)).to(DOT_DTYPE)
            if STORE_BITS:
                offs_c = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_c.to(tl.int64)[None, :],
                         pack_keep(uniform, p, BLOCK_M, BLOCK_K), mask=mask_m[:, None] & (offs_c * 8 < K)[None, :])
        a = tl.load(a_ptrs, mask=mask_k[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
        x_ptrs += step64(BLOCK_K, stride_xk)
        a_ptrs += step64(BLOCK_K, stride_ak)
    out_ptrs = (out_ptr + g.to(tl.int64) * stride_og + offs_m.to(tl.int64)[:, None] * stride_om
                + offs_r.to(tl.int64)[None, :] * stride_or)
    tl.store(out_ptrs, (acc * scale).to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, xs_ptr, b_ptr, y_ptr,
    M, N, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sm, stride_sr, stride_bn, stride_br,
    stride_ym, stride_yn, stride_bias,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = xs B^T + x W^T (+ bias): output tile BLOCK_M x BLOCK_N, reduction over K by BLOCK_K."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = swizzle_2d(tl.program_id(0), num_m, num_n, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    # The low-rank term starts the accumulator: one accumulator, the expand is one more K-block.
    xs = tl.load(xs_ptr + rm[:, None] * stride_sm + offs_r.to(tl.int64)[None, :] * stride_sr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    bt = tl.load(b_ptr + offs_r.to(tl.int64)[:, None] * stride_br + rn[None, :] * stride_bn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
    acc = tl.dot(xs, bt, input_precision=PRECISION)
    x_ptrs = x_ptr + rm[:, None] * stride_xm + offs_k.to(tl.int64)[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k.to(tl.int64)[:, None] * stride_wk + rn[None, :] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += step64(BLOCK_K, stride_xk)
        w_ptrs += step64(BLOCK_K, stride_wk)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
             acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _lora_bwd_dy_kernel(
    dy_ptr, b_ptr, xs_ptr, g_ptr, db_ptr, dbias_ptr,
    M, N, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_sm, stride_sr, stride_gm, stride_gr,
    g_scale,
    NEED_G: tl.constexpr, NEED_DB: tl.constexpr, NEED_BIAS: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One pass over dY for a row block: gs = g_scale * dY B (stored), and the row block's share of
    dB = dY^T xs and db = sum_m dY added into fp32 buffers (N x BLOCK_R and N) with relaxed atomics.
    Each row block starts its sweep over N at a different column block, so concurrent programs add
    into different addresses instead of queueing on the same ones."""
    pid_m = tl.program_id(0)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_r = offs_r < R
    g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if NEED_DB:
        xs = tl.load(xs_ptr + rm[:, None] * stride_sm + offs_r.to(tl.int64)[None, :] * stride_sr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    num_n = tl.cdiv(N, BLOCK_N)
    for step in range(0, num_n):
        n_block = (step + pid_m) % num_n
        offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
        rn = offs_n.to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        if NEED_G:
            b = tl.load(b_ptr + rn[:, None] * stride_bn + offs_r.to(tl.int64)[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
            g = tl.dot(dy, b, g, input_precision=PRECISION)
        if NEED_DB:
            part = tl.dot(tl.trans(dy), xs, input_precision=PRECISION)
            tl.atomic_add(db_ptr + rn[:, None] * BLOCK_R + offs_r[None, :], part,
                          mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
        if NEED_BIAS:
            tl.atomic_add(dbias_ptr + rn, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n, sem="relaxed")
    if NEED_G:
        tl.store(g_ptr + rm[:, None] * stride_gm + offs_r.to(tl.int64)[None, :] * stride_gr,
                 (g * g_scale).to(g_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_r[None, :])


@triton.jit
def _lora_bwd_dx_kernel(
    dy_ptr, w_ptr, gs_ptr, a_ptr, dx_ptr, bits_ptr,
    M, N, K, R,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_dxm, stride_dxk, stride_bits,
    M_BUCKET,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX = (gs A) * mask + dY W: output tile BLOCK_M x BLOCK_K (columns of x), reduction over N by
    BLOCK_N. The masked low-rank term starts the accumulator, so no second one is needed."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_k = tl.cdiv(K, BLOCK_K)
    pid_m, pid_k = swizzle_2d(tl.program_id(0), num_m, num_k, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    rk = offs_k.to(tl.int64)
    mask_m = offs_m < M
    mask_k = offs_k < K
    mask_r = offs_r < R
    gs = tl.load(gs_ptr + rm[:, None] * stride_gm + offs_r.to(tl.int64)[None, :] * stride_gr,
                 mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    a = tl.load(a_ptr + offs_r.to(tl.int64)[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
    acc = tl.dot(gs, a, input_precision=PRECISION)
    if HAS_DROPOUT:
        acc = tl.where(load_keep(bits_ptr, stride_bits, offs_m, offs_k, mask_m[:, None] & mask_k[None, :]), acc, 0.0)
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + rk[None, :] * stride_wk
    for n0 in range(0, N, BLOCK_N):
        mask_n = offs_n < N - n0
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
        dy_ptrs += step64(BLOCK_N, stride_dyn)
        w_ptrs += step64(BLOCK_N, stride_wn)
    tl.store(dx_ptr + rm[:, None] * stride_dxm + rk[None, :] * stride_dxk,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _lora_bwd_da_kernel(
    x_ptr, gs_ptr, part_ptr, bits_ptr,
    M, K, R, rows_per_split,
    stride_xm, stride_xk, stride_gm, stride_gr, stride_bits,
    HAS_DROPOUT: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """part[split, :, k-block] = gs[rows]^T (x * mask)[rows, k-block] over the row range of split
    program_id(1): the token axis is split so a long M still fills the GPU, and the partial sums
    are added by torch in a fixed order (no atomics, identical run to run)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rk = offs_k.to(tl.int64)
    mask_k = offs_k < K
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        mask_m = offs_m < m_end
        mask_mk = mask_m[:, None] & mask_k[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=mask_mk, other=0.0).to(DOT_DTYPE)
        if HAS_DROPOUT:
            x = tl.where(load_keep(bits_ptr, stride_bits, offs_m, offs_k, mask_mk), x, 0.0).to(DOT_DTYPE)
        gs = tl.load(gs_ptr + rm[:, None] * stride_gm + offs_r.to(tl.int64)[None, :] * stride_gr,
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(tl.trans(gs), x, acc, input_precision=PRECISION)
    tl.store(part_ptr + pid_s.to(tl.int64) * BLOCK_R * K + offs_r.to(tl.int64)[:, None] * K + rk[None, :], acc,
             mask=mask_r[:, None] & mask_k[None, :])


@triton.jit
def _dropout_bits_kernel(seed_ptr, bits_ptr, M, K, stride_bits, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The packed keep mask the shrink draws for ``seed``, alone (tests, and the grouped shrink's
    backward, which regenerates instead of storing)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    uniform = draw_uniform(tl.load(seed_ptr), offs_m, tl.program_id(1) * BLOCK_K, K, BLOCK_M, BLOCK_K)
    tl.store(bits_ptr + offs_m.to(tl.int64)[:, None] * stride_bits + offs_c.to(tl.int64)[None, :],
             pack_keep(uniform, p, BLOCK_M, BLOCK_K), mask=(offs_m < M)[:, None] & (offs_c * 8 < K)[None, :])


@triton.jit
def _lowrank_expand_kernel(
    u_ptr, v_ptr, bias_ptr, bits_ptr, out_ptr,
    M, N, R,
    stride_um, stride_ur, stride_vn, stride_vr, stride_bias, stride_bits, stride_om, stride_on,
    M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out = (u v^T) * mask + bias for u (M x r), v (N x r): the split path's low-rank terms, written
    once for cuBLAS to add its GEMM onto (beta = 1). Tile BLOCK_M x BLOCK_N, one rank-r dot."""
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // num_n
    pid_n = tl.program_id(0) % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rr = offs_r.to(tl.int64)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask_r = offs_r < R
    u = tl.load(u_ptr + rm[:, None] * stride_um + rr[None, :] * stride_ur,
                mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    vt = tl.load(v_ptr + rr[:, None] * stride_vr + rn[None, :] * stride_vn,
                 mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
    out = tl.dot(u, vt, input_precision=PRECISION)
    mask_mn = mask_m[:, None] & mask_n[None, :]
    if HAS_MASK:
        out = tl.where(load_keep(bits_ptr, stride_bits, offs_m, offs_n, mask_mn), out, 0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + rn * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on, out.to(out_ptr.dtype.element_ty),
             mask=mask_mn)


@triton.jit
def _lowrank_gemm_persistent_kernel(
    a_ptr, w_ptr, u_ptr, v_ptr, bias_ptr, bits_ptr, out_ptr,
    M, C, RED, R,
    stride_am, stride_w, stride_um, stride_ur, stride_vr, stride_vc, stride_om, stride_bias, stride_bits,
    M_BUCKET,
    W_ROWS_ARE_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_RED: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """``out = (u v) * mask + a w (+ bias)`` over M x C, reducing over RED: the persistent path's GEMM,
    forward (a = x, w = W with its rows the output columns, u v = xs B^T) and dX (a = dY, w = W with
    its rows the reduction, u v = gs A, masked). Each program walks output tiles
    ``program_id, program_id + num_programs, ...`` (one program per SM: no tail wave, and the next
    tile's loads overlap this tile's epilogue); a, w and out move through TMA tensor descriptors
    (bulk copies with hardware bounds handling, no address arithmetic in registers)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, RED], strides=[stride_am, 1],
                                       block_shape=[BLOCK_M, BLOCK_RED])
    if W_ROWS_ARE_COLS:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[C, RED], strides=[stride_w, 1],
                                           block_shape=[BLOCK_C, BLOCK_RED])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[RED, C], strides=[stride_w, 1],
                                           block_shape=[BLOCK_RED, BLOCK_C])
    out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, C], strides=[stride_om, 1],
                                         block_shape=[BLOCK_M, BLOCK_C])
    num_m = tl.cdiv(M, BLOCK_M)
    num_c = tl.cdiv(C, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    for tile in tl.range(tl.program_id(0), num_m * num_c, tl.num_programs(0), flatten=True):
        pid_m, pid_c = swizzle_2d(tile, num_m, num_c, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < M
        mask_c = offs_c < C
        # The low-rank term starts the accumulator, as in the pointer-based kernels.
        u = tl.load(u_ptr + offs_m.to(tl.int64)[:, None] * stride_um + offs_r.to(tl.int64)[None, :] * stride_ur,
                    mask=mask_m[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
        v = tl.load(v_ptr + offs_r.to(tl.int64)[:, None] * stride_vr + offs_c.to(tl.int64)[None, :] * stride_vc,
                    mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(DOT_DTYPE)
        acc = tl.dot(u, v, input_precision=PRECISION)
        if HAS_MASK:
            acc = tl.where(load_keep(bits_ptr, stride_bits, offs_m, offs_c, mask_m[:, None] & mask_c[None, :]),
                           acc, 0.0)
        for red0 in range(0, RED, BLOCK_RED):
            a = a_desc.load([pid_m * BLOCK_M, red0]).to(DOT_DTYPE)
            if W_ROWS_ARE_COLS:
                w = w_desc.load([pid_c * BLOCK_C, red0]).to(DOT_DTYPE).T
            else:
                w = w_desc.load([red0, pid_c * BLOCK_C]).to(DOT_DTYPE)
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_c.to(tl.int64) * stride_bias, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        out_desc.store([pid_m * BLOCK_M, pid_c * BLOCK_C], acc.to(out_ptr.dtype.element_ty))


# ============================================================================ launch configurations

def gemm_smem_bound(config: triton.Config, cols: str, red: str, elem_bytes: int, block_r: int,
                    tma_store: bool = False, masked: bool = False) -> int:
    """An upper bound of the shared memory a GEMM config compiles to: the pipelined operand tiles
    (``num_stages`` copies of BLOCK_M x red and red x cols) plus the rank-r operands of the
    low-rank term, plus, for a TMA-store kernel, the output tile the store is staged through and
    the pipeline's barriers; ``tests/ops/compile_for_gpu.py`` checks it against the compiler for
    every config."""
    kw = config.kwargs
    pipeline = config.num_stages * (kw["BLOCK_M"] * kw[red] + kw[red] * kw[cols]) * elem_bytes
    low_rank = (kw["BLOCK_M"] + kw[cols]) * block_r * elem_bytes
    if not tma_store:
        return pipeline + low_rank
    # The keep-mask bytes of an output tile change layout through shared memory, in the room the
    # low-rank operands had before them (measured: r = 16 costs the mask's size, r = 64 nothing).
    staged = max(low_rank, kw["BLOCK_M"] * kw[cols]) if masked else low_rank
    epilogue = kw["BLOCK_M"] * kw[cols] * elem_bytes
    barriers = 8 * (config.num_stages + 2)
    return pipeline + staged + epilogue + barriers


def _gemm_smem(cols: str, red: str, tma_store: bool = False):
    def bound(config, named_args, kwargs):
        operand = next(named_args[k] for k in ("x_ptr", "dy_ptr", "a_ptr") if k in named_args)
        return gemm_smem_bound(config, cols, red, operand.element_size(), kwargs.get("BLOCK_R", 64), tma_store,
                               bool(kwargs.get("HAS_MASK", False)))
    return bound


def _gemm_configs(cols: str, red: str) -> list[triton.Config]:
    """Tiles of a GEMM whose output columns are tiled by ``cols`` and reduction by ``red``."""
    def cfg(bm, bc, br, group, warps, stages):
        return triton.Config({"BLOCK_M": bm, cols: bc, red: br, "GROUP_M": group}, num_warps=warps, num_stages=stages)
    return [
        # Large M, H100-class: 128 x 256 tiles keep the tensor cores fed at M >= 4096.
        cfg(128, 256, 64, 8, 8, 3),
        cfg(128, 128, 64, 8, 8, 4),
        cfg(64, 128, 64, 8, 4, 4),
        # fp32 tiles fit here on every target (the larger ones are pruned by shared memory); and
        # the tile of launches whose K or N is not a multiple of 16: on 8 warps the only one that
        # spills in no specialization on sm_80 or sm_90 (4 warps spilled 12-268 B there).
        cfg(64, 128, 32, 8, 8, 3),
        # Small M (decode, short batches): a 16-row tile (tl.dot minimum) wastes no rows.
        cfg(16, 128, 128, 1, 4, 4),
    ]


def _interpreter_gemm(cols: str, red: str) -> triton.Config:
    # Big tiles: the interpreter costs ~5 ms per tile iteration whatever the tile size.
    return triton.Config({"BLOCK_M": 64, cols: 128, red: 128, "GROUP_M": 8}, num_warps=4)


_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "R"]


# K or N not a multiple of 16 (no vectorised loads): every deeper or taller tile spills, the
# 32-deep one on 8 warps does not (the `odd` rows of bench/results/kernel-resources.md).
FWD = Tuning("lora_fwd", _lora_fwd_kernel, _gemm_configs("BLOCK_N", "BLOCK_K"),
             interpreter=_interpreter_gemm("BLOCK_N", "BLOCK_K"), key=_AUTOTUNE_KEY,
             smem_bound=_gemm_smem("BLOCK_N", "BLOCK_K"), unaligned=lambda c: c.kwargs["BLOCK_K"] == 32)
# dX tiles its output over K and reduces over N: its own configs, its own grid.
DX = Tuning("lora_bwd_dx", _lora_bwd_dx_kernel, _gemm_configs("BLOCK_K", "BLOCK_N"),
            interpreter=_interpreter_gemm("BLOCK_K", "BLOCK_N"), key=_AUTOTUNE_KEY,
            smem_bound=_gemm_smem("BLOCK_K", "BLOCK_N"), unaligned=lambda c: c.kwargs["BLOCK_N"] == 32)


def _persistent_configs() -> list[triton.Config]:
    """Tiles of the persistent TMA GEMM, 16-bit inputs only (fp32 runs the pointer-based kernel: no
    tensor cores to feed): 128 rows, two warpgroups. 128 x 128 on one warpgroup spilled, and
    128 x 256 spills at r = 64 with dropout, where its shared memory prunes it anyway."""
    def cfg(bm, bc, br, warps, stages):
        return triton.Config({"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_RED": br, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)
    return [cfg(128, 256, 64, 8, 3), cfg(128, 128, 64, 8, 4), cfg(128, 128, 64, 8, 3)]


_PERSISTENT_KEY = ["M_BUCKET", "C", "RED", "R"]
# The persistent GEMM serves both of the fused path's GEMMs, each tuned on its own.
PERSISTENT_FWD = Tuning("lora_fwd_persistent", _lowrank_gemm_persistent_kernel, _persistent_configs(),
                        interpreter=_interpreter_gemm("BLOCK_C", "BLOCK_RED"), key=_PERSISTENT_KEY,
                        smem_bound=_gemm_smem("BLOCK_C", "BLOCK_RED", tma_store=True), min_arch=90)
PERSISTENT_DX = Tuning("lora_bwd_dx_persistent", _lowrank_gemm_persistent_kernel, _persistent_configs(),
                       interpreter=_interpreter_gemm("BLOCK_C", "BLOCK_RED"), key=_PERSISTENT_KEY,
                       smem_bound=_gemm_smem("BLOCK_C", "BLOCK_RED", tma_store=True), min_arch=90)

# The passes over M x K or M x N beside the GEMMs use fixed tiles: they are bandwidth-bound, and
# the dY pass accumulates with atomics, which autotuning would replay. Two pipeline stages: three
# stages of fp32 tiles would not fit an A100's shared memory.
# The shrink draws the dropout numbers of a 64 x 64 tile per step (a philox round each) on 8 warps:
# 64 x 128 on 4 warps spilled, and on 8 warps still spilled at r = 64 on sm_80.
SHRINK = Tuning("lora_shrink", _lora_shrink_kernel,
                [triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=8, num_stages=2)])
# 8 warps: at r = 64 the dY pass holds g (64 x 64) and dB's 128 x 64 partial in fp32 at once
# (4 warps spilled on sm_80, which has no wgmma to keep accumulators out of registers).
DY = Tuning("lora_bwd_dy", _lora_bwd_dy_kernel,
            [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2)])
# dA's accumulator is BLOCK_R x BLOCK_K fp32 (64 x 128 at r = 64): 8 warps hold it without spilling.
DA = Tuning("lora_bwd_da", _lora_bwd_da_kernel,
            [triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=8, num_stages=2)])
DROPOUT = Tuning("lora_dropout_bits", _dropout_bits_kernel,
                 [triton.Config({"BLOCK_M": 32, "BLOCK_K": 128}, num_warps=4, num_stages=1)])
# The split path's low-rank term: a write-bound pass over M x N (or M x K), one rank-r dot per tile.
EXPAND = Tuning(
    "lora_expand", _lowrank_expand_kernel,
    [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=1),
     triton.Config({"BLOCK_M": 64, "BLOCK_N": 256}, num_warps=8, num_stages=1),
     triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=1),
     triton.Config({"BLOCK_M": 16, "BLOCK_N": 256}, num_warps=4, num_stages=1)],
    interpreter=triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4),
    key=["M_BUCKET", "N", "R"],
    prune=lambda configs, named_args, **kw: [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, named_args["M_BUCKET"])]
    or configs[-1:],
)


# ============================================================================ host launchers

def _inv_keep(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0.0 else 1.0


def lora_shrink_into(out: Tensor, x: Tensor, a: Tensor, p: float, seed: Tensor, scale: float = 1.0,
                     bits: Optional[Tensor] = None) -> None:
    """out[g] = scale * drop_g(x) @ a[g]^T; ``x (M, K)``, ``a (G, R, K)``, ``out (G, M, R)``; the
    keep mask (group 0) is written packed into ``bits (M, ceil(K/8))`` uint8 when given."""
    M, K = x.shape
    G, R, _ = a.shape
    SHRINK.launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), G),
        x, a, out, seed, bits if bits is not None else seed, M, K, R,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2),
        out.stride(0), out.stride(1), out.stride(2), bits.stride(0) if bits is not None else 0,
        p, scale,
        HAS_DROPOUT=p > 0.0, STORE_BITS=bits is not None, DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), BLOCK_R=pad_dim(R),
    )


def new_bits(M: int, K: int, device) -> Tensor:
    """Room for an M x K keep mask, 1 bit per element (bit j of byte c of a row: column 8c + j)."""
    return torch.empty((M, triton.cdiv(K, 8)), dtype=torch.uint8, device=device)


def unpack_keep(bits: Tensor, K: int) -> Tensor:
    """The boolean M x K keep mask stored in ``bits``."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    unpacked = (bits.unsqueeze(-1) >> shifts).bitwise_and_(1).bool()
    return unpacked.reshape(bits.shape[0], bits.shape[1] * 8)[:, :K]


def _gemm_grid(rows: int, cols: int, cols_key: str):
    """Programs of a GEMM: one per BLOCK_M x ``cols_key`` tile of its (rows x cols) output."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta[cols_key]),)


@triton_op("odelta_fast::lora_linear_fused_fwd", mutates_args=())
def fused_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The fused path: ``(y, xs, bits)`` for 2-D ``x (M, K)``, the low-rank term accumulated into the
    GEMM's accumulator. ``xs = s drop(x) A^T`` and the packed dropout mask ``bits`` (empty without
    dropout) are what backward needs besides x."""
    return _fused_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, persistent=False)


@triton_op("odelta_fast::lora_linear_persistent_fwd", mutates_args=())
def persistent_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The persistent path: the fused path with its GEMM on the persistent TMA-descriptor kernel
    (the pointer-based one where an operand's layout rules TMA out, see ``tma_ready``)."""
    return _fused_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, persistent=True)


def _fused_forward(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed, *, persistent: bool):
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    xs, bits = _shrink_with_mask(x, lora_a, scaling, dropout_p, seed)
    y = new_output((M, N), x.dtype, x.device)
    if persistent and tma_ready(x, weight, y):
        _persistent_gemm(PERSISTENT_FWD, x, weight, xs, lora_b.t(), bias, None, y, w_rows_are_cols=True)
        return y, xs, bits
    FWD.launch(
        _gemm_grid(M, N, "BLOCK_N"),
        x, weight, bias if bias is not None else x, xs, lora_b, y,
        M, N, K, R,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), xs.stride(0), xs.stride(1),
        lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), bias.stride(0) if bias is not None else 0,
        m_bucket(M),
        HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype(x.dtype), PRECISION=dot_precision(x.dtype),
        BLOCK_R=pad_dim(R),
    )
    return y, xs, bits


# ---------------------------------------------------------------------------- the persistent GEMM
def persistent_available(device: torch.device) -> bool:
    """Whether the persistent path can run on ``device``: Triton with tensor descriptors (3.4 and
    later) and TMA hardware (compute capability 9.0 and later); the interpreter runs it on CPU."""
    if not hasattr(tl, "make_tensor_descriptor"):
        return False
    device = torch.device(device)
    if device.type != "cuda":
        return INTERPRET
    return torch.cuda.get_device_capability(device) >= (9, 0)


# TMA copies need 16-byte aligned base addresses and row strides, and unit column strides.
TMA_ALIGNMENT = 16


def tma_ready(*tensors: Tensor) -> bool:
    """Whether the persistent GEMM takes these 2-D tensors: 16-bit, and each one readable or
    writable through a TMA descriptor."""
    return all(t.dtype in (torch.float16, torch.bfloat16) and t.dim() == 2 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % TMA_ALIGNMENT == 0
               and t.data_ptr() % TMA_ALIGNMENT == 0 for t in tensors)


# Programs the persistent kernel runs with under the interpreter (a GPU runs one per SM): more than
# one, so the CPU tests walk the strided tile loop the way a GPU does.
INTERPRETER_PROGRAMS = 3


def _tma_scratch(size: int, alignment: int, stream) -> Tensor:
    # Device-side descriptors are written to global memory before use: Triton asks for the room.
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _persistent_gemm(tuning: Tuning, a: Tensor, w: Tensor, u: Tensor, v: Tensor, bias: Optional[Tensor],
                     bits: Optional[Tensor], out: Tensor, *, w_rows_are_cols: bool) -> None:
    """``out = (u v) * mask + a w' (+ bias)``, ``w' = w^T`` if ``w_rows_are_cols`` else ``w``;
    ``u (M, r)``, ``v (r, C)`` any strides; a, w and out pass ``tma_ready``."""
    M, RED = a.shape
    C, R = out.shape[1], u.shape[1]
    programs = num_sms(a.device) if a.device.type == "cuda" else INTERPRETER_PROGRAMS

    def launch():
        # Inside a copy of the caller's context: the allocator set here does not replace theirs.
        triton.set_allocator(_tma_scratch)
        tuning.launch(
            lambda meta: (min(programs, triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(C, meta["BLOCK_C"])),),
            a, w, u, v, bias if bias is not None else a, bits if bits is not None else a, out,
            M, C, RED, R,
            a.stride(0), w.stride(0), u.stride(0), u.stride(1), v.stride(0), v.stride(1), out.stride(0),
            bias.stride(0) if bias is not None else 0, bits.stride(0) if bits is not None else 0,
            m_bucket(M),
            W_ROWS_ARE_COLS=w_rows_are_cols, HAS_BIAS=bias is not None, HAS_MASK=bits is not None,
            DOT_DTYPE=dot_dtype(a.dtype), PRECISION=dot_precision(a.dtype), BLOCK_R=pad_dim(R),
        )

    contextvars.copy_context().run(launch)


def _da_splits(M: int, K: int, device: torch.device) -> tuple[int, int]:
    """(splits of the token axis, rows per split) for dA: ~2 waves of SMs over k-blocks x splits."""
    cfg = DA.config()
    k_blocks = triton.cdiv(K, cfg.kwargs["BLOCK_K"])
    m_blocks = triton.cdiv(M, cfg.kwargs["BLOCK_M"])
    splits = max(1, min(m_blocks, (2 * num_sms(device)) // max(k_blocks, 1))) if device.type == "cuda" else 1
    rows = max(1, triton.cdiv(m_blocks, splits)) * cfg.kwargs["BLOCK_M"]
    return triton.cdiv(M, rows), rows  # no splits for M = 0: nothing is launched


@triton_op("odelta_fast::lora_linear_fused_bwd", mutates_args=())
def fused_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xs: Tensor, bits: Tensor,
    scaling: float, dropout_p: float, need_x: bool, need_bias: bool, need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The fused path's ``(grad_x, grad_bias, grad_a, grad_b)``; a gradient not asked for comes back
    empty. dX's low-rank term is accumulated into its GEMM's accumulator."""
    return _backward_pieces(grad_y, x, weight, lora_a, lora_b, xs, bits, scaling, dropout_p, need_x, need_bias,
                            need_lora, dx_gemm="fused")


@triton_op("odelta_fast::lora_linear_persistent_bwd", mutates_args=())
def persistent_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xs: Tensor, bits: Tensor,
    scaling: float, dropout_p: float, need_x: bool, need_bias: bool, need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The persistent path's gradients: the fused path's, with dX on the persistent TMA GEMM."""
    return _backward_pieces(grad_y, x, weight, lora_a, lora_b, xs, bits, scaling, dropout_p, need_x, need_bias,
                            need_lora, dx_gemm="persistent")


def _backward_pieces(grad_y, x, weight, lora_a, lora_b, xs, bits, scaling, dropout_p, need_x, need_bias, need_lora,
                     *, dx_gemm: str):
    """The gradients every path shares; ``dx_gemm`` says how dX's GEMM runs: ``split`` (cuBLAS onto
    the masked low-rank term), ``fused`` (pointer-based Triton) or ``persistent`` (TMA Triton)."""
    M, K = x.shape
    N, R = weight.shape[0], lora_a.shape[0]
    dev, dtype = x.device, x.dtype
    block_r = pad_dim(R)
    dot_t, prec = dot_dtype(dtype), dot_precision(dtype)
    has_dropout = dropout_p > 0.0
    empty = grad_y.new_empty(0)
    need_g = need_x or need_lora
    # Deterministic mode: dB and db come from torch's own reductions instead of atomics.
    fixed_order = deterministic()
    db_in_kernel = need_lora and not fixed_order
    bias_in_kernel = need_bias and not fixed_order
    gs = new_output((M, R), dtype, dev) if need_g else empty
    db_acc = torch.zeros((N, block_r), dtype=torch.float32, device=dev) if db_in_kernel else empty
    dbias_acc = torch.zeros((N,), dtype=torch.float32, device=dev) if bias_in_kernel else empty
    if need_g or db_in_kernel or bias_in_kernel:
        DY.launch(
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
            grad_y, lora_b, xs, gs if need_g else grad_y, db_acc if db_in_kernel else grad_y,
            dbias_acc if bias_in_kernel else grad_y,
            M, N, R,
            grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1),
            xs.stride(0), xs.stride(1), gs.stride(0) if need_g else 0, gs.stride(1) if need_g else 0,
            scaling * _inv_keep(dropout_p),
            NEED_G=need_g, NEED_DB=db_in_kernel, NEED_BIAS=bias_in_kernel, DOT_DTYPE=dot_t, PRECISION=prec,
            BLOCK_R=block_r,
        )
    # Distinct empties: a custom op's outputs may not alias each other.
    grad_x, grad_bias, grad_a, grad_b = (grad_y.new_empty(0) for _ in range(4))
    bits_arg = bits if has_dropout else gs
    stride_bits = bits.stride(0) if has_dropout else 0
    if need_x and dx_gemm == "split":
        # Split: the masked low-rank term written once, cuBLAS adds dY W onto it (beta = 1).
        grad_x = lowrank_expand(gs, lora_a.t(), None, bits if has_dropout else None, dtype)
        grad_x.addmm_(grad_y, weight)
    elif need_x:
        grad_x = new_output((M, K), dtype, dev)
        if dx_gemm == "persistent" and tma_ready(grad_y, weight, grad_x):
            _persistent_gemm(PERSISTENT_DX, grad_y, weight, gs, lora_a, None, bits if has_dropout else None, grad_x,
                             w_rows_are_cols=False)
        else:
            DX.launch(
                _gemm_grid(M, K, "BLOCK_K"),
                grad_y, weight, gs, lora_a, grad_x, bits_arg,
                M, N, K, R,
                grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1), gs.stride(0), gs.stride(1),
                lora_a.stride(0), lora_a.stride(1), grad_x.stride(0), grad_x.stride(1), stride_bits,
                m_bucket(M),
                HAS_DROPOUT=has_dropout, DOT_DTYPE=dot_t, PRECISION=prec, BLOCK_R=block_r,
            )
    if need_lora:
        splits, rows = _da_splits(M, K, dev)
        parts = torch.zeros((max(splits, 1), block_r, K), dtype=torch.float32, device=dev)
        DA.launch(
            lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), splits),
            x, gs, parts, bits_arg, M, K, R, rows,
            x.stride(0), x.stride(1), gs.stride(0), gs.stride(1), stride_bits,
            HAS_DROPOUT=has_dropout, DOT_DTYPE=dot_t, PRECISION=prec, BLOCK_R=block_r,
        )
        grad_a = parts[:, :R].sum(0).to(lora_a.dtype)
        if db_in_kernel:
            grad_b = db_acc[:, :R].to(lora_b.dtype)
        else:
            grad_b = (grad_y.t() @ xs).to(lora_b.dtype)
    if need_bias:
        grad_bias = (dbias_acc if bias_in_kernel else grad_y.sum(0)).to(dtype)
    return grad_x, grad_bias, grad_a, grad_b


@triton_op("odelta_fast::lora_linear_split_fwd", mutates_args=())
def split_forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """The split path: ``(y, xs, bits)`` like ``fused_forward``, with the big GEMM left to cuBLAS:
    the shrink, then ``T = xs B^T + b`` written once, then ``y = T + x W^T`` (cuBLAS, beta = 1)."""
    xs, bits = _shrink_with_mask(x, lora_a, scaling, dropout_p, seed)
    y = lowrank_expand(xs, lora_b, bias, None, x.dtype)
    y.addmm_(x, weight.t())
    return y, xs, bits


@triton_op("odelta_fast::lora_linear_split_bwd", mutates_args=())
def split_backward(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xs: Tensor, bits: Tensor,
    scaling: float, dropout_p: float, need_x: bool, need_bias: bool, need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The split path's gradients: the dY pass and dA in Triton, ``dX = (gs A) * mask + dY W`` as a
    masked low-rank term written once plus cuBLAS's GEMM onto it (beta = 1)."""
    return _backward_pieces(grad_y, x, weight, lora_a, lora_b, xs, bits, scaling, dropout_p, need_x, need_bias,
                            need_lora, dx_gemm="split")


def _shrink_with_mask(x: Tensor, lora_a: Tensor, scaling: float, dropout_p: float, seed: Tensor):
    """``(xs, bits)``: ``xs = s drop(x) A^T`` (M x r) and the packed mask drawn for it (empty if p = 0)."""
    M, K = x.shape
    R = lora_a.shape[0]
    xs = new_output((1, M, R), x.dtype, x.device)
    bits = new_bits(M, K, x.device) if dropout_p > 0.0 else x.new_empty(0, dtype=torch.uint8)
    lora_shrink_into(xs, x, lora_a.unsqueeze(0), dropout_p, seed, scaling * _inv_keep(dropout_p),
                     bits if dropout_p > 0.0 else None)
    return xs[0], bits


def lowrank_expand(u: Tensor, v: Tensor, bias: Optional[Tensor], bits: Optional[Tensor], dtype) -> Tensor:
    """``(u v^T) * mask + bias`` as a new ``(M, N)`` tensor of ``dtype``; ``u (M, r)``, ``v (N, r)``
    (any strides), ``bits`` an M x N packed keep mask or None."""
    M, R = u.shape
    N = v.shape[0]
    out = new_output((M, N), dtype, u.device)
    EXPAND.launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        u, v, bias if bias is not None else u, bits if bits is not None else u, out,
        M, N, R,
        u.stride(0), u.stride(1), v.stride(0), v.stride(1), bias.stride(0) if bias is not None else 0,
        bits.stride(0) if bits is not None else 0, out.stride(0), out.stride(1),
        m_bucket(M),
        HAS_BIAS=bias is not None, HAS_MASK=bits is not None, DOT_DTYPE=dot_dtype(u.dtype),
        PRECISION=dot_precision(u.dtype), BLOCK_R=pad_dim(R),
    )
    return out


# ============================================================================ grouped shrink

@triton_op("odelta_fast::lora_shrink_grouped_triton", mutates_args=())
def lora_shrink_grouped_fwd(x: Tensor, lora_a_stacked: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """``out[g] = drop_g(x) @ A[g]^T`` for ``lora_a_stacked (G, R, K)``: one launch, x read once per
    row block for all groups' tiles (the groups run as grid axis 1 over the same x rows)."""
    M, _ = x.shape
    G, R, _ = lora_a_stacked.shape
    out = new_output((G, M, R), x.dtype, x.device)
    lora_shrink_into(out, x, lora_a_stacked, dropout_p, seed, _inv_keep(dropout_p))
    return out


# ============================================================================ dropout mask

def dropout_bits(seed, M: int, K: int, p: float, device=None) -> Tensor:
    """The packed keep mask ``(M, ceil(K/8))`` uint8 the shrink draws for ``seed`` over M x K."""
    if not isinstance(seed, Tensor):
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=device)
    device = seed.device if device is None else torch.device(device)
    seed = seed.to(device=device, dtype=torch.int64).reshape(1)
    bits = new_bits(M, K, device)
    DROPOUT.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])),
                   seed, bits, M, K, bits.stride(0), p)
    return bits


def dropout_keep_scale(seed, shape, p: float, device=None) -> Tensor:
    """The fp32 multiplier (0 or 1/(1-p)) the kernels apply for ``seed`` over an input of ``shape``
    (leading dimensions flattened into M, as the op does): feed it to ``lora_linear_reference``."""
    K = shape[-1]
    M = 1
    for s in shape[:-1]:
        M *= s
    if p == 0.0:
        dev = seed.device if isinstance(seed, Tensor) and device is None else device
        return torch.ones(shape, dtype=torch.float32, device=dev)
    keep = unpack_keep(dropout_bits(seed, M, K, p, device), K)
    return (keep.float() * _inv_keep(p)).reshape(shape)
