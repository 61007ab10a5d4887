"""LoRA: ``W x + s * B A dropout(x)`` on Linear and GPT-2 Conv1D projections.

The delta replaces the target's computation with one ``lora_linear`` op (base matmul plus the
low-rank update), which the fused kernels implement; the backbone's weight is only read.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..addressing import NOT_A_PROJECTION, OWN_FORWARD, linear_forward_kind, linear_types
from ..delta import DeltaBase, DeltaModule
from ..ops.low_rank import lora_update
from .shapes import is_conv1d, linear_features


class LoraDelta(DeltaModule):
    route_kind = "replace"
    mergeable = True

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, *,
        use_rslora: bool = False, fan_in_fan_out: bool = False, backend: str = "auto",
        device=None, dtype=None,
    ):
        super().__init__(backend)
        self.r, self.alpha, self.dropout, self.fan_in_fan_out = r, alpha, dropout, fan_in_fan_out
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        # Kaiming-uniform A and zero B: a fresh delta is an exact no-op (as in the LoRA paper and PEFT).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._weight_backup: Optional[torch.Tensor] = None

    def implemented_backends(self):
        return ops.lora.lora_backends()

    def _weight(self, target: nn.Module) -> torch.Tensor:
        return target.weight.t() if self.fan_in_fan_out else target.weight

    @staticmethod
    def _input(args, kwargs) -> torch.Tensor:
        if args:
            return args[0]
        return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))

    def _factors(self, dtype):
        a, b = self.lora_A, self.lora_B
        return (a, b) if a.dtype == dtype else (a.to(dtype), b.to(dtype))

    # A bias delta (BitFit) on the same module rides in the fused op's bias epilogue.
    fuses_bias = True

    def replace(self, target, original, args, kwargs, extra_bias=None):
        x = self._input(args, kwargs)
        lora_a, lora_b = self._factors(x.dtype)
        bias = target.bias
        if extra_bias is not None:
            extra_bias = extra_bias.to(x.dtype)
            bias = extra_bias if bias is None else bias + extra_bias
        return ops.lora_linear(
            x, self._weight(target), bias, lora_a, lora_b, self.scaling, self.dropout,
            training=self.training, backend=self.backend,
        )

    def parallel(self, target, args, kwargs):
        x = self._input(args, kwargs)
        lora_a, lora_b = self._factors(x.dtype)
        return lora_update(x, lora_a, lora_b, self.scaling, self.dropout, training=self.training, backend=self.backend)

    def merge(self, target: nn.Module) -> None:
        # The exact original bits are kept so unmerge restores them whatever the dtype's rounding.
        self._weight_backup = target.weight.detach().clone()
        ops.lora_merge_(target.weight, self.lora_A, self.lora_B, self.scaling,
                        fan_in_fan_out=self.fan_in_fan_out, backend=self.backend)

    def unmerge(self, target: nn.Module) -> None:
        if self._weight_backup is not None:
            target.weight.copy_(self._weight_backup)
            self._weight_backup = None
        else:  # pragma: no cover - merge always keeps a backup
            ops.lora_merge_(target.weight, self.lora_A, self.lora_B, self.scaling,
                            fan_in_fan_out=self.fan_in_fan_out, sign=-1, backend=self.backend)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


def pattern_value(patterns: dict, path: str, default):
    """The value of the first pattern that matches the end of ``path`` on a segment boundary."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


class LoraModel(DeltaBase):
    """LoRA on Linear / Conv1D modules. Defaults to the query and value projections
    (``attn.q``, ``attn.v``), or the fused ``attn.qkv`` where the architecture fuses them."""

    delta_type = "lora"
    default_modified_modules = ["attn.q", "attn.v"]

    def __init__(
        self,
        backbone_model: nn.Module,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        use_rslora: bool = False,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        name: Optional[str] = None,
    ):
        if not isinstance(lora_r, int) or lora_r < 1:
            raise ValueError(f"lora_r must be a positive integer, got {lora_r!r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
        self.target_types = linear_types()
        super().__init__(backbone_model, modified_modules, exclude_modules, unfrozen_modules, common_structure, backend, name)
        self.lora_r, self.lora_alpha, self.lora_dropout, self.use_rslora = lora_r, lora_alpha, lora_dropout, use_rslora
        # Per-module overrides, with PEFT's semantics (a regex matched against the end of the
        # module path), so PEFT checkpoints that use them load unchanged.
        self.rank_pattern, self.alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
        self.add_all_delta_to_backbone()

    def default_targets(self):
        # q and v where they are separate, the fused projection where they are not; a wrapper
        # holding both kinds of backbone gets each its own.
        return self.present_common_names([*self.default_modified_modules, "attn.qkv"])

    def build_delta(self, path, target):
        in_features, out_features = linear_features(target)
        kind = linear_forward_kind(target)
        if kind == NOT_A_PROJECTION:
            raise ValueError(
                f"LoRA cannot modify {path} ({type(target).__name__}): its own forward does not return the projection "
                "of its input (it returns a tuple or reshapes it); leave it out of modified_modules"
            )
        rank = pattern_value(self.rank_pattern, path, self.lora_r)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        delta = LoraDelta(
            in_features, out_features, rank, alpha, self.lora_dropout,
            use_rslora=self.use_rslora, fan_in_fan_out=is_conv1d(target), backend=self.backend,
            device=target.weight.device, dtype=target.weight.dtype,
        )
        if kind == OWN_FORWARD:
            # The module's own forward runs as it is and the low-rank update is added to its output;
            # folding B A into the weight would pass it through that forward's extra computation.
            delta.route_kind = "parallel"
            delta.mergeable = False
        return delta

    @classmethod
    def from_peft(cls, path: str, backbone_model: nn.Module, **overrides) -> "LoraModel":
        """Load a LoRA checkpoint saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``)."""
        from ..peft_format import load_peft

        return load_peft(path, backbone_model, **overrides)
