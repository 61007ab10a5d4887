"""Low-rank adapter: an adapter whose projections are ``W_left @ W_right`` products of rank
``low_rank_rank`` (a true matrix product for every rank; OpenDelta's broadcast was only
correct for rank 1)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

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
        return (self.down_left @ self.down_right).t(), (self.up_left @ self.up_right).t()


class LowRankAdapterModel(AdapterModel):
    delta_type = "low_rank_adapter"
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
        name: Optional[str] = None,
    ):
        if not isinstance(low_rank_rank, int) or low_rank_rank < 1:
            raise ValueError(f"low_rank_rank must be a positive integer, got {low_rank_rank!r}")
        self.reduction_factor, self.low_rank_w_init, self.low_rank_rank = reduction_factor, low_rank_w_init, low_rank_rank
        super().__init__(backbone_model, 1, non_linearity, modified_modules, exclude_modules, unfrozen_modules,
                         common_structure, backend, name=name)

    def delta_kwargs(self, in_features, out_features):
        return {"bottleneck_dim": max(in_features // self.reduction_factor, 1), "non_linearity": self.non_linearity,
                "rank": self.low_rank_rank, "w_init": self.low_rank_w_init}
