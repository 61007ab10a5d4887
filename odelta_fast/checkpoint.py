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

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

CONFIG_NAME = "config.json"
WEIGHTS_PREFIX = "delta-"
WEIGHTS_SUFFIX = ".safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """Every checkpoint that cannot be read or does not fit the backbone: a missing, truncated or
    corrupt file, invalid JSON, tensors of the wrong names or shapes. The message names the file."""


def file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process umask (``mkstemp`` would
    make every file 0600, unreadable to a group that shares a checkpoint directory)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, flushed to disk, then renamed over
    ``path``: readers see the old file or the new one, never a torn one. The one atomic file
    writer of the package."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                 metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written atomically with the umask's mode (``save_file`` alone makes
    it 0600)."""
    import safetensors.torch

    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``final`` to fill; on success it becomes ``final``
    (replacing an existing one when ``replace``), on any failure it is removed and ``final`` is
    left as it was. A directory that appears is therefore complete."""
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_dir(tmp)
        if final.exists():
            if not replace:
                raise FileExistsError(f"{final} exists")
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = final.parent / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``config`` and ``tensors`` into ``directory``; returns the weights file path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; a delta's tensors are small, so copy.
    cpu_tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    staged = save_tensors(directory / ".delta.staged", cpu_tensors,
                          metadata={"format": "pt", "odelta_fast": str(FORMAT_VERSION)})
    digest = hashlib.sha256(staged.read_bytes()).hexdigest()[:16]
    weights = directory / f"{WEIGHTS_PREFIX}{digest}{WEIGHTS_SUFFIX}"
    os.replace(staged, weights)
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
    return read_json(path, "delta config")


def load_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config = read_config(directory)
    name = config.get("weights_file")
    if not name:
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} names no weights_file")
    weights = Path(directory) / name
    if not weights.is_file():
        raise CheckpointError(f"{Path(directory) / CONFIG_NAME} names {name!r}, which is missing")
    return config, read_safetensors(weights)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; an unreadable file (truncated, corrupt, not
    safetensors at all) raises ``CheckpointError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own SafetensorError, or OSError / ValueError
        raise CheckpointError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err}); "
                              "it is truncated or corrupt: save or download it again") from None


def read_json(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """A JSON object from ``path``; anything else raises ``CheckpointError`` naming the file."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path}: the {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: the {what} must be a JSON object, got {type(value).__name__}")
    return value


def file_size(directory: str | os.PathLike) -> int:
    config = read_config(directory)
    return sum((Path(directory) / n).stat().st_size for n in (CONFIG_NAME, config["weights_file"]))
