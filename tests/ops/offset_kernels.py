"""Two tiny Triton kernels for the offset test in ``test_launch_hygiene.py`` (module level: a
``@triton.jit`` function resolves its globals, not a test function's locals)."""
import triton
import triton.language as tl

from odelta_fast.ops.backend import kernels

draw_uniform = kernels("common").draw_uniform


@triton.jit
def draw(seed_ptr, rows_ptr, out_ptr, k0, K, N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The dropout numbers of the tile (rows, k0 : k0 + BLOCK_K) of an M x K input, as the LoRA
    kernels draw them."""
    rows = tl.load(rows_ptr + tl.arange(0, N))
    u = draw_uniform(tl.load(seed_ptr), rows, k0, K, N, BLOCK_K)
    tl.store(out_ptr + tl.arange(0, N)[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], u)


@triton.jit
def draw_flat(seed_ptr, counters_ptr, out_ptr, N: tl.constexpr):
    """The four philox numbers at explicit (64-bit) counters, as uniforms: out[i, lane]."""
    r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), tl.load(counters_ptr + tl.arange(0, N)))
    base = out_ptr + tl.arange(0, N) * 4
    tl.store(base, tl.random.uint_to_uniform_float(r0))
    tl.store(base + 1, tl.random.uint_to_uniform_float(r1))
    tl.store(base + 2, tl.random.uint_to_uniform_float(r2))
    tl.store(base + 3, tl.random.uint_to_uniform_float(r3))
