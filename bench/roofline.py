"""The traffic model behind the benchmark's roofline columns.

For LoRA linear, the big tensors are x and dX (M x K) and y and dY (M x N); every full read or
write of one is a *pass*. ``LORA_PASSES`` counts them per path, forward and backward, with dropout
off and on (the Triton paths keep the mask packed, 1 bit per element: M x K / 8 bytes, not a
pass). The frozen base layer makes one pass over each in each direction; what a path makes beyond
that is its cost over the base. ``tests/ops/test_lora_passes.py`` checks every entry against the
reads and writes the path really issues (torch ops and Triton launches, counted on CPU).

A row's roofline time is the larger of its FLOPs at the measured GEMM peak and its bytes at the
measured copy bandwidth; the fraction of the roofline is that time over the measured one.
"""
from __future__ import annotations

# path -> dropout on -> direction -> (passes over M x K, passes over M x N)
LORA_PASSES = {
    # x W^T; then dY W and nothing else (W is frozen)
    "base": {False: {"fwd": (1, 1), "bwd": (1, 1)}, True: {"fwd": (1, 1), "bwd": (1, 1)}},
    # cuBLAS mm for x W^T and x A^T, addmm_ of the low-rank term into y; backward: dY B, dY W, addmm_
    # of (dY B) A into dX, dA = (dY B)^T x. With dropout the M x K mask is regenerated and applied.
    "eager": {False: {"fwd": (2, 3), "bwd": (4, 3)}, True: {"fwd": (9, 3), "bwd": (14, 3)}},
    # the low-rank term written first (M x N forward, M x K for dX) and cuBLAS adding its GEMM onto
    # it (beta = 1: read and write); the shrink and dA read x once each, the dY pass reads dY once.
    "split": {False: {"fwd": (2, 3), "bwd": (4, 2)}, True: {"fwd": (2, 3), "bwd": (4, 2)}},
    # the low-rank terms inside the GEMM accumulators: the shrink, dA and the dY pass are the only extras
    "fused": {False: {"fwd": (2, 1), "bwd": (2, 2)}, True: {"fwd": (2, 1), "bwd": (2, 2)}},
    # the fused path on the persistent TMA GEMM: the same launches, the same passes
    "persistent": {False: {"fwd": (2, 1), "bwd": (2, 2)}, True: {"fwd": (2, 1), "bwd": (2, 2)}},
    # PEFT's Linear: base, lora_B(lora_A(dropout(x))) * scaling, then an add, each an op of its own
    "peft": {False: {"fwd": (2, 7), "bwd": (6, 5)}, True: {"fwd": (9, 7), "bwd": (9, 5)}},
}
# Backends that run a LoRA path: "triton" runs what the dispatch table picks (split where unmeasured).
LORA_PATH_OF = {"triton": "split"}


def lora_passes(provider: str, dropout: float, mode: str) -> tuple[int, int]:
    """``(passes over M x K, passes over M x N)`` for ``mode`` "fwd" or "fwd+bwd"."""
    table = LORA_PASSES[LORA_PATH_OF.get(provider, provider)][dropout > 0]
    mk, mn = table["fwd"]
    if mode == "fwd+bwd":
        mk, mn = mk + table["bwd"][0], mn + table["bwd"][1]
    return mk, mn


def lora_extra_passes(provider: str, dropout: float, mode: str = "fwd+bwd") -> int:
    """Passes over M x K and M x N beyond the frozen base layer's."""
    mk, mn = lora_passes(provider, dropout, mode)
    base_mk, base_mn = lora_passes("base", dropout, mode)
    return mk - base_mk + mn - base_mn


def lora_bytes(provider: str, M: int, K: int, N: int, r: int, elem_bytes: int, dropout: float, mode: str) -> int:
    """Bytes a LoRA layer moves: its passes, the weight once per GEMM, the rank-r factors and M x r
    intermediates once each way, and the packed dropout mask where the path keeps one."""
    mk, mn = lora_passes(provider, dropout, mode)
    gemms = 1 if mode == "fwd" else 2
    low_rank = 0 if provider == "base" else (r * (K + N) + 2 * M * r) * gemms
    mask = M * K // 8 * (1 + 2 * (mode != "fwd")) if dropout > 0 and provider in ("split", "fused", "persistent", "triton") else 0
    return (mk * M * K + mn * M * N + gemms * N * K + low_rank) * elem_bytes + mask


def roofline_ms(flops: float, moved: float, gemm_tflops: float, copy_gbps: float) -> float:
    """The least time the device's measured GEMM peak and copy bandwidth allow."""
    return max(flops / (gemm_tflops * 1e12), moved / (copy_gbps * 1e9)) * 1e3
