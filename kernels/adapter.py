"""Bottleneck adapter: ``y = residual + s * (up(act(down(h))))`` fused, forward and backward.

Forward, one launch per row block: ``pre = h Wd^T + bd`` accumulates over d into a
``BLOCK_M x bottleneck`` tile that never leaves the chip, ``a = act(pre)``, then the up projection
streams over the output columns adding up-bias, scaling and residual before the single store.
Backward, one launch per row block: recompute ``pre`` and ``a`` from h (nothing but h was saved),
stream over dY once for ``da = s dY Wu`` and the row block's share of ``dWu = s dY^T a`` and
``dbu = s sum dY``; then ``dpre = da * act'(pre)`` and a stream over d for ``dh = dpre Wd`` and
``dWd += dpre^T h``. Weight gradients accumulate across row blocks with fp32 atomics.
The residual's gradient is dY itself (returned without a copy).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from .common import INTERPRET, dot_dtype, dot_precision, new_output, pad_dim

# Activation codes (constexpr): names follow odelta_fast.ops.adapter.ACTIVATIONS.
ACTIVATION_CODES = {
    "identity": 0, "relu": 1, "gelu": 2, "gelu_orig": 2, "gelu_new": 3, "silu": 4, "swish": 4,
    "tanh": 5, "leakyrelu": 6,
}
# Globals read inside @triton.jit must be tl.constexpr (the compiler rejects plain floats; the
# interpreter does not check).
LEAKY_SLOPE = tl.constexpr(0.01)  # torch.nn.functional.leaky_relu's default, what the eager path uses
GELU_C = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi); keep constexprs right of a tensor operand (interpreter)
INV_SQRT2 = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)

# ============================================================================ kernels


@triton.jit
def _tanh(x):
    # tl has no portable tanh across Triton 3.6-3.9; 2 sigmoid(2x) - 1 is exact to ~1e-7 absolute.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(x, ACT: tl.constexpr):
    # One assignment per constexpr branch and a single return (no early returns in the compiler).
    if ACT == 1:
        y = tl.maximum(x, 0.0)
    elif ACT == 2:
        y = 0.5 * x * (1.0 + tl.erf(x * INV_SQRT2))
    elif ACT == 3:
        y = 0.5 * x * (1.0 + _tanh((x + 0.044715 * x * x * x) * GELU_C))
    elif ACT == 4:
        y = x * tl.sigmoid(x)
    elif ACT == 5:
        y = _tanh(x)
    elif ACT == 6:
        y = tl.where(x > 0, x, x * LEAKY_SLOPE)
    else:
        y = x
    return y


@triton.jit
def _act_grad(x, ACT: tl.constexpr):
    if ACT == 1:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == 2:
        d = 0.5 * (1.0 + tl.erf(x * INV_SQRT2)) + x * INV_SQRT_2PI * tl.exp(-0.5 * x * x)
    elif ACT == 3:
        t = _tanh((x + 0.044715 * x * x * x) * GELU_C)
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 4:
        sg = tl.sigmoid(x)
        d = sg * (1.0 + x * (1.0 - sg))
    elif ACT == 5:
        t = _tanh(x)
        d = 1.0 - t * t
    elif ACT == 6:
        d = tl.where(x > 0, 1.0, LEAKY_SLOPE)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _down(h_ptr, wd_ptr, bd_ptr, rm, mask_m, offs_b, mask_b, D, stride_hm, stride_hd, stride_wdb, stride_wdd,
          HAS_BD: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """pre = h[rows] Wd^T + bd, fp32, BLOCK_M x BLOCK_B (padded bottleneck columns are 0)."""
    pre = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = tl.load(h_ptr + rm[:, None] * stride_hm + offs_d[None, :] * stride_hd,
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
        wd = tl.load(wd_ptr + offs_d[:, None] * stride_wdd + offs_b[None, :] * stride_wdb,
                     mask=mask_d[:, None] & mask_b[None, :], other=0.0).to(DOT_DTYPE)
        pre = tl.dot(h, wd, pre, input_precision=PRECISION)
    if HAS_BD:
        pre += tl.load(bd_ptr + offs_b, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    return pre


@triton.jit
def _adapter_fwd_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, y_ptr,
    M, D, B, DOUT,
    stride_hm, stride_hd, stride_wdb, stride_wdd, stride_wun, stride_wub, stride_rm, stride_rn, stride_ym, stride_yn,
    scaling,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_b = offs_b < B
    pre = _down(h_ptr, wd_ptr, bd_ptr, rm, mask_m, offs_b, mask_b, D, stride_hm, stride_hd, stride_wdb, stride_wdd,
                HAS_BD, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_D, BLOCK_B)
    a = _act(pre, ACT).to(DOT_DTYPE)
    for n0 in range(0, DOUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < DOUT
        wu = tl.load(wu_ptr + offs_b[:, None] * stride_wub + offs_n[None, :] * stride_wun,
                     mask=mask_b[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        out = tl.dot(a, wu, input_precision=PRECISION)
        if HAS_BU:
            out += tl.load(bu_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out * scaling
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            out += tl.load(res_ptr + rm[:, None] * stride_rm + offs_n[None, :] * stride_rn,
                           mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_bwd_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, dy_ptr, dh_ptr, dwd_ptr, dbd_ptr, dwu_ptr, dbu_ptr,
    M, D, B, DOUT,
    stride_hm, stride_hd, stride_wdb, stride_wdd, stride_wun, stride_wub, stride_dym, stride_dyn,
    stride_dhm, stride_dhd,
    scaling,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, NEED_DH: tl.constexpr, NEED_W: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    rm = offs_m.to(tl.int64)
    mask_m = offs_m < M
    mask_b = offs_b < B
    # Recompute the bottleneck activations instead of having saved them.
    pre = _down(h_ptr, wd_ptr, bd_ptr, rm, mask_m, offs_b, mask_b, D, stride_hm, stride_hd, stride_wdb, stride_wdd,
                HAS_BD, DOT_DTYPE, PRECISION, BLOCK_M, BLOCK_D, BLOCK_B)
    a = _act(pre, ACT).to(DOT_DTYPE)
    da = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, DOUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < DOUT
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        wu = tl.load(wu_ptr + offs_n[:, None] * stride_wun + offs_b[None, :] * stride_wub,
                     mask=mask_n[:, None] & mask_b[None, :], other=0.0).to(DOT_DTYPE)
        da = tl.dot(dy, wu, da, input_precision=PRECISION)
        if NEED_W:
            part = tl.dot(tl.trans(dy), a, input_precision=PRECISION) * scaling
            tl.atomic_add(dwu_ptr + offs_n[:, None] * BLOCK_B + offs_b[None, :], part,
                          mask=mask_n[:, None] & mask_b[None, :])
            if HAS_BU:
                tl.atomic_add(dbu_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0) * scaling, mask=mask_n)
    dpre = da * scaling * _act_grad(pre, ACT)
    if NEED_W and HAS_BD:
        tl.atomic_add(dbd_ptr + offs_b, tl.sum(dpre, axis=0), mask=mask_b)
    dpre_c = dpre.to(DOT_DTYPE)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if NEED_DH:
            wd = tl.load(wd_ptr + offs_b[:, None] * stride_wdb + offs_d[None, :] * stride_wdd,
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
            dh = tl.dot(dpre_c, wd, input_precision=PRECISION)
            tl.store(dh_ptr + rm[:, None] * stride_dhm + offs_d[None, :] * stride_dhd,
                     dh.to(dh_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
        if NEED_W:
            h = tl.load(h_ptr + rm[:, None] * stride_hm + offs_d[None, :] * stride_hd,
                        mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
            part = tl.dot(tl.trans(dpre_c), h, input_precision=PRECISION)
            tl.atomic_add(dwd_ptr + offs_b[:, None] * D + offs_d[None, :], part,
                          mask=mask_b[:, None] & mask_d[None, :])


# ============================================================================ host launchers

def _blocks(bottleneck: int) -> dict:
    block_b = pad_dim(bottleneck)
    if INTERPRET:
        # Few, large tiles: the interpreter pays ~5 ms per tile iteration whatever its size.
        return dict(BLOCK_M=64, BLOCK_D=128, BLOCK_B=block_b, BLOCK_N=128)
    # The BLOCK_M x BLOCK_B fp32 bottleneck tile (and its gradient) live in registers: keep
    # BLOCK_M * BLOCK_B <= 8K elements (64 x 128) so 4-8 warps hold them without spilling.
    block_m = max(16, min(64, 8192 // block_b))
    return dict(BLOCK_M=block_m, BLOCK_D=64, BLOCK_B=block_b, BLOCK_N=64)


# num_stages=2 at the launches: the bottleneck tiles already take registers, and 3 stages of fp32
# h / weight tiles would not fit an A100's 164 KB of shared memory.
def _warps(blocks: dict) -> int:
    return 4 if blocks["BLOCK_M"] * blocks["BLOCK_B"] <= 4096 else 8


@triton_op("odelta_fast::adapter_bottleneck_triton_fwd", mutates_args=())
def adapter_fwd(
    h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
    residual: Optional[Tensor], activation: str, scaling: float,
) -> Tensor:
    M, D = h.shape
    B, DOUT = down_weight.shape[0], up_weight.shape[0]
    y = new_output((M, DOUT), h.dtype, h.device)
    blocks = _blocks(B)
    res = residual if residual is not None else h
    wrap_triton(_adapter_fwd_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]),)](
        h, down_weight, down_bias if down_bias is not None else h, up_weight,
        up_bias if up_bias is not None else h, res, y,
        M, D, B, DOUT,
        h.stride(0), h.stride(1), down_weight.stride(0), down_weight.stride(1), up_weight.stride(0), up_weight.stride(1),
        res.stride(0), res.stride(1), y.stride(0), y.stride(1),
        scaling,
        HAS_BD=down_bias is not None, HAS_BU=up_bias is not None, HAS_RES=residual is not None,
        ACT=ACTIVATION_CODES[activation], DOT_DTYPE=dot_dtype(h.dtype), PRECISION=dot_precision(h.dtype),
        num_warps=_warps(blocks), num_stages=2, **blocks,
    )
    return y


@triton_op("odelta_fast::adapter_bottleneck_triton_bwd", mutates_args=())
def adapter_bwd(
    grad_y: Tensor, h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor,
    has_up_bias: bool, activation: str, scaling: float, need_h: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dh, dWd, dbd, dWu, dbu)``; gradients not asked for come back empty."""
    M, D = h.shape
    B, DOUT = down_weight.shape[0], up_weight.shape[0]
    dev = h.device
    blocks = _blocks(B)
    block_b = blocks["BLOCK_B"]
    dh = new_output((M, D), h.dtype, dev) if need_h else h.new_empty(0)
    f32 = dict(dtype=torch.float32, device=dev)
    dwd = torch.zeros((B, D), **f32) if need_w else h.new_empty(0)
    dbd = torch.zeros((B,), **f32) if need_w and down_bias is not None else h.new_empty(0)
    dwu = torch.zeros((DOUT, block_b), **f32) if need_w else h.new_empty(0)
    dbu = torch.zeros((DOUT,), **f32) if need_w and has_up_bias else h.new_empty(0)
    if need_h or need_w:
        wrap_triton(_adapter_bwd_kernel)[(triton.cdiv(M, blocks["BLOCK_M"]),)](
            h, down_weight, down_bias if down_bias is not None else h, up_weight, grad_y,
            dh if need_h else h, dwd if need_w else h, dbd if dbd.numel() else h, dwu if need_w else h,
            dbu if dbu.numel() else h,
            M, D, B, DOUT,
            h.stride(0), h.stride(1), down_weight.stride(0), down_weight.stride(1),
            up_weight.stride(0), up_weight.stride(1), grad_y.stride(0), grad_y.stride(1),
            dh.stride(0) if need_h else 0, dh.stride(1) if need_h else 0,
            scaling,
            HAS_BD=down_bias is not None, HAS_BU=has_up_bias, NEED_DH=need_h, NEED_W=need_w,
            ACT=ACTIVATION_CODES[activation], DOT_DTYPE=dot_dtype(h.dtype), PRECISION=dot_precision(h.dtype),
            num_warps=_warps(blocks), num_stages=2, **blocks,
        )
    if need_w:
        dwd = dwd.to(down_weight.dtype)
        dwu = dwu[:, :B].to(up_weight.dtype)
        dbd = dbd.to(h.dtype) if dbd.numel() else h.new_empty(0)
        dbu = dbu.to(h.dtype) if dbu.numel() else h.new_empty(0)
    return dh, dwd, dbd, dwu, dbu


def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling = inputs
    # Only h (alive in the caller anyway) and parameters: the bottleneck is recomputed.
    ctx.save_for_backward(h, down_weight, down_bias, up_weight)
    ctx.has_up_bias = up_bias is not None
    ctx.activation, ctx.scaling = activation, scaling


def _backward(ctx, grad_y):
    h, down_weight, down_bias, up_weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_w = any(need[i] for i in (1, 2, 3, 4))
    dh, dwd, dbd, dwu, dbu = adapter_bwd(
        grad_y, h, down_weight, down_bias, up_weight, ctx.has_up_bias, ctx.activation, ctx.scaling, need[0], need_w)
    return (dh if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
            dwu if need[3] else None, dbu if need[4] else None, grad_y if need[5] else None, None, None)


adapter_fwd.register_autograd(_backward, setup_context=_setup_context)


def adapter_bottleneck(h, down_weight, down_bias, up_weight, up_bias, residual, activation: str, scaling: float):
    """Differentiable fused adapter over 2-D ``h (M, d)``; ``residual (M, d_out)`` or None."""
    return adapter_fwd(h, down_weight, down_bias, up_weight, up_bias, residual, activation, float(scaling))
