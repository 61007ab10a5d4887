"""Parallel adapters (He et al.): a bottleneck beside a module, fed its input, added to its output."""
from __future__ import annotations

from typing import Optional, Sequence

from torch import nn

from .adapter import AdapterModel


class ParallelAdapterModel(AdapterModel):
    """Beside the feed-forward down projection by default; ``scaled`` multiplies the adapter's
    output (OpenDelta accepted it and ignored it)."""

    delta_type = "parallel_adapter"
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
        self.scaled = scaled
        super().__init__(backbone_model, bottleneck_dim, non_linearity, modified_modules, exclude_modules,
                         unfrozen_modules, common_structure, backend, scaling=scaled, name=name)

    def hyperparameters(self):
        return {"bottleneck_dim": self.bottleneck_dim, "non_linearity": self.non_linearity, "scaled": self.scaled}
