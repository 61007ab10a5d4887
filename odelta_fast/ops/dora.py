"""DoRA (Liu et al., 2024): LoRA whose output is rescaled per output feature,
``y = m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T) + b``.

The row norms are computed without materialising ``W + s B A`` (an ``N x K`` matrix per layer
per step, what PEFT builds): ``||W_n + s (BA)_n||^2 = ||W_n||^2 + 2 s (W A^T)_n . B_n +
s^2 B_n (A A^T) B_n^T``, which costs one rank-``r`` product with ``W`` plus ``r x r`` and
``N x r`` work, in fp32. As in PEFT and the DoRA paper, the norm is treated as a constant in
backward (no gradient flows through it); the magnitude ``m`` gets its gradient through the scale.

The inner term is exactly ``lora_linear`` (whatever backend runs it) and the scale plus bias is
one pass over the output, so DoRA costs LoRA plus one rank-``r`` product and one elementwise
pass. With dropout, PEFT recomputes the base product on the dropped input (a second full GEMM);
here dropout stays on the low-rank path as in plain LoRA: the same expectation, one GEMM fewer.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .checks import check_tensor
from .lora import lora_linear

OP = "dora_linear"


@torch.no_grad()
def dora_row_norm(weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, *,
                  weight_sq_norm: Optional[Tensor] = None) -> Tensor:
    """``||W + s B A||`` per output feature (row of the ``(N, K)`` weight), in fp32, without
    forming ``W + s B A``. ``weight_sq_norm`` (``||W_n||^2``) may be passed when cached."""
    check_tensor("dora_row_norm", "weight", weight, (None, None))
    n, k = weight.shape
    check_tensor("dora_row_norm", "lora_a", lora_a, (None, k))
    check_tensor("dora_row_norm", "lora_b", lora_b, (n, lora_a.shape[0]))
    a, b = lora_a.to(weight.device, torch.float32), lora_b.to(weight.device, torch.float32)
    sq = weight.float().pow(2).sum(dim=1) if weight_sq_norm is None else weight_sq_norm.float()
    # W A^T in the weight's own dtype (fp32 accumulation in the GEMM): no fp32 copy of W per step.
    cross = ((weight @ a.t().to(weight.dtype)).float() * b).sum(dim=1)  # (W A^T)_n . B_n
    lr = ((b @ (a @ a.t())) * b).sum(dim=1)         # B_n (A A^T) B_n^T = ||(B A)_n||^2
    return (sq + (2.0 * scaling) * cross + (scaling * scaling) * lr).clamp_min_(0.0).sqrt_()


def dora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, magnitude: Tensor,
    scaling: float, dropout_p: float = 0.0, *, training: bool = True, backend: str = "auto",
    weight_sq_norm: Optional[Tensor] = None,
) -> Tensor:
    """``m / ||W + s B A||_row * (x W^T + s drop(x) A^T B^T) + b``; ``weight`` is ``(N, K)``."""
    check_tensor(OP, "magnitude", magnitude, (weight.shape[0],))
    norm = dora_row_norm(weight, lora_a, lora_b, scaling, weight_sq_norm=weight_sq_norm)
    scale = magnitude / norm.to(device=magnitude.device, dtype=magnitude.dtype)
    inner = lora_linear(x, weight, None, lora_a, lora_b, scaling, dropout_p, training=training, backend=backend)
    scale = scale.to(inner.dtype)
    return inner * scale if bias is None else torch.addcmul(bias.to(inner.dtype), inner, scale)


@torch.no_grad()
def dora_merge_(weight: Tensor, lora_a: Tensor, lora_b: Tensor, magnitude: Tensor, scaling: float, *,
                fan_in_fan_out: bool = False) -> Tensor:
    """``W <- m / ||W + s B A||_row * (W + s B A)`` in place, fp32 accumulation and one rounding
    (``weight`` is ``(N, K)``, or ``(K, N)`` when ``fan_in_fan_out``)."""
    rows = weight.t() if fan_in_fan_out else weight
    merged = rows.float() + scaling * (lora_b.float() @ lora_a.float()).to(rows.device)
    merged.mul_((magnitude.float().to(rows.device) / merged.norm(dim=1)).unsqueeze(1))
    rows.copy_(merged)
    return weight
