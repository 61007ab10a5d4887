"""Input gradients for reentrant gradient checkpointing.

Reentrant ``torch.utils.checkpoint`` only backpropagates into a checkpointed block when one of
the block's tensor *inputs* requires grad. With a frozen backbone the first block's input is the
output of a frozen embedding, so the deltas inside every checkpointed block get no gradient
(or backward fails outright when nothing else is trainable). Making the embedding output require
grad fixes that; it is what PEFT's ``enable_input_require_grads`` does.

transformers >= 5 does this itself in ``activation_checkpointing_enable()`` (named
``gradient_checkpointing_enable()`` before 5.24) for models whose main
input is ``input_ids``; it does not for other inputs (ViT's ``pixel_values``) nor in 4.x, and
plain PyTorch models never get it. Non-reentrant checkpointing (``use_reentrant=False``) needs
none of this.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

_HOOK_ATTR = "_odelta_input_grad_hook"


def _require_grad(module, args, output):
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        output.requires_grad_(True)


def enable_input_require_grads(model: nn.Module, embeddings: Optional[nn.Module] = None) -> nn.Module:
    """Make the output of ``embeddings`` (default: ``model.get_input_embeddings()``) require
    grad. Idempotent; returns the embedding module. Undo with ``disable_input_require_grads``."""
    if embeddings is None:
        getter = getattr(model, "get_input_embeddings", None)
        try:
            embeddings = getter() if getter is not None else None
        except NotImplementedError:
            embeddings = None
        if embeddings is None:
            raise ValueError(
                f"{type(model).__name__} has no get_input_embeddings(); pass embeddings=<the module whose "
                "output feeds the first checkpointed block>"
            )
    if _HOOK_ATTR not in embeddings.__dict__:
        embeddings.__dict__[_HOOK_ATTR] = embeddings.register_forward_hook(_require_grad)
    return embeddings


def disable_input_require_grads(model: nn.Module) -> None:
    for module in model.modules():
        handle = module.__dict__.pop(_HOOK_ATTR, None)
        if handle is not None:
            handle.remove()


def enable_activation_checkpointing(model: nn.Module, use_reentrant: Optional[bool] = None, **kwargs) -> None:
    """Turn on transformers' activation (gradient) checkpointing under the name the installed
    release uses: ``activation_checkpointing_enable`` since 5.24, ``gradient_checkpointing_enable``
    before (now a deprecated alias that warns). ``use_reentrant=None`` keeps transformers' default."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    key = "activation_checkpointing_kwargs"
    if enable is None:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        key = "gradient_checkpointing_kwargs"
    if enable is None:
        raise TypeError(f"{type(model).__name__} is not a transformers model with activation checkpointing; "
                        "wrap its blocks in torch.utils.checkpoint.checkpoint yourself")
    if use_reentrant is not None:
        kwargs[key] = {**kwargs.get(key, {}), "use_reentrant": use_reentrant}
    enable(**kwargs)


def checkpointing_requested(training_args) -> bool:
    """Whether HF ``TrainingArguments`` ask for activation checkpointing, under either name."""
    return bool(getattr(training_args, "activation_checkpointing", None)
                or getattr(training_args, "gradient_checkpointing", None))
