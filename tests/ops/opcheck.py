"""Shared helpers for the op tests: devices, dtypes, and the tolerance rule.

Tolerance rule: a backend's error against the float64 reference may be at most twice the error
torch itself makes computing the same formula in the same dtype, plus a small absolute floor
scaled by the reference's magnitude (so exact-zero torch errors on tiny shapes do not demand
bit-exact kernels).
"""
from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

# Floors per dtype (about 8 ulp at magnitude 1).
FLOOR = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}

BF16_SKIP = "bfloat16 runs only on a GPU: Triton's interpreter has no bfloat16 (numpy lacks it)"


def triton_ok() -> bool:
    if CUDA:
        return True
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return os.environ.get("TRITON_INTERPRET") == "1"


def kernel_dtypes():
    """fp32 and fp16 everywhere; bf16 skipped with a visible reason without CUDA."""
    return [
        torch.float32,
        torch.float16,
        pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason=BF16_SKIP)),
    ]


needs_triton = pytest.mark.skipif(not triton_ok(), reason="triton not installed or TRITON_INTERPRET unset without CUDA")


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.detach().double() - ref.detach().double()).abs().max().item() if ref.numel() else 0.0


def assert_close_to_ref(out, ref64, torch_same_dtype, dtype, what: str, *, scale=None) -> None:
    """``out`` (backend under test) vs ``ref64`` (float64 reference), allowed 2x the error of
    ``torch_same_dtype`` (torch's own computation in ``dtype``) plus a floor. The floor is scaled
    by the reference's magnitude, or by ``scale`` where the result is a sum whose terms are larger
    than the sum (cancellation: the rounding of the terms sets the attainable accuracy)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out_d = out.detach().double()
    finite = torch.isfinite(out_d)
    if not finite.all():
        share = 100.0 * (1.0 - finite.double().mean().item())
        raise AssertionError(f"{what}: {share:.1f}% of {out_d.numel()} elements non-finite (unwritten output?)")
    scale = max(1.0, ref64.detach().abs().max().item() if ref64.numel() else 1.0, scale or 0.0)
    err = max_err(out, ref64)
    torch_err = max_err(torch_same_dtype, ref64)
    bound = 2.0 * torch_err + FLOOR[dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > 2 x torch {torch_err:.3g} + floor ({bound:.3g}), dtype {dtype}"


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values, last dimension strided: a view into a wider buffer."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    out = wide[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out.requires_grad_(t.requires_grad)


class LaunchCounter:
    """Counts the launches of one kernel (its ``Tuning``) inside a ``with`` block, so a test can
    assert that a path reached the kernel, or did not."""

    def __init__(self, tuning):
        self.tuning = tuning
        self.count = 0

    def __enter__(self):
        original = self.tuning.launch

        def counted(*args, **kwargs):
            self.count += 1
            return original(*args, **kwargs)

        self.tuning.launch = counted
        return self

    def __exit__(self, *exc):
        del self.tuning.launch  # back to the class's method
