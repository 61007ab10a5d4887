"""Backend choice for every op: the one place that decides eager, Triton or CUDA.

``backend="auto"`` picks the fastest implementation available for the tensors' device;
``ODELTA_BACKEND`` in the environment overrides the argument for a whole process, so a user
can force the reference path without touching code.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

BACKENDS = ("auto", "eager", "triton", "cuda")
ENV_VAR = "ODELTA_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def check_backend_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return backend


def requested_backend(backend: str) -> str:
    """The backend asked for, after the process-wide override."""
    override = os.environ.get(ENV_VAR)
    if override:
        if override not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={override!r} is not one of {', '.join(map(repr, BACKENDS))}")
        return override
    return check_backend_name(backend)


# Dtypes the Triton kernels take; float64 (the reference dtype) always runs eagerly.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def resolve_backend(
    op: str, backend: str, device: torch.device, implemented: tuple[str, ...],
    *, dtype: Optional[torch.dtype] = None,
) -> str:
    """The concrete backend that runs ``op`` for tensors on ``device`` (and of ``dtype`` if given).

    ``implemented`` lists the backends this op has besides eager. An explicit request for a
    backend the op or the device lacks is an error: silently running something else would
    make benchmarks lie. ``"auto"`` picks Triton for CUDA tensors of a kernel dtype when Triton
    is importable, eager otherwise. Forcing ``"triton"`` on CPU tensors is allowed: it runs under
    Triton's interpreter when ``TRITON_INTERPRET=1`` (how CI tests the kernels).
    """
    device = torch.device(device)
    choice = requested_backend(backend)
    if choice == "auto":
        if (device.type == "cuda" and "triton" in implemented and triton_available()
                and (dtype is None or dtype in TRITON_DTYPES)):
            return "triton"
        return "eager"
    if choice == "eager":
        return "eager"
    if choice not in implemented:
        raise ValueError(
            f"op {op!r} has no {choice!r} implementation; available: eager"
            + "".join(f", {b}" for b in implemented)
        )
    if choice == "triton" and not triton_available():
        raise ValueError(f"backend='triton' was requested for {op!r} but triton is not installed")
    if choice == "triton" and dtype is not None and dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' for {op!r} takes float16, bfloat16 or float32 tensors; got {dtype}")
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' for {op!r} needs CUDA tensors (got {device.type})")
    if choice == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend='triton' for {op!r} needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing odelta_fast to run the kernels on CPU"
        )
    return choice


def has_dtensor(*tensors) -> bool:
    """True when any argument is a DTensor (e.g. a parameter sharded by FSDP2's fully_shard).

    Kernels take plain tensors only; a DTensor goes through the eager path, whose torch ops
    DTensor knows how to shard (and redistribute) itself."""
    return any(t is not None and hasattr(t, "placements") and hasattr(t, "to_local") for t in tensors)


_KERNEL_MODULES: dict[str, ModuleType] = {}


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``odelta_fast.kernels.<name>``, imported on first use (a plain
    dict lookup afterwards, which ``torch.compile`` traces without a graph break)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = _import_kernels(name)
    return module


def _import_kernels(name: str) -> ModuleType:
    """Import ``odelta_fast.kernels.<name>``.

    An installed package maps ``kernels/`` to ``odelta_fast.kernels`` (pyproject package-dir);
    a source checkout that was never installed has the directory beside the package, so the
    subpackage is registered from there."""
    try:
        return importlib.import_module(f"odelta_fast.kernels.{name}")
    except ModuleNotFoundError as err:
        if err.name not in ("odelta_fast.kernels", f"odelta_fast.kernels.{name}"):
            raise
    root = Path(__file__).resolve().parents[2] / "kernels"
    if "odelta_fast.kernels" not in sys.modules and (root / "__init__.py").exists():
        spec = importlib.util.spec_from_file_location(
            "odelta_fast.kernels", root / "__init__.py", submodule_search_locations=[str(root)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["odelta_fast.kernels"] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"odelta_fast.kernels.{name}")
