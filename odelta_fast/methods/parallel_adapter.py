"""Parallel adapters (He et al.): a bottleneck fed a module's input and added to the output of the
same module, or of a later one (a span: OpenDelta's defaults span the attention block, and the
feed-forward from its up projection's input to its down projection's output).

Specs: ``"ff.w2"`` is a parallel adapter on one module; ``"ff.w1->ff.w2"`` spans from the first
module's input to the second's output, pairing the i-th match of each. A list written in
OpenDelta's common-name spelling (``["attn@", "attn@", "ff@.w1@", "ff@.w2@"]``) pairs
consecutive entries, as OpenDelta does. In a span, the adapter's parameters live on the module
whose output it joins; the first module carries a parameter-free tap that hands its input over.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..addressing import select_modules
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase, DeltaModule
from .adapter import AdapterModel
from .shapes import input_features, output_features, param_device_dtype

SPAN = "->"


@dataclass
class ParallelAdapterConfig(BaseDeltaConfig):
    """A bottleneck fed the module's input; its output times ``scaled`` is added to the module's."""

    delta_type: ClassVar[str] = "parallel_adapter"

    bottleneck_dim: int = 24
    non_linearity: str = "gelu_new"
    scaled: float = 1.0

    def validate(self):
        positive_int(self, "bottleneck_dim")
        ops.adapter.activation_fn(self.non_linearity)


class InputTap(DeltaModule):
    """On the first module of a span: keeps that module's input for the adapter on the last one."""

    route_kind = "pre"

    def __init__(self, backend: str = "auto"):
        super().__init__(backend)
        self.refer("held", None)

    def pre(self, target, args, kwargs):
        self.refer("held", args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor)))
        return args, kwargs

    def take(self, where: str) -> torch.Tensor:
        held = self.held
        if held is None:
            raise RuntimeError(f"the parallel adapter on {where} joins a span whose first module did not run first "
                               "in this forward")
        self.refer("held", None)
        return held


class ParallelAdapterModel(AdapterModel):
    """Across the attention block and across the feed-forward (from its up projection's input to
    its down projection's output) by default, as OpenDelta; ``scaled`` multiplies the adapter's
    output (OpenDelta accepted it and ignored it)."""

    delta_type = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules = ["attn", "ff.w1" + SPAN + "ff.w2"]
    route = "parallel"

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
        scaled: float = 1.0,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, ParallelAdapterConfig.from_arguments(locals()))

    def delta_kwargs(self, in_features: int, out_features: int) -> dict:
        return {"bottleneck_dim": self.bottleneck_dim, "non_linearity": self.non_linearity, "scaling": self.scaled}

    def default_targets(self):
        # A span needs both ends; without an up projection (fused or MoE feed-forwards) the
        # adapter sits across the down projection alone.
        names = self.present_common_names(["attn", "ff.w1", "ff.w2"])
        targets = ["attn"] if "attn" in names else []
        if "ff.w1" in names and "ff.w2" in names:
            targets.append("ff.w1" + SPAN + "ff.w2")
        elif "ff.w2" in names:
            targets.append("ff.w2")
        return targets

    def _spans(self) -> list[tuple[str, str]]:
        specs = list(self.modified_modules)
        if specs and len(specs) % 2 == 0 and all("@" in s for s in specs):
            return [(specs[i], specs[i + 1]) for i in range(0, len(specs), 2)]  # OpenDelta's pairs
        return [tuple(s.split(SPAN, 1)) if SPAN in s else (s, s) for s in specs]

    def select_targets(self):
        self._sources: dict[str, str] = {}  # last module of a span -> its first
        taps: dict[str, nn.Module] = {}
        ends: dict[str, nn.Module] = {}
        for first, last in self._spans():
            def select(spec):
                return select_modules(self.backbone_model, [spec], self.exclude_modules, structure=self.structure,
                                      common_structure=self.common_structure, module_types=self.target_types)
            if first == last:
                ends.update(select(last))
                continue
            starts, stops = select(first), select(last)
            if len(starts) != len(stops):
                raise ValueError(f"ParallelAdapterModel span {first!r} -> {last!r}: {len(starts)} modules start it and "
                                 f"{len(stops)} end it; each start needs one end")
            for (start_path, start), (stop_path, stop) in zip(starts, stops):
                taps[start_path] = start
                ends[stop_path] = stop
                self._sources[stop_path] = start_path
        self._taps: dict[str, InputTap] = {}
        return list(taps.items()) + list(ends.items())  # taps first: the adapters refer to them

    def build_delta(self, path, target):
        if path in self._sources.values() and path not in self._sources:
            tap = self._taps[path] = InputTap(self.backend)
            return tap
        source = self._sources.get(path)
        if source is None:
            return super().build_delta(path, target)
        start = dict(self.backbone_model.named_modules())[source]
        in_features = input_features(start, self.backbone_model)
        out_features = output_features(target, self.backbone_model)
        device, dtype = param_device_dtype(target, self.backbone_model)
        delta = self.delta_class(in_features, out_features, **self.delta_kwargs(in_features, out_features),
                                 backend=self.backend, device=device, dtype=dtype)
        delta.route_kind = "parallel"
        delta.refer("source", self._taps[source])
        return delta


__all__ = ["InputTap", "ParallelAdapterConfig", "ParallelAdapterModel"]
