"""Saving a delta trained under ``torch.distributed``.

Under DDP every rank holds the whole delta: ``delta.save_finetuned(path)`` on rank 0 is enough.
Under FSDP2 (``fully_shard``) every parameter, frozen or not, is a ``DTensor`` sharded across
ranks between forward passes, so the delta must first be gathered, and gathering is a
collective: every rank has to call it, in the same order. ``save_finetuned`` below does that and
writes from one rank only; calling ``DeltaBase.save_finetuned`` on sharded parameters raises
instead of writing a shard.

Attach the delta and call ``freeze_module()`` *before* wrapping with DDP or ``fully_shard``:
parameters added afterwards are not synchronised by either, and ``fully_shard`` replaces the
parameter objects, so freezing afterwards would no longer recognise the delta's own.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .. import checkpoint
from ..delta import DeltaBase


def is_main_process() -> bool:
    """Rank 0 of the default process group, or True when not running distributed."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return hasattr(tensor, "full_tensor") and hasattr(tensor, "placements")


def full_delta_state_dict(delta: DeltaBase, *, cpu: bool = True) -> dict[str, torch.Tensor]:
    """``delta.delta_state_dict()`` with sharded tensors gathered to full ones. A collective when
    any tensor is sharded: call it on every rank. ``cpu`` moves the result to host memory."""
    named = dict(delta.named_parameters())
    named.update(delta._unfrozen_backbone_parameters(delta.unfrozen_modules))
    out = {}
    # Sorted so every rank issues the same all-gathers in the same order.
    for name in sorted(named):
        tensor = named[name].detach()
        if _is_dtensor(tensor):
            tensor = tensor.full_tensor()
        out[name] = tensor.cpu() if cpu else tensor
    return out


def save_finetuned(delta: DeltaBase, finetuned_delta_path: str | os.PathLike,
                   is_main_process: Optional[bool] = None) -> Optional[str]:
    """Call on every rank: gathers the delta if it is sharded, then the main process (rank 0 by
    default) writes the same checkpoint ``delta.save_finetuned`` writes. Returns the path on the
    writing rank, None elsewhere. Ranks do not wait for the write; ``dist.barrier()`` afterwards
    if another rank reads the checkpoint."""
    if delta.is_merged:
        raise RuntimeError(f"delta {delta.name!r} is merged into the base weights; unmerge() before saving it")
    tensors = full_delta_state_dict(delta)
    main = _main(is_main_process)
    if not main:
        return None
    checkpoint.save_checkpoint(finetuned_delta_path, delta.config_dict(), tensors)
    return str(finetuned_delta_path)


def _main(flag: Optional[bool]) -> bool:
    return is_main_process() if flag is None else bool(flag)
