"""LoRA: ``W x + s * B A dropout(x)`` on Linear and GPT-2 Conv1D projections.

The delta replaces the target's computation with one ``lora_linear`` op (base matmul plus the
low-rank update), which the fused kernels implement; the backbone's weight is only read.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops, peft_format
from ..addressing import NOT_A_PROJECTION, OWN_FORWARD, linear_forward_kind, linear_types, pattern_value
from ..checkpoint import CheckpointError
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase, DeltaModule
from ..ops.low_rank import lora_update
from .shapes import is_conv1d, linear_features

logger = logging.getLogger("odelta_fast")


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

    def fold_(self, target: nn.Module, param: torch.Tensor) -> None:
        ops.lora_merge_(param, self.lora_A, self.lora_B, self.scaling,
                        fan_in_fan_out=self.fan_in_fan_out, backend=self.backend)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}"


@dataclass
class LoraConfig(BaseDeltaConfig):
    """LoRA: rank ``lora_r``, scaling ``lora_alpha / lora_r`` (rsLoRA: ``/ sqrt(lora_r)``),
    dropout on the input of the low-rank path. ``rank_pattern`` / ``alpha_pattern`` override
    the rank / alpha of modules whose path ends with a match of the regex (PEFT's semantics)."""

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self):
        positive_int(self, "lora_r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})


class LoraModel(DeltaBase):
    """LoRA on Linear / Conv1D modules. Defaults to the query and value projections
    (``attn.q``, ``attn.v``), or the fused ``attn.qkv`` where the architecture fuses them."""

    delta_type = "lora"
    config_class = LoraConfig
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
        interactive_modify: bool = False,
        use_rslora: bool = False,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        name: Optional[str] = None,
    ):
        self.target_types = linear_types()
        DeltaBase.__init__(self, backbone_model, LoraConfig.from_arguments(locals()))

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
    def from_peft_config(cls, backbone_model: nn.Module, peft_config, **overrides) -> "LoraModel":
        """A fresh LoRA on the modules PEFT's ``get_peft_model(backbone_model, peft_config)`` would
        adapt, with its rank, alpha, dropout, rsLoRA, rank / alpha patterns, modules to save and
        initialisation (``True``: A Kaiming-uniform, B zero; ``"gaussian"``: A normal with std
        ``1/r``; ``False``: B Kaiming-uniform too). ``peft_config`` is a ``peft.LoraConfig`` or its
        dict; PEFT's matching rules are in ``odelta_fast.peft_format``. What PEFT refuses, or what
        plain LoRA on Linear / Conv1D cannot reproduce, raises ``ValueError``."""
        values = peft_format.peft_config_dict(peft_config)
        delta = cls(backbone_model, **{**peft_format.lora_kwargs_from_peft_config(backbone_model, values), **overrides})
        init = values.get("init_lora_weights", True)
        with torch.no_grad():
            for slot in delta.slots:
                if init == "gaussian":
                    nn.init.normal_(slot.delta.lora_A, std=1 / slot.delta.r)
                elif init is False:
                    nn.init.kaiming_uniform_(slot.delta.lora_B, a=math.sqrt(5))
        return delta

    @classmethod
    def from_peft(cls, path: str, backbone_model: nn.Module, **overrides) -> "LoraModel":
        """Load a LoRA checkpoint saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``);
        any mismatch raises ``CheckpointError`` and leaves the backbone as it was."""
        adapter = peft_format.read_peft_adapter(path)
        try:
            delta = cls(backbone_model, **{**adapter.lora_kwargs, **overrides})
        except ValueError as err:
            raise CheckpointError(f"cannot attach the PEFT adapter in {str(path)!r}: {err}") from None
        tensors = dict(adapter.module_tensors)
        for slot in delta.slots:
            if slot.path in adapter.factors:
                tensors[f"{slot.path}.{slot.child_name}.lora_A"] = adapter.factors[slot.path]["A"]
                tensors[f"{slot.path}.{slot.child_name}.lora_B"] = adapter.factors[slot.path]["B"]
        try:
            delta.load_delta_state_dict(tensors, expected_targets=sorted(adapter.factors), source=adapter.source)
        except BaseException:
            delta.remove()
            raise
        logger.info("loaded PEFT LoRA adapter from %s into %d modules", path, len(delta.slots))
        return delta

    def save_in_format(self, fmt: str, path: str) -> str:
        if fmt == "peft":
            return peft_format.save_peft(self, path)
        return super().save_in_format(fmt, path)


__all__ = ["LoraConfig", "LoraDelta", "LoraModel"]
