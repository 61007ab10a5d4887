"""Low-rank updates on their own, added to what the target module computes itself.

* ``lora_update``: ``s * (drop(x) A^T) B^T`` for a Linear. Used when a second LoRA sits on a
  module whose output a first LoRA already computes with ``lora_linear`` (the second adds only its
  update, never a second base matmul), and for Linear subclasses that keep their own forward.
* ``lora_embedding_update``: ``s * A^T[ids] B^T`` for an ``nn.Embedding``: a gather of ``A``'s
  columns (``r`` values per token), never a dense one-hot product.
* ``lora_conv_update``: ``s * B * conv_A(drop(x))`` for ``nn.Conv1d`` / ``nn.Conv2d``: ``A`` is a
  convolution with the target's kernel, stride, padding and dilation into ``r`` channels, ``B`` a
  1x1 convolution back (PEFT's layout).

They are a few skinny products that every backend runs through torch (cuBLAS / cuDNN on a
GPU), so a module whose other deltas run on the Triton kernels takes these too.
"""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
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
    # The same generator and resolution as lora_linear's mask, so one dropout_p means one thing.
    return (_dropped(x, dropout_p, training) @ lora_a.t()) @ (lora_b.t() * scaling)


def _dropped(x: Tensor, dropout_p: float, training: bool) -> Tensor:
    if dropout_p > 0.0 and training:
        seed = int(new_dropout_seed().item())
        return x * dropout_keep_scale(x.shape, dropout_p, seed, x.device, x.dtype)
    return x


def lora_embedding_update(ids: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, *,
                          padding_idx: Optional[int] = None, backend: str = "auto") -> Tensor:
    """``s * A^T[ids] B^T`` with ``A`` ``(r, num_embeddings)`` and ``B`` ``(dim, r)`` (PEFT's
    ``lora_embedding_A`` / ``lora_embedding_B``); the padding row gets no update and no gradient,
    like the embedding's own."""
    op = "lora_embedding_update"
    check_tensor(op, "lora_a", lora_a, (None, None))
    check_tensor(op, "lora_b", lora_b, (None, lora_a.shape[0]), like=lora_a)
    if ids.is_floating_point():
        raise ValueError(f"{op}: argument 'ids' must hold integer token ids, got {ids.dtype}")
    check_backend_name(backend)
    gathered = F.embedding(ids, lora_a.t(), padding_idx=padding_idx)
    return (gathered @ lora_b.t()) * scaling


def lora_conv_update(x: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, dropout_p: float = 0.0, *,
                     stride=1, padding=0, dilation=1, training: bool = True, backend: str = "auto") -> Tensor:
    """``s * conv(conv(drop(x), A), B)`` for 1-D (``x`` ``(B, C, L)``) and 2-D (``(B, C, H, W)``)
    convolutions; ``A`` ``(r, C, *kernel)``, ``B`` ``(out, r, 1[, 1])``."""
    op = "lora_conv_update"
    check_tensor(op, "x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"{op}: argument 'x' must be (batch, channels, length) or (batch, channels, height, "
                         f"width), got shape {tuple(x.shape)}")
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    check_tensor(op, "lora_a", lora_a, (None, x.shape[1], *lora_a.shape[2:]), like=x)
    check_tensor(op, "lora_b", lora_b, (None, lora_a.shape[0], *([1] * (x.dim() - 2))), like=x)
    check_probability(op, "dropout_p", dropout_p)
    check_backend_name(backend)
    hidden = conv(_dropped(x, dropout_p, training), lora_a, stride=stride, padding=padding, dilation=dilation)
    return conv(hidden, lora_b) * scaling
