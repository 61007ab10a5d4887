"""Low-rank adapter: an adapter whose projections are ``W_left @ W_right`` products of rank
``low_rank_rank`` (a true matrix product for every rank; OpenDelta's broadcast was only
correct for rank 1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase
from .adapter import AdapterDelta, AdapterModel
from .compacter import _init


class LowRankAdapterDelta(AdapterDelta):
    def __init__(self, in_features, out_features, *, rank: int, w_init: str, **kwargs):
        self._rank, self._w_init = rank, w_init
        super().__init__(in_features, out_features, **kwargs)

    def init_projections(self, in_features, out_features, bottleneck_dim, *, device, dtype):
        def factor(rows, cols):
            t = nn.Parameter(torch.empty(rows, cols, device=device, dtype=dtype))
            _init(t, self._w_init)
            return t

        self.down_left, self.down_right = factor(in_features, self._rank), factor(self._rank, bottleneck_dim)
        self.up_left = factor(bottleneck_dim, self._rank)
        # Zero right factor of the up projection: identity at start.
        self.up_right = nn.Parameter(torch.zeros(self._rank, out_features, device=device, dtype=dtype))

    def projections(self):
        return (ops.low_rank_product(self.down_left, self.down_right).t(),
                ops.low_rank_product(self.up_left, self.up_right).t())


@dataclass
class LowRankAdapterConfig(BaseDeltaConfig):
    """A bottleneck of ``in_features // reduction_factor`` whose projections are products of
    rank-``low_rank_rank`` factors."""

    delta_type: ClassVar[str] = "low_rank_adapter"

    reduction_factor: int = 32
    non_linearity: str = "gelu_new"
    low_rank_w_init: str = "glorot-uniform"
    low_rank_rank: int = 1

    def validate(self):
        positive_int(self, "reduction_factor", "low_rank_rank")
        ops.adapter.activation_fn(self.non_linearity)


class LowRankAdapterModel(AdapterModel):
    delta_type = "low_rank_adapter"
    config_class = LowRankAdapterConfig
    delta_class = LowRankAdapterDelta

    def __init__(
        self,
        backbone_model: nn.Module,
        reduction_factor: int = 32,
        non_linearity: str = "gelu_new",
        low_rank_w_init: str = "glorot-uniform",
        low_rank_rank: int = 1,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, LowRankAdapterConfig.from_arguments(locals()))

    def delta_kwargs(self, in_features, out_features):
        return {"bottleneck_dim": max(in_features // self.reduction_factor, 1), "non_linearity": self.non_linearity,
                "rank": self.low_rank_rank, "w_init": self.low_rank_w_init}


__all__ = ["LowRankAdapterConfig", "LowRankAdapterDelta", "LowRankAdapterModel"]
