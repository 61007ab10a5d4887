"""Compacter: an adapter whose projections are sums of Kronecker products (PHM layers),
``W = sum_i A_i (x) B_i`` with ``B_i`` optionally factorised to rank ``phm_rank``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase
from .adapter import AdapterDelta, AdapterModel


class PHMWeight(nn.Module):
    """A ``(in, out)`` weight built as ``sum_i kron(rule_i, W_i)``."""

    def __init__(self, in_features, out_features, n, *, rank, factorized, learn_rule, c_init, w_init,
                 init_range, zero, device, dtype):
        super().__init__()
        for what, size in (("in_features", in_features), ("out_features", out_features)):
            if size % n:
                raise ValueError(f"Compacter: {what}={size} is not divisible by hypercomplex_division={n}")
        self.n, self.factorized = n, factorized
        rule = torch.empty(n, n, n, device=device, dtype=dtype)
        if c_init == "normal":
            nn.init.normal_(rule, std=init_range)
        elif c_init == "uniform":
            nn.init.uniform_(rule, -init_range, init_range)
        else:
            raise ValueError(f"Compacter: phm_c_init={c_init!r}; expected 'normal' or 'uniform'")
        self.rule = nn.Parameter(rule, requires_grad=learn_rule)
        shape_in, shape_out = in_features // n, out_features // n
        if factorized:
            self.left = nn.Parameter(torch.empty(n, shape_in, rank, device=device, dtype=dtype))
            self.right = nn.Parameter(torch.empty(n, rank, shape_out, device=device, dtype=dtype))
            _init(self.left, w_init)
            _init(self.right, w_init) if not zero else nn.init.zeros_(self.right)
        else:
            self.w = nn.Parameter(torch.empty(n, shape_in, shape_out, device=device, dtype=dtype))
            _init(self.w, w_init) if not zero else nn.init.zeros_(self.w)

    def forward(self) -> torch.Tensor:
        w = ops.low_rank_product(self.left, self.right) if self.factorized else self.w
        return ops.kronecker_sum(self.rule, w)


def _init(tensor: torch.Tensor, how: str) -> None:
    if how == "glorot-uniform":
        nn.init.xavier_uniform_(tensor)
    elif how == "glorot-normal":
        nn.init.xavier_normal_(tensor)
    elif how == "normal":
        nn.init.normal_(tensor, std=0.01)
    else:
        raise ValueError(f"unknown weight init {how!r}; expected 'glorot-uniform', 'glorot-normal' or 'normal'")


class CompacterDelta(AdapterDelta):
    def __init__(self, in_features, out_features, *, phm: dict, use_bias_down_sampler, use_bias_up_sampler, **kwargs):
        self._phm = phm
        super().__init__(in_features, out_features, **kwargs)
        if not use_bias_down_sampler:
            self.register_parameter("down_bias", None)
        if not use_bias_up_sampler:
            self.register_parameter("up_bias", None)

    def init_projections(self, in_features, out_features, bottleneck_dim, *, device, dtype):
        self.down_phm = PHMWeight(in_features, bottleneck_dim, zero=False, device=device, dtype=dtype, **self._phm)
        self.up_phm = PHMWeight(bottleneck_dim, out_features, zero=True, device=device, dtype=dtype, **self._phm)

    def projections(self):
        return self.down_phm().t(), self.up_phm().t()


@dataclass
class CompacterConfig(BaseDeltaConfig):
    """A bottleneck of ``in_features // reduction_factor`` whose projections are sums of
    ``hypercomplex_division`` Kronecker products (OpenDelta's names and defaults)."""

    delta_type: ClassVar[str] = "compacter"

    reduction_factor: int = 16
    non_linearity: str = "gelu_new"
    phm_c_init: str = "normal"
    hypercomplex_division: int = 4
    learn_phm: bool = True
    hypercomplex_nonlinearity: str = "glorot-uniform"
    shared_phm_rule: bool = False
    factorized_phm: bool = True
    shared_W_phm: bool = False
    factorized_phm_rule: bool = False
    phm_rank: int = 1
    phm_init_range: float = 0.0001
    kronecker_prod: Any = None
    use_bias_up_sampler: bool = True
    use_bias_down_sampler: bool = True

    def validate(self):
        positive_int(self, "reduction_factor", "hypercomplex_division", "phm_rank")
        for flag in ("shared_phm_rule", "shared_W_phm", "factorized_phm_rule"):
            if getattr(self, flag):
                raise ValueError(f"CompacterModel: {flag}=True is not supported; leave it False")
        ops.adapter.activation_fn(self.non_linearity)


class CompacterModel(AdapterModel):
    delta_type = "compacter"
    config_class = CompacterConfig
    delta_class = CompacterDelta

    def __init__(
        self,
        backbone_model: nn.Module,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        reduction_factor: int = 16,
        non_linearity: str = "gelu_new",
        phm_c_init: str = "normal",
        hypercomplex_division: int = 4,
        learn_phm: bool = True,
        hypercomplex_nonlinearity: str = "glorot-uniform",
        shared_phm_rule: bool = False,
        factorized_phm: bool = True,
        shared_W_phm: bool = False,
        factorized_phm_rule: bool = False,
        phm_rank: int = 1,
        phm_init_range: float = 0.0001,
        kronecker_prod=None,
        use_bias_up_sampler: bool = True,
        use_bias_down_sampler: bool = True,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, CompacterConfig.from_arguments(locals()))

    def delta_kwargs(self, in_features, out_features):
        bottleneck = max(in_features // self.reduction_factor, 1)
        phm = dict(n=self.hypercomplex_division, rank=self.phm_rank, factorized=self.factorized_phm,
                   learn_rule=self.learn_phm, c_init=self.phm_c_init, w_init=self.hypercomplex_nonlinearity,
                   init_range=self.phm_init_range)
        return {"bottleneck_dim": bottleneck, "non_linearity": self.non_linearity, "phm": phm,
                "use_bias_down_sampler": self.use_bias_down_sampler, "use_bias_up_sampler": self.use_bias_up_sampler}


__all__ = ["CompacterConfig", "CompacterDelta", "CompacterModel", "PHMWeight"]
