"""Glue for the training stacks people already use: the HF ``Trainer``, gradient checkpointing,
``torch.distributed`` (DDP, FSDP2) and ``accelerate``.

Nothing here is needed for the common case: a backbone whose delta was frozen with
``freeze_module()`` already trains under the Trainer, DDP and FSDP2, and its ``state_dict()``
already holds only the delta. These helpers cover the rest:

* ``DeltaCallback`` (``integrations.trainer``): also writes each Trainer checkpoint's delta as a
  self-describing ``save_finetuned`` directory, and turns on input gradients for reentrant
  gradient checkpointing.
* ``enable_input_require_grads`` (``integrations.checkpointing``): what reentrant checkpointing
  needs when the frozen embeddings give the first layer an input without ``requires_grad``.
* ``enable_activation_checkpointing`` (``integrations.checkpointing``): transformers' checkpointing
  switch under whichever name the installed release uses.
* ``full_delta_state_dict`` / ``save_finetuned`` (``integrations.distributed``): gather a
  sharded (FSDP2) delta on every rank and write it from rank 0 only.
"""
from __future__ import annotations

_EXPORTS = {
    "DeltaCallback": "trainer",
    "enable_input_require_grads": "checkpointing",
    "enable_activation_checkpointing": "checkpointing",
    "full_delta_state_dict": "distributed",
    "save_finetuned": "distributed",
    "is_main_process": "distributed",
}


def __getattr__(name):
    # Imported on use: the Trainer callback pulls in transformers' trainer machinery.
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
