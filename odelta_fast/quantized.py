"""Quantized linear layers (bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``), recognised by what
they are: a Linear whose weight is packed (``Params4bit``: uint8 with a ``quant_state``) or int8
with row scales (``Int8Params``: ``SCB``). Nothing here imports bitsandbytes unless such a module
exists, so the package works where bitsandbytes is absent.

Their forward is bitsandbytes' (it dequantizes on the fly); deltas add to its output and never
read the packed weight as a matrix. ``dequantized_weight`` gives the ``(out, in)`` floating weight
a merge needs (``merge(dequantize=True)``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def quantization_of(module: nn.Module) -> Optional[str]:
    """``"4bit"``, ``"8bit"``, or None for a module that is not a quantized Linear."""
    if not isinstance(module, nn.Linear):
        return None
    weight = module.__dict__.get("_parameters", {}).get("weight")
    if weight is None:
        return None
    kind = type(weight).__name__
    if kind == "Params4bit" or (weight.dtype == torch.uint8 and hasattr(weight, "quant_state")):
        return "4bit"
    if kind == "Int8Params" or (weight.dtype == torch.int8 and hasattr(weight, "SCB")):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    return quantization_of(module) is not None


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the layer computes in: its ``compute_dtype`` (4-bit), else its bias's,
    else float32. Delta parameters on a quantized layer are created in float32 (as PEFT does)."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.is_floating_point():
        return bias.dtype
    return torch.float32


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as an ``(out_features, in_features)`` float32 matrix: what its own
    forward multiplies by."""
    kind = quantization_of(module)
    weight = module.weight
    if kind == "4bit":
        state = weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacked the weight for its CPU kernel (an eval forward does that on
            # CPUs with AVX512-BF16); read it back through the layer itself, one identity block at
            # a time, rather than through a private unpacking routine.
            return _weight_through_forward(module)
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(weight.data, state).float().reshape(module.out_features, module.in_features)
    if kind == "8bit":
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = module.state.SCB
        return weight.data.float() * (scales.float().to(weight.device).view(-1, 1) / 127.0)
    raise TypeError(f"{type(module).__name__} is not a bitsandbytes quantized Linear")


def _weight_through_forward(module: nn.Module, block: int = 256) -> torch.Tensor:
    dtype = compute_dtype(module)
    cols = []
    was_training = module.training
    module.eval()
    try:
        for start in range(0, module.in_features, block):
            stop = min(start + block, module.in_features)
            eye = torch.zeros(stop - start, module.in_features, dtype=dtype, device=module.weight.device)
            eye[:, start:stop] = torch.eye(stop - start, dtype=dtype, device=eye.device)
            out = type(module).forward(module, eye).float()
            if module.bias is not None:
                out = out - module.bias.float()
            cols.append(out.t())
    finally:
        module.train(was_training)
    return torch.cat(cols, dim=1)
