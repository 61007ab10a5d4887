"""BitFit: a trainable bias added to the output of each targeted module.

The delta is an additive bias vector (zero at start), not the backbone's own bias: training it
gives the same gradients as unfreezing the existing bias, but it also works on modules without
a bias (LLaMA projections, RMSNorm), it saves as a delta, and it detaches. ``merge()`` folds it
into the module's own bias where there is one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..addressing import NOT_A_PROJECTION, PLAIN_LINEAR, backbone_modules, is_delta_module, linear_forward_kind
from ..configs import BaseDeltaConfig
from ..delta import DeltaBase, DeltaModule
from ..routing import map_hidden
from ..projections import is_conv1d
from .shapes import output_features


class BiasDelta(DeltaModule):
    # "bias": folded into the bias of the GEMM that produces the target's output where there is
    # one (the target's own Linear / Conv1D, or a LoRA on it), added to the output otherwise.
    route_kind = "bias"
    merge_parameter = "bias"

    def __init__(self, features: int, *, mergeable: bool, fusable: bool = False, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(backend)
        self.bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))
        self.mergeable = mergeable
        self._fusable = fusable

    def implemented_backends(self):
        return ops.bias_backends()

    def op_call(self, target: nn.Module):
        return "bias_add", {}

    def bias_vector(self) -> torch.Tensor:
        return self.bias

    def can_fuse(self, target) -> bool:
        return self._fusable

    def fused_forward(self, target, args, kwargs, extra_bias):
        x = args[0] if args else next(iter(kwargs.values()))
        weight = target.weight.t() if is_conv1d(target) else target.weight
        return ops.linear_bias_delta(x, weight, target.bias, extra_bias, backend=self.backend)

    def add_to(self, output, extra_bias):
        return map_hidden(output, lambda h: ops.bias_add(h, extra_bias, backend=self.backend))

    def fold_(self, target, param):
        ops.bias_merge_(param, self.bias)


def _is_leaf(module: nn.Module) -> bool:
    # Deltas attached earlier (a LoRA on a projection) are children but not part of the backbone:
    # the projection stays a leaf, so the result does not depend on attach order.
    return all(is_delta_module(child) for child in module.children())


def _bias_targets(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaves of ``module`` that produce a biasable output: projections and norms."""
    if _is_leaf(module):
        return [("", module)]
    return [(path, sub) for path, sub in backbone_modules(module) if path and _is_leaf(sub) and _has_width(sub)]


def _has_width(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        # a router returning (scores, indices) has no hidden-state output to bias
        return linear_forward_kind(module) != NOT_A_PROJECTION
    if isinstance(module, nn.LayerNorm):
        return True
    weight = getattr(module, "weight", None)
    return isinstance(weight, nn.Parameter) and weight.dim() == 1


@dataclass
class BitFitConfig(BaseDeltaConfig):
    """BitFit has no hyper-parameters of its own: only which modules get a bias."""

    delta_type: ClassVar[str] = "bitfit"


class BitFitModel(DeltaBase):
    """Bias terms on the attention and feed-forward projections and the layer norms."""

    delta_type = "bitfit"
    config_class = BitFitConfig
    default_modified_modules = ["attn", "ff", "attn.layer_norm", "ff.layer_norm"]

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, BitFitConfig.from_arguments(locals()))

    def default_targets(self):
        return self.present_common_names(self.default_modified_modules)

    def select_targets(self):
        # A non-leaf target (a whole attention block) spreads to its biasable leaves; each leaf
        # gets one bias even when several specs reach it.
        seen: dict[int, tuple[str, nn.Module]] = {}
        for path, module in super().select_targets():
            for sub_path, leaf in _bias_targets(module):
                full = f"{path}.{sub_path}" if sub_path else path
                seen.setdefault(id(leaf), (full, leaf))
        return list(seen.values())

    def build_delta(self, path, target):
        weight = next((p for p in target.parameters(recurse=False) if p.is_floating_point()), None)
        has_bias = isinstance(getattr(target, "bias", None), nn.Parameter)
        linear = isinstance(target, nn.Linear) or is_conv1d(target)
        # A Linear subclass with a forward of its own keeps running it: the bias is added to its output.
        plain = not linear or linear_forward_kind(target) == PLAIN_LINEAR
        return BiasDelta(
            output_features(target, self.backbone_model), mergeable=has_bias and plain, fusable=linear and plain,
            backend=self.backend,
            device=weight.device if weight is not None else None, dtype=weight.dtype if weight is not None else None,
        )


__all__ = ["BiasDelta", "BitFitConfig", "BitFitModel"]
