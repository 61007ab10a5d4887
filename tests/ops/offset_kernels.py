"""Two tiny Triton kernels for the offset test in ``test_launch_hygiene.py`` (module level: a
``@triton.jit`` function resolves its globals, not a test function's locals)."""
import triton
import triton.language as tl

from odelta_fast.ops.backend import kernels

draw_uniform = kernels("common").draw_uniform


@triton.jit
def draw(seed_ptr, rows_ptr, cols_ptr, out_ptr, K, N: tl.constexpr):
    """The dropout numbers at (rows x cols) of an M x K input, as the LoRA kernels draw them."""
    rows = tl.load(rows_ptr + tl.arange(0, N))
    cols = tl.load(cols_ptr + tl.arange(0, N))
    u = draw_uniform(tl.load(seed_ptr), rows, cols, K)
    tl.store(out_ptr + tl.arange(0, N)[:, None] * N + tl.arange(0, N)[None, :], u)


@triton.jit
def draw_flat(seed_ptr, offs_ptr, out_ptr, N: tl.constexpr):
    """tl.rand at explicit (64-bit) offsets."""
    tl.store(out_ptr + tl.arange(0, N), tl.rand(tl.load(seed_ptr), tl.load(offs_ptr + tl.arange(0, N))))
