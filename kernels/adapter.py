"""Bottleneck adapter launchers: ``y = residual + s * (up(act(down(h))))`` fused, forward and
backward (the autograd around them is ``odelta_fast.ops.adapter``'s).

Forward, one launch per row block: ``pre = h Wd^T + bd`` accumulates over d into a
``BLOCK_M x bottleneck`` tile, saved (fp32, M x bottleneck: small) when a gradient will be needed;
``a = act(pre)``, then the up projection streams over the output columns adding up-bias, scaling
and residual before the single store.
Backward, one launch per row block: stream over dY once for ``da = s dY Wu``, ``dpre = da *
act'(pre)``, then over d for ``dh = dpre Wd``; ``act(pre)`` and ``dpre`` are written (M x bottleneck)
and the weight gradients ``dWu = s dY^T a``, ``dWd = dpre^T h`` and the bias sums are M-long
reductions done by cuBLAS / torch: no atomics, the same bits run to run.
The residual's gradient is dY itself (returned without a copy).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .common import Tuning, dot_dtype, dot_precision, m_bucket, new_output, pad_dim, step64

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
    # tl has no portable tanh across Triton 3.6-3.9. From e = exp(-2|x|): no cancellation where
    # |tanh| nears 1 (2 sigmoid(2x) - 1 lost ~1e-7 absolute there, which gelu_new's gradient
    # multiplies by x and the bias gradient sums over rows).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, t, -t)


@triton.jit
def _sech2(x):
    # 1 - tanh(x)^2 = 4e / (1 + e)^2 with e = exp(-2|x|): accurate where tanh(x)^2 rounds to 1.
    e = tl.exp(-2.0 * tl.abs(x))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))


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
        u = (x + 0.044715 * x * x * x) * GELU_C
        d = 0.5 * (1.0 + _tanh(u)) + 0.5 * x * _sech2(u) * GELU_C * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 4:
        sg = tl.sigmoid(x)
        d = sg * (1.0 + x * (1.0 - sg))
    elif ACT == 5:
        d = _sech2(x)
    elif ACT == 6:
        d = tl.where(x > 0, 1.0, LEAKY_SLOPE)
    else:
        d = tl.full(x.shape, 1.0, tl.float32)
    return d


@triton.jit
def _adapter_fwd_kernel(
    h_ptr, wd_ptr, bd_ptr, wu_ptr, bu_ptr, res_ptr, y_ptr, pre_ptr,
    M, D, B, DOUT,
    stride_hm, stride_hd, stride_wdb, stride_wdd, stride_wun, stride_wub, stride_rm, stride_rn, stride_ym, stride_yn,
    stride_bd, stride_bu,
    scaling, M_BUCKET,
    HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For row block program_id(0): pre = h Wd^T + bd (kept on chip, and saved as fp32 for backward
    when SAVE_PRE), then y = residual + s (act(pre) Wu^T + bu) streamed over the output columns."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    offs_d = tl.arange(0, BLOCK_D)
    rm = offs_m.to(tl.int64)
    rb = offs_b.to(tl.int64)
    mask_m = offs_m < M
    mask_b = offs_b < B
    pre = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    h_ptrs = h_ptr + rm[:, None] * stride_hm + offs_d.to(tl.int64)[None, :] * stride_hd
    wd_ptrs = wd_ptr + offs_d.to(tl.int64)[:, None] * stride_wdd + rb[None, :] * stride_wdb
    for d0 in range(0, D, BLOCK_D):
        mask_d = offs_d < D - d0
        h = tl.load(h_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
        wd = tl.load(wd_ptrs, mask=mask_d[:, None] & mask_b[None, :], other=0.0).to(DOT_DTYPE)
        pre = tl.dot(h, wd, pre, input_precision=PRECISION)
        h_ptrs += step64(BLOCK_D, stride_hd)
        wd_ptrs += step64(BLOCK_D, stride_wdd)
    if HAS_BD:
        pre += tl.load(bd_ptr + rb * stride_bd, mask=mask_b, other=0.0).to(tl.float32)[None, :]
    if SAVE_PRE:
        tl.store(pre_ptr + rm[:, None] * BLOCK_B + offs_b[None, :], pre, mask=mask_m[:, None] & mask_b[None, :])
    a = _act(pre, ACT).to(DOT_DTYPE)
    for n0 in range(0, DOUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rn = offs_n.to(tl.int64)
        mask_n = offs_n < DOUT
        wu = tl.load(wu_ptr + rb[:, None] * stride_wub + rn[None, :] * stride_wun,
                     mask=mask_b[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        out = tl.dot(a, wu, input_precision=PRECISION)
        if HAS_BU:
            out += tl.load(bu_ptr + rn * stride_bu, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        out = out * scaling
        mask = mask_m[:, None] & mask_n[None, :]
        if HAS_RES:
            out += tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :] * stride_rn,
                           mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn,
                 out.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adapter_bwd_kernel(
    pre_ptr, wd_ptr, wu_ptr, dy_ptr, dh_ptr, act_ptr, dpre_ptr,
    M, D, B, DOUT,
    stride_wdb, stride_wdd, stride_wun, stride_wub, stride_dym, stride_dyn, stride_dhm, stride_dhd,
    scaling, M_BUCKET,
    NEED_DH: tl.constexpr, NEED_W: tl.constexpr, ACT: tl.constexpr,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For row block program_id(0): one pass over dY for da = s dY Wu, dpre = da * act'(pre), then
    dh = dpre Wd streamed over d. With NEED_W, act(pre) and dpre are stored (M x bottleneck) and the
    weight gradients are M-long reductions left to cuBLAS: no atomics, identical run to run."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, BLOCK_B)
    rm = offs_m.to(tl.int64)
    rb = offs_b.to(tl.int64)
    mask_m = offs_m < M
    mask_b = offs_b < B
    mask_mb = mask_m[:, None] & mask_b[None, :]
    pre = tl.load(pre_ptr + rm[:, None] * BLOCK_B + offs_b[None, :], mask=mask_mb, other=0.0)
    da = tl.zeros((BLOCK_M, BLOCK_B), dtype=tl.float32)
    for n0 in range(0, DOUT, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        rn = offs_n.to(tl.int64)
        mask_n = offs_n < DOUT
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(DOT_DTYPE)
        wu = tl.load(wu_ptr + rn[:, None] * stride_wun + rb[None, :] * stride_wub,
                     mask=mask_n[:, None] & mask_b[None, :], other=0.0).to(DOT_DTYPE)
        da = tl.dot(dy, wu, da, input_precision=PRECISION)
    dpre = da * scaling * _act_grad(pre, ACT)
    if NEED_W:
        tl.store(act_ptr + rm[:, None] * BLOCK_B + offs_b[None, :], _act(pre, ACT).to(act_ptr.dtype.element_ty),
                 mask=mask_mb)
        tl.store(dpre_ptr + rm[:, None] * BLOCK_B + offs_b[None, :], dpre.to(dpre_ptr.dtype.element_ty),
                 mask=mask_mb)
    if NEED_DH:
        dpre_c = dpre.to(DOT_DTYPE)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            rd = offs_d.to(tl.int64)
            mask_d = offs_d < D
            wd = tl.load(wd_ptr + rb[:, None] * stride_wdb + rd[None, :] * stride_wdd,
                         mask=mask_b[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)
            dh = tl.dot(dpre_c, wd, input_precision=PRECISION)
            tl.store(dh_ptr + rm[:, None] * stride_dhm + rd[None, :] * stride_dhd,
                     dh.to(dh_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ============================================================================ launch configurations

# The BLOCK_M x bottleneck fp32 tiles (pre, da, dpre) live in registers: at most 32 elements of
# each per thread, or ptxas spills (measured: 32 x 256 on 4 warps, 64 per thread, spills).
ELEMENTS_PER_THREAD = 32


def _fits_registers(config, block_b: int) -> bool:
    return config.kwargs["BLOCK_M"] * block_b <= ELEMENTS_PER_THREAD * 32 * config.num_warps


def _prune(configs, named_args, **kwargs):
    """Configs whose bottleneck tiles fit the registers, no taller than the token count needs;
    never empty (the smallest tile, most warps, for bottlenecks beyond every config)."""
    block_b = kwargs["BLOCK_B"]
    m = named_args["M_BUCKET"]
    kept = [c for c in configs if _fits_registers(c, block_b) and c.kwargs["BLOCK_M"] <= max(16, m)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] / c.num_warps))]


def _unaligned_ok(config) -> bool:
    """D or DOUT not a multiple of 16: the 16-row, 8-warp tile alone, the only one that does not
    spill without vectorised loads (``bench/results/kernel-resources.md``, ``odd``)."""
    return config.kwargs["BLOCK_M"] == 16 and config.num_warps == 8


def _configs() -> list[triton.Config]:
    # Two pipeline stages: the bottleneck tiles already take the registers, and three stages of
    # fp32 h / weight tiles would not fit an A100's shared memory.
    def cfg(bm, warps):
        return triton.Config({"BLOCK_M": bm, "BLOCK_D": 64, "BLOCK_N": 64}, num_warps=warps, num_stages=2)
    return [cfg(64, 8), cfg(64, 4), cfg(32, 4), cfg(16, 4), cfg(16, 8)]


# Few, large tiles under the interpreter: it pays ~5 ms per tile iteration whatever the size.
_INTERPRETER = triton.Config({"BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_N": 128}, num_warps=4)
_KEY = ["M_BUCKET", "D", "B", "DOUT"]

FWD = Tuning("adapter_fwd", _adapter_fwd_kernel, _configs(), interpreter=_INTERPRETER, key=_KEY, prune=_prune,
             unaligned=_unaligned_ok)
BWD = Tuning("adapter_bwd", _adapter_bwd_kernel, _configs(), interpreter=_INTERPRETER, key=_KEY, prune=_prune,
             unaligned=_unaligned_ok)


# ============================================================================ host launchers

def _rows(M: int):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


@triton_op("odelta_fast::adapter_bottleneck_triton_fwd", mutates_args=())
def adapter_fwd(
    h: Tensor, down_weight: Tensor, down_bias: Optional[Tensor], up_weight: Tensor, up_bias: Optional[Tensor],
    residual: Optional[Tensor], activation: str, scaling: float, save_pre: bool,
) -> tuple[Tensor, Tensor]:
    """``(y, pre)``: ``pre = h Wd^T + bd`` as fp32 ``(M, pad_dim(b))`` when ``save_pre`` (what
    backward needs besides the weights), else empty."""
    M, D = h.shape
    B, DOUT = down_weight.shape[0], up_weight.shape[0]
    block_b = pad_dim(B)
    y = new_output((M, DOUT), h.dtype, h.device)
    pre = new_output((M, block_b), torch.float32, h.device) if save_pre else h.new_empty(0, dtype=torch.float32)
    res = residual if residual is not None else h
    FWD.launch(
        _rows(M),
        h, down_weight, down_bias if down_bias is not None else h, up_weight,
        up_bias if up_bias is not None else h, res, y, pre if save_pre else y,
        M, D, B, DOUT,
        h.stride(0), h.stride(1), down_weight.stride(0), down_weight.stride(1), up_weight.stride(0), up_weight.stride(1),
        res.stride(0), res.stride(1), y.stride(0), y.stride(1),
        down_bias.stride(0) if down_bias is not None else 0, up_bias.stride(0) if up_bias is not None else 0,
        scaling, m_bucket(M),
        HAS_BD=down_bias is not None, HAS_BU=up_bias is not None, HAS_RES=residual is not None, SAVE_PRE=save_pre,
        ACT=ACTIVATION_CODES[activation], DOT_DTYPE=dot_dtype(h.dtype), PRECISION=dot_precision(h.dtype),
        BLOCK_B=block_b,
    )
    return y, pre


@triton_op("odelta_fast::adapter_bottleneck_triton_bwd", mutates_args=())
def adapter_bwd(
    grad_y: Tensor, h: Tensor, pre: Tensor, down_weight: Tensor, up_weight: Tensor,
    has_down_bias: bool, has_up_bias: bool, activation: str, scaling: float, need_h: bool, need_w: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dh, dWd, dbd, dWu, dbu)``; gradients not asked for come back empty."""
    M, D = h.shape
    B, DOUT = down_weight.shape[0], up_weight.shape[0]
    dev, dtype = h.device, h.dtype
    block_b = pad_dim(B)
    empty = [h.new_empty(0) for _ in range(5)]  # distinct: a custom op's outputs may not alias
    dh = new_output((M, D), dtype, dev) if need_h else empty[0]
    act = new_output((M, block_b), dtype, dev) if need_w else grad_y
    dpre = new_output((M, block_b), dtype, dev) if need_w else grad_y
    if need_h or need_w:
        BWD.launch(
            _rows(M),
            pre, down_weight, up_weight, grad_y, dh if need_h else grad_y, act, dpre,
            M, D, B, DOUT,
            down_weight.stride(0), down_weight.stride(1), up_weight.stride(0), up_weight.stride(1),
            grad_y.stride(0), grad_y.stride(1), dh.stride(0) if need_h else 0, dh.stride(1) if need_h else 0,
            scaling, m_bucket(M),
            NEED_DH=need_h, NEED_W=need_w, ACT=ACTIVATION_CODES[activation], DOT_DTYPE=dot_dtype(dtype),
            PRECISION=dot_precision(dtype), BLOCK_B=block_b,
        )
    dwd, dbd, dwu, dbu = empty[1:]
    if need_w:
        # M-long reductions: cuBLAS / torch, in a fixed order (no atomics).
        act, dpre = act[:, :B], dpre[:, :B]
        dwu = (grad_y.t() @ act).mul_(scaling).to(up_weight.dtype)
        dwd = (dpre.t() @ h).to(down_weight.dtype)
        if has_down_bias:
            dbd = dpre.sum(0)
        if has_up_bias:
            dbu = grad_y.sum(0).mul_(scaling)
    return dh, dwd, dbd, dwu, dbu
