"""Bias delta (BitFit) launchers: ``y + b`` and its gradient ``db = sum over rows of dY`` (the
autograd around them is ``odelta_fast.ops.bias``'s).

Inside the LoRA kernels the bias rides in the GEMM epilogue and its gradient in the pass that
already reads dY (``lora._lora_bwd_dy_kernel``). This module is the stand-alone op for a bias delta
on a module whose output comes from elsewhere: one pass to add, and in backward one pass over dY
for the column sums (dY itself flows through unchanged, so no copy is made).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op

from .common import Tuning, new_output, num_sms

# ============================================================================ kernels


@triton.jit
def _bias_add_kernel(y_ptr, b_ptr, out_ptr, M, N, stride_ym, stride_yn, stride_om, stride_on, stride_b,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = offs_m.to(tl.int64)
    rn = offs_n.to(tl.int64)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = tl.load(y_ptr + rm[:, None] * stride_ym + rn[None, :] * stride_yn, mask=mask, other=0.0)
    b = tl.load(b_ptr + rn * stride_b, mask=offs_n < N, other=0.0)
    # Same rounding as torch's y + b: one add in fp32, one rounding to the output dtype.
    out = y.to(tl.float32) + b.to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :] * stride_on,
             out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_grad_kernel(dy_ptr, part_ptr, M, N, rows_per_split, stride_dym, stride_dyn,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """part[s, n] = sum of dY[rows of split s, n] in fp32 (deterministic: no atomics)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rn = offs_n.to(tl.int64)
    pid_s = tl.program_id(1)
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rm = offs_m.to(tl.int64)
        dy = tl.load(dy_ptr + rm[:, None] * stride_dym + rn[None, :] * stride_dyn,
                     mask=(offs_m < m_end)[:, None] & mask_n[None, :], other=0.0)
        acc += tl.sum(dy.to(tl.float32), axis=0)
    tl.store(part_ptr + pid_s.to(tl.int64) * N + rn, acc, mask=mask_n)


# ============================================================================ launch configurations

# add: 32 x 128 tiles = 4K elements per program; 128 columns = coalesced 256-byte rows in 16-bit.
# Eight warps: four spilled on sm_90 when N is not a multiple of 16. The interpreter pays per
# program, so it gets taller tiles.
ADD = Tuning("bias_add", _bias_add_kernel, [triton.Config({"BLOCK_M": 32, "BLOCK_N": 128}, num_warps=8)],
             interpreter=triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4))
# grad: 64 rows per iteration of the column-sum loop.
GRAD = Tuning("bias_grad", _bias_grad_kernel, [triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4)])


# ============================================================================ host launchers

@triton_op("odelta_fast::bias_add_triton", mutates_args=())
def bias_add_fwd(y: Tensor, bias: Tensor) -> Tensor:
    M, N = y.shape
    out = new_output((M, N), y.dtype, y.device)
    ADD.launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        y, bias, out, M, N, y.stride(0), y.stride(1), out.stride(0), out.stride(1), bias.stride(0),
    )
    return out


@triton_op("odelta_fast::bias_grad_triton", mutates_args=())
def bias_grad(grad_y: Tensor, dtype_like: Tensor) -> Tensor:
    """Column sums of a 2-D ``grad_y`` in fp32, returned in ``dtype_like``'s dtype."""
    M, N = grad_y.shape
    cfg = GRAD.config().kwargs
    n_blocks = triton.cdiv(N, cfg["BLOCK_N"])
    m_blocks = max(1, triton.cdiv(M, cfg["BLOCK_M"]))
    # Split rows so n_blocks x splits fills ~2 waves of SMs; the partial sums are added by torch
    # in a fixed order (identical run to run).
    splits = max(1, min(m_blocks, (2 * num_sms(grad_y.device)) // max(n_blocks, 1))) if grad_y.is_cuda else 1
    rows = triton.cdiv(m_blocks, splits) * cfg["BLOCK_M"]
    splits = max(1, triton.cdiv(M, rows))
    part = torch.zeros((splits, N), dtype=torch.float32, device=grad_y.device)
    GRAD.launch(
        lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), splits),
        grad_y, part, M, N, rows, grad_y.stride(0), grad_y.stride(1),
    )
    return part.sum(0).to(dtype_like.dtype)
