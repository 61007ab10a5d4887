"""Bottleneck adapters (Houlsby / Pfeiffer): ``h + s * up(act(down(h)))`` after a module.

``AdapterDelta`` holds the shared machinery; subclasses only say how the down and up weights
are parameterised (plain matrices here; Kronecker products in Compacter, low-rank factors in
the low-rank adapter). All of them compute through the one ``adapter_bottleneck`` op.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..addressing import REGEX_PREFIX
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase, DeltaModule
from ..routing import map_hidden
from .shapes import input_features, output_features, param_device_dtype


class AdapterDelta(DeltaModule):
    """A bottleneck adapter; ``route_kind`` sequential (after the module, on its output) or
    parallel (on the module's input, added to its output)."""

    route_kind = "sequential"

    def __init__(self, in_features: int, out_features: int, bottleneck_dim: int, non_linearity: str, *,
                 scaling: float = 1.0, layer_norm: bool = False, backend: str = "auto", device=None, dtype=None):
        super().__init__(backend)
        ops.adapter.activation_fn(non_linearity)  # fail at construction, not at the first forward
        self.non_linearity, self.scaling = non_linearity, scaling
        self.down_bias = nn.Parameter(torch.zeros(bottleneck_dim, device=device, dtype=dtype))
        self.up_bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        if layer_norm:
            self.layer_norm = nn.LayerNorm(in_features, device=device, dtype=dtype)
        else:
            self.layer_norm = None
        self.init_projections(in_features, out_features, bottleneck_dim, device=device, dtype=dtype)

    def init_projections(self, in_features, out_features, bottleneck_dim, *, device, dtype):
        self.down_weight = nn.Parameter(torch.empty(bottleneck_dim, in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
        # Zero up-projection: a new adapter is the identity, so attaching it changes nothing.
        self.up_weight = nn.Parameter(torch.zeros(out_features, bottleneck_dim, device=device, dtype=dtype))

    def projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(down (b, d_in), up (d_out, b))`` weights."""
        return self.down_weight, self.up_weight

    def _bottleneck(self, h: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
        down, up = self.projections()
        ln = self.layer_norm
        return ops.adapter_bottleneck(
            h, down, self.down_bias, up, self.up_bias, residual=residual, activation=self.non_linearity,
            scaling=self.scaling, layer_norm_weight=ln.weight if ln is not None else None,
            layer_norm_bias=ln.bias if ln is not None else None, layer_norm_eps=ln.eps if ln is not None else 1e-5,
            backend=self.backend,
        )

    def post(self, target, args, kwargs, output):
        return map_hidden(output, lambda h: self._bottleneck(h, residual=h))

    def parallel(self, target, args, kwargs):
        source = self.__dict__.get("source")  # the input tap of a span (parallel adapters)
        if source is not None:
            h = source.take(type(target).__name__)
        else:
            h = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        return self._bottleneck(h, residual=None)

    def implemented_backends(self):
        return ops.adapter.adapter_backends()

    def op_call(self, target: nn.Module):
        return "adapter_bottleneck", {}


@dataclass
class AdapterConfig(BaseDeltaConfig):
    """A bottleneck of ``bottleneck_dim`` with ``non_linearity`` between; its output times
    ``scaling`` is added to the module's output (``layer_norm``: normalise the adapter's input)."""

    delta_type: ClassVar[str] = "adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaling: float = 1.0
    layer_norm: bool = False

    def validate(self):
        positive_int(self, "bottleneck_dim")
        ops.adapter.activation_fn(self.non_linearity)


class AdapterModel(DeltaBase):
    """Sequential bottleneck adapters after the attention output and feed-forward down projections."""

    delta_type = "adapter"
    config_class = AdapterConfig
    default_modified_modules = ["attn.o", "ff.w2"]

    def __init__(
        self,
        backbone_model: nn.Module,
        bottleneck_dim: int = 24,
        non_linearity: str = "gelu_new",
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        scaling: float = 1.0,
        layer_norm: bool = False,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, AdapterConfig.from_arguments(locals()))

    delta_class = AdapterDelta
    route = "sequential"

    def default_targets(self):
        # ff.w2 is the feed-forward's down projection. A mixture-of-experts block has none (its
        # experts' weights are one tensor), so there the adapter goes after the whole ``ff``.
        targets = self.present_common_names(self.default_modified_modules)
        if "ff.w2" in self.default_modified_modules:
            lacking = self.structure.names_lacking("ff.w2", instead="ff")
            if lacking and "ff.w2" not in targets:
                targets.append("ff")  # no block has a single down projection
            elif lacking:
                targets.append(REGEX_PREFIX + "|".join(re.escape(name) for name in lacking))
        return targets

    def delta_kwargs(self, in_features: int, out_features: int) -> dict:
        return {"bottleneck_dim": self.bottleneck_dim, "non_linearity": self.non_linearity,
                "scaling": self.scaling, "layer_norm": self.layer_norm}

    def build_delta(self, path, target):
        out_features = output_features(target, self.backbone_model)
        in_features = out_features if self.route == "sequential" else input_features(target, self.backbone_model)
        device, dtype = param_device_dtype(target, self.backbone_model)
        delta = self.delta_class(in_features, out_features, **self.delta_kwargs(in_features, out_features),
                                 backend=self.backend, device=device, dtype=dtype)
        delta.route_kind = self.route
        return delta


__all__ = ["AdapterConfig", "AdapterDelta", "AdapterModel"]
