"""Bias delta (BitFit): ``y + bias`` broadcast over the last dimension."""
from __future__ import annotations

from torch import Tensor

from .backend import resolve_backend
from .checks import check_tensor

OP = "bias_add"


def bias_add(y: Tensor, bias: Tensor, *, backend: str = "auto") -> Tensor:
    check_tensor(OP, "y", y)
    check_tensor(OP, "bias", bias, (y.shape[-1],))
    if bias.device != y.device:
        raise ValueError(f"{OP}: argument 'bias' is on {bias.device}; expected {y.device} like 'y'")
    resolve_backend(OP, backend, y.device, implemented=())
    return y + bias.to(y.dtype)


def bias_backends() -> tuple[str, ...]:
    return ()
