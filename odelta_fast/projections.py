"""What counts as a linear projection, decided in one place: ``nn.Linear`` (and subclasses) and
transformers' ``Conv1D`` (GPT-2 and its relatives), a Linear whose weight is stored ``(in, out)``.

Addressing (``all-linear``, type checks), the structure inference, and the methods that read a
target's widths all ask here, so a new projection type is taught once.
"""
from __future__ import annotations

from typing import Optional

from torch import nn


def conv1d_type() -> Optional[type]:
    """transformers' ``Conv1D`` class, or None where transformers is not installed."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency; keep the package importable without it
        return None
    return Conv1D


def linear_types() -> tuple[type, ...]:
    """Module types that count as linear projections."""
    conv = conv1d_type()
    return (nn.Linear,) if conv is None else (nn.Linear, conv)


def is_conv1d(module: nn.Module) -> bool:
    conv = conv1d_type()
    return conv is not None and isinstance(module, conv)


def projection_shape(module: nn.Module) -> Optional[tuple[int, int]]:
    """``(in, out)`` of a linear projection, read from its weight; None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        weight = getattr(module, "weight", None)
        if weight is not None and weight.dim() == 2:
            return int(weight.shape[0]), int(weight.shape[1])
    return None


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear projection; ``TypeError`` for anything else."""
    shape = projection_shape(module)
    if shape is None:
        raise TypeError(f"{type(module).__name__} is not a Linear or Conv1D")
    return shape
