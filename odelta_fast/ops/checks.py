"""Input validation shared by every op: one message format naming the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _fmt_shape(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_tensor(
    op: str,
    name: str,
    tensor: Optional[torch.Tensor],
    shape: Optional[Sequence[Optional[int]]] = None,
    *,
    like: Optional[torch.Tensor] = None,
    optional: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``tensor`` has ``shape`` (None entries match anything)
    and shares device and dtype with ``like``."""
    if tensor is None:
        if optional:
            return
        raise ValueError(f"{op}: argument {name!r} is required, got None")
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{op}: argument {name!r} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: argument {name!r} has dtype {tensor.dtype}; expected a floating dtype")
    if shape is not None:
        ok = tensor.dim() == len(shape) and all(e is None or e == s for e, s in zip(shape, tensor.shape))
        if not ok:
            expected = _fmt_shape("*" if e is None else e for e in shape)
            raise ValueError(f"{op}: argument {name!r} has shape {_fmt_shape(tensor.shape)}; expected {expected}")
    if like is not None:
        if tensor.device != like.device:
            raise ValueError(f"{op}: argument {name!r} is on {tensor.device}; expected {like.device} like the input")
        if tensor.dtype != like.dtype:
            raise ValueError(f"{op}: argument {name!r} has dtype {tensor.dtype}; expected {like.dtype} like the input")


def check_probability(op: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{op}: argument {name!r} is {value}; expected 0 <= {name} < 1")


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype active for ``device``, or None outside autocast."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None
