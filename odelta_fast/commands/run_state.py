"""The state of a training run on disk: checkpoints that appear only when complete (the delta,
the optimizer state as safetensors, the schedule and data position), finding the newest one to
resume from, and what an output directory may hold before a run starts."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from .. import checkpoint as ckpt
from ..logging_utils import get_logger
from .common import CLIError, one_line

logger = get_logger("cli.train")

TRAINING_STATE = "training.json"
OPTIMIZER_STATE = "optimizer.safetensors"  # tensors only: resuming never unpickles
RUN_FILES = ("train_config.yaml", "train_log.jsonl")


def optimizer_tensors(optimizer, names: list[str]) -> dict[str, Any]:
    """The optimizer's per-parameter state as named tensors (``<param>::<key>``)."""
    import torch

    tensors = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{names[index]}::{key}"] = tensor.detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(optimizer, names: list[str], tensors: dict[str, Any], device) -> None:
    state: dict[int, dict[str, Any]] = {}
    index_of = {name: i for i, name in enumerate(names)}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index_of:
            raise CLIError(f"--resume: the checkpoint's optimizer state names {name!r}, which this run does not train")
        # Adam's step counter stays on the CPU (as torch keeps it); moments go where the parameters are.
        state.setdefault(index_of[name], {})[field] = tensor if field == "step" else tensor.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(delta, out_dir: Path, name: str, state: dict[str, Any],
                    optimizer_state: Optional[dict[str, Any]] = None) -> Path:
    """Save the delta (and what resuming needs) to ``out_dir/name`` so that the directory appears
    only when complete."""
    final = out_dir / name
    with ckpt.atomic_directory(final) as tmp:
        delta.save_finetuned(str(tmp))
        if optimizer_state is not None:
            ckpt.save_tensors(tmp / OPTIMIZER_STATE, optimizer_state)
        (tmp / TRAINING_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s", final)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Optional[Path]:
    """``final`` if the run finished, else the ``checkpoint-<step>`` with the highest step."""
    out = Path(out_dir)
    if (out / "final" / TRAINING_STATE).is_file():
        return out / "final"
    steps = [(int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / TRAINING_STATE).is_file()]
    return max(steps)[1] if steps else None


def resume_point(out_dir: Path) -> Path:
    latest = latest_checkpoint(out_dir)
    if latest is None:
        raise CLIError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
    if latest.name == "final":
        raise CLIError(f"--resume: the run in {out_dir} already finished ({latest}); nothing to resume")
    if not (latest / OPTIMIZER_STATE).is_file():
        raise CLIError(f"--resume: {latest} has no {OPTIMIZER_STATE} (written by an older version); "
                       "start a new run or load the delta with AutoDeltaModel.from_finetuned")
    return latest


def restore(path: Path, delta, optimizer, scheduler, names: list[str], device) -> tuple[int, int, float]:
    """Load the delta, optimizer and schedule saved in ``path``; returns (step, epoch, loss)."""
    try:
        state = ckpt.read_json(path / TRAINING_STATE, "training state")
        config, tensors = ckpt.load_checkpoint(path)
        delta.load_delta_state_dict(tensors, expected_targets=config.get("targets"), source=str(path),
                                    saved_name=config.get("name"))
        optimizer_state = ckpt.read_safetensors(path / OPTIMIZER_STATE)
    except ckpt.CheckpointError as err:
        raise CLIError(f"--resume: {one_line(err)}")
    load_optimizer_tensors(optimizer, names, optimizer_state, device)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return state["step"], state["epoch"], state.get("loss", float("nan"))


def clean_stale(out_dir: Path) -> None:
    for stale in list(out_dir.glob(".*.tmp-*")) + list(out_dir.glob(".*.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


def earlier_run(out_dir: Path) -> list[Path]:
    """What an earlier run left in ``out_dir``."""
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob("checkpoint-*")) + [out_dir / n for n in ("final", *RUN_FILES) if (out_dir / n).exists()]
    return found


def prepare_output(out_dir: Path, resume: bool, overwrite: bool, where: str = "--output") -> Optional[Path]:
    """Check the output directory against --resume / --overwrite before anything is written;
    returns the checkpoint to resume from. ``where`` names the setting, for errors."""
    if resume and overwrite:
        raise CLIError("--resume and --overwrite contradict each other: resume continues the run in the output "
                       "directory, overwrite deletes it")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{where} {out_dir}: is a file; expected a directory")
    earlier = earlier_run(out_dir)
    if resume:
        return resume_point(out_dir)
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise CLIError(f"{where} {out_dir}: holds an earlier run ({names}); pass "
                       "--resume to continue it, --overwrite to replace it, or choose another output directory")
    return None

