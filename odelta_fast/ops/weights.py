"""Ops that build a delta's weights from its parameters: the structured projections of Compacter
and the low-rank adapter, and prefix tuning's reparameterisation MLP.

They run once per forward on tensors of parameter size (never on activations), so they have an
eager implementation only; they are ops so that no method inlines math of its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_tensor


def kronecker_sum(rules: Tensor, factors: Tensor) -> Tensor:
    """``sum_k kron(rules[k], factors[k])``: ``(n, n, n)`` rules and ``(n, a, b)`` factors give an
    ``(n*a, n*b)`` weight (Compacter's parameterised hypercomplex multiplication)."""
    check_tensor("kronecker_sum", "rules", rules, (None, None, None))
    n = rules.shape[0]
    check_tensor("kronecker_sum", "factors", factors, (n, None, None))
    _, a, b = factors.shape
    return torch.einsum("kij,kab->iajb", rules, factors).reshape(n * a, n * b)


def low_rank_product(left: Tensor, right: Tensor) -> Tensor:
    """``left @ right``: a weight of rank at most ``left.shape[-1]`` (a true matrix product for
    any rank, also batched over a leading dimension)."""
    check_tensor("low_rank_product", "right", right, (*left.shape[:-2], left.shape[-1], None))
    return left @ right


def prefix_mlp(table: Tensor, mid_weight: Tensor, mid_bias: Optional[Tensor], out_weight: Tensor,
               out_bias: Optional[Tensor]) -> Tensor:
    """``tanh(table W_mid^T + b_mid) W_out^T + b_out``: prefix tuning's reparameterisation, the
    prefix embeddings mapped to every layer's keys and values (``out_*`` may be a slice of the
    output rows: a stack computes only its own layers)."""
    check_tensor("prefix_mlp", "table", table, (None, mid_weight.shape[1]))
    check_tensor("prefix_mlp", "out_weight", out_weight, (None, mid_weight.shape[0]))
    return F.linear(torch.tanh(F.linear(table, mid_weight, mid_bias)), out_weight, out_bias)
