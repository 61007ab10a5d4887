"""Pieces every kernel module shares: interpreter detection, dtype mapping, dropout, tile ordering,
the launch configurations of every kernel (``Tuning``) and the one function that launches them.

``TRITON_INTERPRET=1`` must be in the environment before this package is imported: ``triton.jit``
decides at decoration time whether a kernel is compiled or interpreted.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Callable, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

# Read once at import, like triton.jit does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# ``quick``: every autotuned kernel tries only its first GPU config (no benchmarking at all), for
# test runs on a GPU where autotuning each new shape would cost minutes and measure nothing.
AUTOTUNE_ENV = "ODELTA_AUTOTUNE"

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


def segment_schedule(counts: torch.Tensor, rows: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A block schedule over row segments (``counts[s]`` rows each, an expert's or a delta's):
    ``(block_segment, block_row, grid)``, each program's segment (-1: none, the program exits) and
    its first row inside it. Device ops only (no host read of the counts, so no synchronisation);
    ``grid`` bounds the blocks from the row count alone (``sum(cdiv(c_s, B)) <= cdiv(S, B) + E``),
    where a grid of ``cdiv(S, B) x E`` would launch a program per segment per possible block."""
    E = counts.shape[0]
    grid = triton.cdiv(rows, block_m) + E
    blocks = (counts + block_m - 1) // block_m
    ends = torch.cumsum(blocks, 0)
    b = torch.arange(grid, device=counts.device)
    segment = torch.searchsorted(ends, b, right=True)
    first = ends - blocks
    row = (b - first[segment.clamp(max=E - 1)]) * block_m
    segment = torch.where(segment < E, segment, torch.full_like(segment, -1))
    return segment, row, grid


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


# Shared memory one block may use (opt-in maximum), by compute capability, for when the driver
# cannot be asked (no GPU): H100 232,448 bytes, A100 166,912, consumer Ampere/Ada 101,376.
SMEM_BY_CAPABILITY = {(9, 0): 232448, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376}
SMEM_UNKNOWN = 101376


@functools.lru_cache(maxsize=None)
def max_shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one block can have on ``device`` (what a launch is checked against)."""
    if device.type != "cuda":
        return SMEM_BY_CAPABILITY[(9, 0)]
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # pragma: no cover - driver without the query
        return SMEM_BY_CAPABILITY.get(torch.cuda.get_device_capability(index), SMEM_UNKNOWN)


# Set by tests: outputs are allocated full of NaN instead of uninitialised, so an element a kernel
# forgets to write fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def new_output(shape, dtype, device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def deterministic() -> bool:
    """True when torch is asked for bit-identical results run to run: the kernels then take their
    paths without floating-point atomics (partial sums reduced in a fixed order)."""
    return torch.are_deterministic_algorithms_enabled()


# ============================================================================ launch configurations

_STATE = threading.local()


def _gpu_lists_forced() -> bool:
    return getattr(_STATE, "gpu_lists", False)


class Tuning:
    """The launch configurations of one kernel, and how it is launched.

    ``gpu`` is what a GPU may run: the autotune list when ``key`` is given, else the one fixed
    config (a list of one). ``interpreter`` is what Triton's interpreter runs by default (it cannot
    autotune: benchmarking needs a driver); tests switch the interpreter to the GPU lists
    (``gpu_configs()``) and force each config in turn (``forced``), so every config a GPU can choose
    is run on CPU too. ``prune`` (autotuned kernels) drops configs a device cannot run, e.g. by
    shared memory; it must keep at least one. ``unaligned(config)`` (optional) names the configs a
    launch that is not ``launch_aligned`` may use; the prune then chooses among those.
    """

    def __init__(self, name: str, kernel, gpu: Sequence[triton.Config], *, interpreter: Optional[triton.Config] = None,
                 key: Optional[list[str]] = None, prune: Optional[Callable] = None,
                 smem_bound: Optional[Callable] = None, unaligned: Optional[Callable] = None, min_arch: int = 80):
        self.name = name
        # The oldest GPU architecture (compute capability x 10) the kernel is launched on.
        self.min_arch = min_arch
        self.kernel = kernel
        self.gpu = list(gpu)
        self.interpreter = interpreter if interpreter is not None else self.gpu[0]
        if smem_bound is not None and prune is None:
            prune = prune_by_shared_memory(smem_bound)
        if unaligned is not None:
            prune = _unaligned_first(unaligned, prune)
        self.prune = prune
        # (config, named_args, launch kwargs) -> bytes: an upper bound of the shared memory the
        # config compiles to, which the prune compares with the device's limit.
        self.smem_bound = smem_bound
        self._forced: Optional[triton.Config] = None
        self.autotuner = None
        if key is not None:
            self.autotuner = triton.autotune(
                configs=self.configs(), key=key,
                prune_configs_by={"early_config_prune": prune} if prune is not None else None,
            )(kernel)
        if name in TUNINGS:
            raise ValueError(f"two kernels registered as {name!r}")
        TUNINGS[name] = self

    def configs(self) -> list[triton.Config]:
        """The configs a launch may choose from right now."""
        if self._forced is not None:
            return [self._forced]
        if INTERPRET:
            return [self.gpu[0]] if _gpu_lists_forced() else [self.interpreter]
        if os.environ.get(AUTOTUNE_ENV) == "quick":
            return self.gpu[:1]
        return list(self.gpu)

    def config(self) -> triton.Config:
        """The config of a fixed-tile kernel (one GPU config)."""
        return self.configs()[0]

    def _sync(self) -> None:
        if self.autotuner is not None:
            self.autotuner.configs = self.configs()
            self.autotuner.cache.clear()

    def launch(self, grid: Callable[[dict], tuple], *args, **kwargs) -> None:
        """Launch over ``grid(meta)`` (meta: the chosen config's parameters), on the device of the
        tensors in ``args`` (not the current device), skipping a launch with no programs."""
        if self.autotuner is not None:
            if 0 in grid(self.configs()[0].kwargs):
                return  # grids are cdiv(size, tile): empty for one config means empty for all
            with device_guard(args):
                wrap_triton(self.autotuner)[grid](*args, **kwargs)
            return
        cfg = self.config()
        dims = grid(cfg.kwargs)
        if 0 in dims:
            return
        with device_guard(args):
            wrap_triton(self.kernel)[dims](*args, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                           **kwargs)


TUNINGS: dict[str, Tuning] = {}


def _first_tensor(named_args: dict) -> torch.Tensor:
    return next(v for v in named_args.values() if isinstance(v, torch.Tensor))


def launch_aligned(named_args: dict) -> bool:
    """Whether a launch's feature sizes (K, N; an adapter's D, DOUT) are all multiples of 16: for
    contiguous operands the row strides then are too, the specialization under which the compiler
    vectorises the big loads. Without it, the pipelined configs keep every element's address and
    value in registers and spill (the ``odd`` rows of ``bench/results/kernel-resources.md``), so
    the prunes keep the configs that do not. (The rank's strides do not count: a rank-r operand is
    one small load per tile.)"""
    return all(named_args[k] % 16 == 0 for k in ("K", "N", "D", "DOUT") if k in named_args)


def _unaligned_first(unaligned: Callable, prune: Optional[Callable]):
    """``prune`` run on the configs ``unaligned`` accepts when the launch is not ``launch_aligned``
    (on all of them otherwise, or when it accepts none)."""
    def pruned(configs, named_args, **kwargs):
        if not launch_aligned(named_args):
            configs = [c for c in configs if unaligned(c)] or configs
        return prune(configs, named_args, **kwargs) if prune is not None else configs
    return pruned


def prune_by_shared_memory(smem_bound: Callable):
    """An autotune prune: the configs whose shared-memory bound fits the launch's device, and no
    taller than the token count needs (``M_BUCKET``). Never empty: falls back to the config with
    the smallest bound, then the shortest. ``tests/ops/compile_for_gpu.py`` checks the bound
    against the compiler and that what is kept fits and does not spill."""
    def prune(configs, named_args, **kwargs):
        limit = max_shared_memory(_first_tensor(named_args).device)
        bounds = {id(c): smem_bound(c, named_args, kwargs) for c in configs}
        fits = [c for c in configs if bounds[id(c)] <= limit] or [min(configs, key=lambda c: bounds[id(c)])]
        m = named_args.get("M_BUCKET", 1 << 30)
        short = [c for c in fits if c.kwargs["BLOCK_M"] <= max(16, m)]
        return short or [min(fits, key=lambda c: c.kwargs["BLOCK_M"])]
    return prune


def _sync_all() -> None:
    for tuning in TUNINGS.values():
        tuning._sync()


@contextlib.contextmanager
def gpu_configs():
    """Under the interpreter, launch with the GPU config lists (the first config of each unless
    one is ``forced``) instead of the interpreter's: what a GPU runs, on CPU."""
    old = _gpu_lists_forced()
    _STATE.gpu_lists = True
    _sync_all()
    try:
        yield
    finally:
        _STATE.gpu_lists = old
        _sync_all()


@contextlib.contextmanager
def forced(name: str, config: triton.Config):
    """Launch kernel ``name`` with ``config`` alone: no autotuning, no pruning."""
    tuning = TUNINGS[name]
    old = tuning._forced
    tuning._forced = config
    tuning._sync()
    try:
        yield
    finally:
        tuning._forced = old
        tuning._sync()


def config_id(config: triton.Config) -> str:
    """A short readable name of a config, for test ids and tables."""
    parts = [f"{k.replace('BLOCK_', '').lower()}{v}" for k, v in config.kwargs.items()]
    return "-".join(parts + [f"w{config.num_warps}", f"s{config.num_stages}"])


# ============================================================================ device placement

def _launch_device(args) -> Optional[torch.device]:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device
    return None


@contextlib.contextmanager
def device_guard(args):
    """Make the tensors' CUDA device current for the launch: Triton launches on the current
    device, which under ``device_map="auto"`` is often not the one holding the tensors."""
    device = _launch_device(args)
    if device is None or device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        yield


# ============================================================================ shared device code

@triton.jit
def draw_uniform(seed, rows, k0, K, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Uniform [0, 1) numbers for the tile (rows, k0 : k0 + BLOCK_K) of an M x K input. One philox
    call gives four 32-bit numbers: columns 4c .. 4c + 3 of row m share the call with counter
    ``m * cdiv(K, 4) + c`` (64 bits: no wrap at M * K >= 2**31), a quarter of the rounds of one
    call per element. ``k0`` is a multiple of 4. Element (m, k) is kept by dropout when its number
    is >= p. Drawn once per forward (in the shrink), then stored packed (``pack_keep``)."""
    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    counters = rows.to(tl.int64)[:, None] * tl.cdiv(K, 4) + groups.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    # join stacks on a new last axis: [..., i, j] is (r0, r2)[i] for j = 0 and (r1, r3)[i] for j = 1,
    # so the flattened (i, j) runs r0, r1, r2, r3 within each group of four columns
    lanes = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_K))
    return tl.random.uint_to_uniform_float(lanes)


@triton.jit
def pack_keep(uniform, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """The keep mask ``uniform >= p`` of a BLOCK_M x BLOCK_K tile as BLOCK_M x BLOCK_K/8 bytes: bit j
    of byte c is column 8c + j. The comparison happens after the reshape, on purpose: a boolean
    tile reshaped would pass through shared memory as 1-bit elements, which the compiler rejects."""
    u = tl.reshape(uniform, (BLOCK_M, BLOCK_K // 8, 8))
    weights = (1 << tl.arange(0, 8))
    return tl.sum(tl.where(u >= p, weights[None, None, :], 0), axis=2).to(tl.uint8)


@triton.jit
def load_keep(bits_ptr, stride_bits, rows, cols, mask):
    """The stored keep mask of the elements (rows, cols): one byte load per element (a warp's
    neighbouring columns share bytes, so the loads coalesce), then the element's bit."""
    byte = tl.load(bits_ptr + rows.to(tl.int64)[:, None] * stride_bits + (cols // 8).to(tl.int64)[None, :],
                   mask=mask, other=0)
    return ((byte.to(tl.int32) >> (cols % 8)[None, :]) & 1) != 0


@triton.jit
def step64(block: tl.constexpr, stride):
    """``block * stride`` in 64 bits (a pointer advance that cannot wrap), whether the launch made
    ``stride`` a runtime int32 or, when it equals 1, a compile-time constant."""
    return tl.full((), block, tl.int64) * stride


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
