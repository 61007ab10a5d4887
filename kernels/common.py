"""Pieces every kernel module shares: interpreter detection, dtype mapping, dropout, tile ordering.

``TRITON_INTERPRET=1`` must be in the environment before this package is imported: ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted, and the autotune config
lists below are chosen at import time too.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once at import, like triton.jit does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Kernels take fp16, bf16 and fp32 tensors; anything else goes to the eager path.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# Smallest tile side tl.dot accepts on NVIDIA for 16-bit inputs (backends/nvidia min_dot_size);
# the interpreter accepts smaller and would hide the compile error, so ranks are padded here.
MIN_DOT = 16


def dot_dtype(dtype: torch.dtype):
    """The dtype tiles are converted to right after ``tl.load``, before any arithmetic or dot.

    The interpreter simulates with numpy, which has no bfloat16: bf16 dots and arithmetic give
    garbage there, so under the interpreter bf16 tiles are widened to fp32 (exact)."""
    if dtype == torch.bfloat16 and INTERPRET:
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs: "ieee" so results match torch's fp32 matmul (tf32 would be ~1e-3 relative off
    # and fail the tolerance rule); ignored for 16-bit inputs and by the interpreter.
    return "ieee" if dtype == torch.float32 else "tf32"


def pad_dim(n: int) -> int:
    """Power-of-two tile side >= MIN_DOT covering ``n`` (ranks, bottlenecks)."""
    return max(MIN_DOT, triton.next_power_of_2(int(n)))


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, capped, so a new sequence length
    reuses the tuned config of its bucket instead of retuning."""
    return min(triton.next_power_of_2(max(int(m), 1)), 8192)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


# Set by tests: outputs are allocated full of NaN instead of uninitialised, so an element a kernel
# forgets to write fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p, inv_keep):
    """Inverted-dropout multiplier (0 or 1/(1-p)) for the elements (offs_m, offs_k) of an M x K
    input, drawn with philox from ``seed`` and the element's linear offset ``m * K + k``: the same
    seed gives the same mask in every kernel, so backward regenerates it instead of storing it.
    Offsets are int32 (the fast philox path): for M * K >= 2**31 they wrap, and the mask pattern
    repeats with period 2**32 elements, identically in forward and backward."""
    offs = offs_m[:, None] * K + offs_k[None, :]
    rnd = tl.rand(seed, offs)
    return tl.where(rnd >= p, inv_keep, 0.0)


@triton.jit
def swizzle_2d(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row-blocks share each column block while it is in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n
