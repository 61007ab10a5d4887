"""LoRA on quantized bases (QLoRA): bitsandbytes ``Linear4bit`` (nf4 / fp4, double quantization)
and ``Linear8bitLt`` targets.

The base matmul stays bitsandbytes' (the module's own forward, unchanged); the low-rank update
``s (x A^T) B^T`` runs beside it through ``ops.lora_update`` and is added to its output. A and B
are float32 (as PEFT creates them; the packed weight has no floating dtype to follow) and are cast
to the activations' dtype in the forward. Shapes come from the module's ``in_features`` /
``out_features``: the packed weight's shape says nothing about them.

Merging into 4 / 8-bit weights would need requantization, whose rounding changes the outputs, so
``merge()`` refuses it with that explanation unless asked ``merge(dequantize=True)``: the module
then computes with a dequantized float copy of its weight with ``s B A`` folded in (one rounding,
fp32 accumulation); the packed weight is never written, so ``unmerge()`` returns to it exactly.
``merge_and_unload(dequantize=True)`` replaces each such module by a plain ``nn.Linear`` holding
that merged weight.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .. import ops
from ..delta import DeltaModule
from ..ops.low_rank import lora_update
from ..quantized import compute_dtype, dequantized_weight, quantization_of


class QuantizedLoraDelta(DeltaModule):
    """LoRA beside a bitsandbytes layer: same parameters, names and PEFT layout as ``LoraDelta``."""

    route_kind = "parallel"
    peft_factor_names = ("lora_A.weight", "lora_B.weight")  # PEFT's key suffixes for A and B
    mergeable = True
    dequantizes_on_merge = True
    fuses_bias = True
    fan_in_fan_out = False

    def __init__(self, target: nn.Module, r: int, alpha: float, dropout: float, *, use_rslora: bool = False,
                 backend: str = "auto"):
        super().__init__(backend)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        device = target.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, target.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(target.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # B zero: a fresh delta is a no-op
        self.route_kind = "parallel"
        self.quantization = quantization_of(target)
        self.register_buffer("merged_weight", None, persistent=False)

    def implemented_backends(self):
        return ops.lora.lora_backends()

    @staticmethod
    def _input(args, kwargs) -> torch.Tensor:
        if args:
            return args[0]
        return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))

    def parallel(self, target, args, kwargs):
        x = self._input(args, kwargs)
        if self.training and torch.is_grad_enabled() and not _warned_packed and _repacked_for_cpu(target):
            _warn_packed()
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return lora_update(x, a, b, self.scaling, self.dropout, training=self.training, backend=self.backend)

    @property
    def route_active(self) -> bool:
        # Merged, it still computes the module (from the dequantized merged weight): the packed
        # weight does not contain the delta.
        return True

    def merge(self, target: nn.Module) -> None:
        weight = dequantized_weight(target)  # float32 (out, in)
        ops.lora_merge_(weight, self.lora_A.detach(), self.lora_B.detach(), self.scaling, backend="eager")
        self.merged_weight = weight.to(compute_dtype(target))
        self.route_kind = "replace"

    def unmerge(self, target: nn.Module) -> None:
        self.merged_weight = None
        self.route_kind = "parallel"

    def replace(self, target, original, args, kwargs, extra_bias=None):
        x = self._input(args, kwargs)
        weight = self.merged_weight
        bias = target.bias.to(weight.dtype) if target.bias is not None else weight.new_zeros(weight.shape[0])
        if extra_bias is not None:
            bias = bias + extra_bias.to(weight.dtype)
        # bitsandbytes computes in its compute dtype and returns the input's dtype; so does this.
        return ops.linear_bias_delta(x.to(weight.dtype), weight, None, bias, backend="eager").to(x.dtype)

    def unloaded(self, target: nn.Module) -> nn.Linear:
        """A plain Linear computing what the merged module computes (``merge_and_unload``)."""
        if self.merged_weight is None:
            self.merge(target)
        weight = self.merged_weight
        linear = nn.Linear(target.in_features, target.out_features, bias=target.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if target.bias is not None:
                linear.bias.copy_(target.bias)
        linear.train(target.training)
        self.merged_weight = None
        self.route_kind = "parallel"
        return linear

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, "
                f"base={self.quantization} (bitsandbytes)")


_warned_packed = False


def _repacked_for_cpu(target: nn.Module) -> bool:
    state = getattr(target.weight, "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


def _warn_packed() -> None:
    global _warned_packed
    _warned_packed = True
    warnings.warn(
        "bitsandbytes repacked this model's 4-bit weights for its CPU inference kernel (it does so at the first "
        "no-grad forward in eval mode on CPUs with AVX512-BF16), and that kernel has no backward: gradients stop "
        "there. Train before evaluating under no_grad, or reload the model.", UserWarning, stacklevel=4)


__all__ = ["QuantizedLoraDelta"]
