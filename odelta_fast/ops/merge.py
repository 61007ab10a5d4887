"""Folding deltas into base weights in place, with fp32 accumulation.

Merging in the weight's own dtype would round ``B A`` before the add; accumulating in fp32 and
rounding once keeps a merged bf16 model as close as the format allows to the unmerged one.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import backend_for, kernels, register_op, triton_available
from .checks import check_tensor

OP = "lora_merge_"


def lora_delta_weight(lora_a: Tensor, lora_b: Tensor, scaling: float, *, fan_in_fan_out: bool = False) -> Tensor:
    """``s * B A`` in fp32, laid out like the base weight (``(K, N)`` when ``fan_in_fan_out``)."""
    delta = (lora_b.float() @ lora_a.float()).mul_(scaling)
    return delta.t() if fan_in_fan_out else delta


@torch.no_grad()
def lora_merge_(
    weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, *,
    fan_in_fan_out: bool = False, sign: int = 1, backend: str = "auto",
) -> Tensor:
    """``weight += sign * s * B A`` in place (``weight`` is ``(N, K)``, or ``(K, N)`` when
    ``fan_in_fan_out`` as in GPT-2's ``Conv1D``)."""
    if sign not in (1, -1):
        raise ValueError(f"{OP}: argument 'sign' is {sign}; expected 1 (merge) or -1 (unmerge)")
    check_tensor(OP, "weight", weight, (None, None))
    n, k = (weight.shape[1], weight.shape[0]) if fan_in_fan_out else tuple(weight.shape)
    check_tensor(OP, "lora_a", lora_a, (None, k))
    check_tensor(OP, "lora_b", lora_b, (n, lora_a.shape[0]))
    lora_a, lora_b = lora_a.to(weight.device), lora_b.to(weight.device)
    chosen = backend_for(OP, [weight, lora_a, lora_b], backend)
    if chosen == "cuda":
        from . import cuda_ext

        cuda_ext.lora_merge_(weight, lora_a, lora_b, float(sign * scaling), fan_in_fan_out)
        return weight
    if chosen == "triton":
        kernels("merge").lora_merge_(weight, lora_a, lora_b, float(sign * scaling), fan_in_fan_out)
        return weight
    delta = lora_delta_weight(lora_a, lora_b, scaling, fan_in_fan_out=fan_in_fan_out)
    weight.copy_(weight.float().add_(delta, alpha=sign))
    return weight


@torch.no_grad()
def bias_merge_(bias: Tensor, delta: Tensor, *, sign: int = 1) -> Tensor:
    check_tensor("bias_merge_", "delta", delta, tuple(bias.shape))
    bias.copy_(bias.float().add_(delta.to(bias.device).float(), alpha=sign))
    return bias


def merge_backends() -> tuple[str, ...]:
    return ("triton", "cuda")


def cuda_or_fallback(chosen: str, **_) -> str:
    """``cuda`` only where the extension builds (it warned once otherwise): Triton, else eager."""
    if chosen != "cuda":
        return chosen
    from . import cuda_ext

    if cuda_ext.available():
        return "cuda"
    return "triton" if triton_available() else "eager"


register_op(OP, merge_backends, cuda_or_fallback)
