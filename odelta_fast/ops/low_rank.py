"""The low-rank update on its own: ``s * (drop(x) A^T) B^T``.

Used when a second LoRA sits on a module whose output a first LoRA already computes with
``lora_linear``: the second adds only its update, never a second base matmul. The update is two
skinny GEMMs that every backend runs through torch (cuBLAS on a GPU), so a module whose first
LoRA runs on the Triton kernels takes a second one too.
"""
from __future__ import annotations

from torch import Tensor

from .backend import check_backend_name
from .checks import check_probability, check_tensor
from .lora import dropout_keep_scale, new_dropout_seed

OP = "lora_update"


def lora_update(
    x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout_p: float = 0.0, *,
    training: bool = True, backend: str = "auto",
) -> Tensor:
    check_tensor(OP, "x", x)
    check_tensor(OP, "lora_a", lora_a, (None, x.shape[-1]), like=x)
    check_tensor(OP, "lora_b", lora_b, (None, lora_a.shape[0]), like=x)
    check_probability(OP, "dropout_p", dropout_p)
    check_backend_name(backend)
    if dropout_p > 0.0 and training:
        # The same generator and resolution as lora_linear's mask, so one dropout_p means one thing.
        seed = int(new_dropout_seed().item())
        x = x * dropout_keep_scale(x.shape, dropout_p, seed, x.device, x.dtype)
    return (x @ lora_a.t()) @ (lora_b.t() * scaling)
