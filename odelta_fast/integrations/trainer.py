"""The HF ``Trainer`` with a delta-carrying backbone.

A backbone whose delta went through ``freeze_module()`` needs no special Trainer: its
``state_dict()`` holds only trainable and delta tensors, so each ``checkpoint-N/model.safetensors``
holds the delta, not the model; ``trainer.train(resume_from_checkpoint=...)`` loads it back
(frozen weights absent from the file are not reported missing); and the routed forwards keep
the backbone's signature, so ``remove_unused_columns`` keeps the columns the model takes.

``DeltaCallback`` adds what the Trainer cannot know about:

* each checkpoint also gets ``checkpoint-N/delta/`` (``<subfolder>/<name>`` for several
  deltas), a ``save_finetuned`` directory that ``AutoDeltaModel.from_finetuned(path, backbone)``
  loads into a fresh backbone without the Trainer; written by the main process only and
  gathered first under FSDP2;
* with ``activation_checkpointing=True`` (``gradient_checkpointing=True`` before transformers 5.24) it makes the embedding output require grad, which
  reentrant checkpointing needs (see ``integrations.checkpointing``);
* it makes sure the state_dict filter is installed, so a delta frozen with
  ``set_state_dict=False`` still saves as a delta.
"""
from __future__ import annotations

import logging
import os

from transformers import TrainerCallback

from ..delta import DeltaBase, has_state_dict_filter, install_state_dict_filter
from . import distributed
from .checkpointing import checkpointing_requested, enable_input_require_grads

logger = logging.getLogger("odelta_fast")

try:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError:  # pragma: no cover - the constant has been there since transformers 3
    PREFIX_CHECKPOINT_DIR = "checkpoint"


class DeltaCallback(TrainerCallback):
    """``Trainer(..., callbacks=[DeltaCallback(delta)])``; see the module docstring."""

    def __init__(self, *deltas: DeltaBase, subfolder: str = "delta", save: bool = True):
        if not deltas or not all(isinstance(d, DeltaBase) for d in deltas):
            raise TypeError("DeltaCallback(delta, ...) takes one or more delta objects (LoraModel(...), ...)")
        self.deltas = deltas
        self.subfolder = subfolder
        self.save = save

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for delta in self.deltas:
            backbone = delta.backbone_model
            if not has_state_dict_filter(backbone):
                logger.info("DeltaCallback: installing the delta state_dict filter on %s", type(backbone).__name__)
                install_state_dict_filter(backbone)
            if checkpointing_requested(args):
                try:
                    enable_input_require_grads(backbone)
                except ValueError:
                    logger.warning("DeltaCallback: %s has no get_input_embeddings(); reentrant gradient "
                                   "checkpointing may leave the deltas without gradients", type(backbone).__name__)
        return control

    def delta_path(self, checkpoint_dir: str, delta: DeltaBase) -> str:
        if len(self.deltas) == 1:
            return os.path.join(checkpoint_dir, self.subfolder)
        return os.path.join(checkpoint_dir, self.subfolder, delta.name)

    def on_save(self, args, state, control, **kwargs):
        if not self.save:
            return control
        checkpoint_dir = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for delta in self.deltas:
            # Every rank calls: under FSDP2 the gather is a collective; only the main one writes.
            distributed.save_finetuned(delta, self.delta_path(checkpoint_dir, delta),
                                       is_main_process=state.is_world_process_zero)
        return control
