"""Delta checkpoints on disk: a JSON config plus a safetensors file, written so that an
interrupted save never leaves a checkpoint that loads wrong.

Layout of a checkpoint directory::

    config.json                 delta type, hyper-parameters, targets, and the weights file name
    delta-<digest>.safetensors  only the delta's tensors (and modules the user unfroze)

The weights file name carries a digest of its content. A save writes the new weights file
under its own name first, then atomically replaces ``config.json`` (which names it), then
removes weights files nothing names any more. Whenever it is interrupted, ``config.json``
names a complete weights file. Loading reads JSON and safetensors only: nothing is unpickled.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_PREFIX = "delta-"
WEIGHTS_SUFFIX = ".safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    pass


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` into ``directory``; returns the weights file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a delta's tensors are small, so copy.
    cpu_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".delta.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(cpu_tensors, tmp, metadata={"format": "pt", "odelta_fast": str(FORMAT_VERSION)})
        digest = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()[:16]
        weights = directory / f"{WEIGHTS_PREFIX}{digest}{WEIGHTS_SUFFIX}"
        os.replace(tmp, weights)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    full_config = dict(config, weights_file=weights.name, format_version=FORMAT_VERSION)
    _atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(full_config, indent=2, sort_keys=True) + "\n").encode())
    for stale in directory.glob(f"{WEIGHTS_PREFIX}*{WEIGHTS_SUFFIX}"):
        if stale.name != weights.name:
            stale.unlink(missing_ok=True)
    return weights


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not Path(directory).is_dir():
        raise CheckpointError(f"delta checkpoint directory {str(directory)!r} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(directory)!r} holds no {CONFIG_NAME}; is it a delta checkpoint?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = read_config(directory)
    name = config.get("weights_file")
    if not name:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} names no weights_file")
    weights = Path(directory) / name
    if not weights.is_file():
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} names {name!r}, which is missing")
    return config, load_file(str(weights))


def file_size(directory: str | os.PathLike) -> int:
    config = read_config(directory)
    return sum((Path(directory) / n).stat().st_size for n in (CONFIG_NAME, config["weights_file"]))
