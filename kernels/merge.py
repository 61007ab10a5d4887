"""Merge / unmerge a LoRA delta into the base weight in place: ``W += sign * s * B A``.

One pass over W: every program loads a W tile, computes its ``B A`` tile from the rank-r factors
with fp32 accumulation (tensor cores for 16-bit factors, ``ieee`` for fp32: no tf32 rounding),
adds, rounds once to W's dtype and stores in place.
GPT-2's ``Conv1D`` keeps W as (K, N) (``fan_in_fan_out``); that is only a swap of W's strides.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .common import Tuning, dot_dtype, dot_precision, pad_dim

# ============================================================================ kernel


@triton.jit
def _lora_merge_kernel(
    w_ptr, a_ptr, b_ptr, N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    alpha,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    rr = offs_r.to(tl.int64)
    rn = offs_n.to(tl.int64)
    rk = offs_k.to(tl.int64)
    mask_n = offs_n < N
    mask_k = offs_k < K
    mask_r = offs_r < R
    b = tl.load(b_ptr + rn[:, None] * stride_bn + rr[None, :] * stride_br,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)
    a = tl.load(a_ptr + rr[:, None] * stride_ar + rk[None, :] * stride_ak,
                mask=mask_r[:, None] & mask_k[None, :], other=0.0).to(DOT_DTYPE)
    # 16-bit factors on the tensor cores: their products are exact in the fp32 accumulator (11-bit
    # significands multiply into 22 bits), so only the sum's order differs from an fp32 FMA loop.
    delta = tl.dot(b, a, input_precision=PRECISION)
    ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :] * stride_wk
    mask = mask_n[:, None] & mask_k[None, :]
    w = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, (w + alpha * delta).to(w_ptr.dtype.element_ty), mask=mask)


# ============================================================================ launch configuration

# 64 x 128 tiles: 8K elements per program keeps the copy bandwidth-bound; the interpreter prefers
# few big tiles too. Eight warps: on four, a W whose sides are not multiples of 16 (per-element
# addresses, no vector loads) spilled on sm_80 and sm_90.
MERGE = Tuning("lora_merge", _lora_merge_kernel, [triton.Config({"BLOCK_N": 64, "BLOCK_K": 128}, num_warps=8)])


# ============================================================================ host launcher

@triton_op("odelta_fast::lora_merge_triton", mutates_args={"weight"})
def lora_merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, alpha: float, fan_in_fan_out: bool) -> None:
    """``weight += alpha * B A`` in place; ``weight`` is (N, K), or (K, N) when ``fan_in_fan_out``."""
    if fan_in_fan_out:
        K, N = weight.shape
        stride_wn, stride_wk = weight.stride(1), weight.stride(0)
    else:
        N, K = weight.shape
        stride_wn, stride_wk = weight.stride(0), weight.stride(1)
    R = lora_a.shape[0]
    MERGE.launch(
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(K, meta["BLOCK_K"])),
        weight, lora_a, lora_b, N, K, R,
        stride_wn, stride_wk, lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        alpha, DOT_DTYPE=dot_dtype(weight.dtype), PRECISION=dot_precision(weight.dtype), BLOCK_R=pad_dim(R),
    )
