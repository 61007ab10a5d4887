"""Parallel adapters (He et al.): a bottleneck beside a module, fed its input, added to its output."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

from torch import nn

from .. import ops
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase
from .adapter import AdapterModel


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


class ParallelAdapterModel(AdapterModel):
    """Beside the feed-forward down projection by default; ``scaled`` multiplies the adapter's
    output (OpenDelta accepted it and ignored it)."""

    delta_type = "parallel_adapter"
    config_class = ParallelAdapterConfig
    default_modified_modules = ["ff.w2"]
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
        scaled: float = 1.0,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, ParallelAdapterConfig.from_arguments(locals()))

    def delta_kwargs(self, in_features: int, out_features: int) -> dict:
        return {"bottleneck_dim": self.bottleneck_dim, "non_linearity": self.non_linearity, "scaling": self.scaled}
