"""Backend choice for every op: the one place that decides eager, Triton (and for LoRA which Triton
path: split, fused or persistent) or CUDA.

``backend_for(op, tensors or device, backend, dtype=..., **shape)`` is the decision: every op calls
it before running, and ``delta.log()`` / ``odelta-fast env`` call it to say what runs. Each op
module registers what it implements (``register_op``) and, where the choice depends on more than
the device and dtype, a refinement (LoRA's path by measured shape; the CUDA extension's
availability). ``ODELTA_BACKEND`` in the environment overrides the argument for a whole process,
so a user can force the reference path without touching code.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch

# "split", "fused" and "persistent" are LoRA linear's Triton paths; "triton" lets its dispatch
# table choose.
BACKENDS = ("auto", "eager", "triton", "split", "fused", "persistent", "cuda")
LORA_PATHS = ("split", "fused", "persistent")
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
    """The backend family that runs ``op`` for tensors on ``device`` (and of ``dtype`` if given):
    the first step of ``backend_for``, kept for ops that need no refinement.

    ``implemented`` lists the backends this op has besides eager. An explicit request for a
    backend the op or the device lacks is an error: silently running something else would
    make benchmarks lie. ``"auto"`` picks Triton for CUDA tensors of a kernel dtype when Triton
    is importable, eager otherwise. Forcing ``"triton"`` on CPU tensors is allowed: it runs under
    Triton's interpreter when ``TRITON_INTERPRET=1`` (how CI tests the kernels).
    """
    device = torch.device(device)
    choice = requested_backend(backend)
    if choice in LORA_PATHS and choice not in implemented and os.environ.get(ENV_VAR) == choice:
        choice = "triton"  # a process-wide LoRA path choice leaves the other ops on their kernels
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
    if choice != "cuda" and not triton_available():
        raise ValueError(f"backend={choice!r} was requested for {op!r} but triton is not installed")
    if choice != "cuda" and dtype is not None and dtype not in TRITON_DTYPES:
        raise ValueError(f"backend={choice!r} for {op!r} takes float16, bfloat16 or float32 tensors; got {dtype}")
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"backend='cuda' for {op!r} needs CUDA tensors (got {device.type})")
    if choice != "cuda" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"backend={choice!r} for {op!r} needs CUDA tensors (got {device.type}); "
            "set TRITON_INTERPRET=1 before importing odelta_fast to run the kernels on CPU"
        )
    return choice


# ----------------------------------------------------------------------------- the decision
# op -> (backends it implements besides eager, refinement or None). Filled by the op modules.
_OPS: dict[str, tuple[Callable[[], tuple[str, ...]], Optional[Callable]]] = {}


def register_op(op: str, implemented: Callable[[], tuple[str, ...]], refine: Optional[Callable] = None) -> None:
    """Declare ``op``: ``implemented()`` lists its backends besides eager; ``refine(chosen, device=,
    dtype=, requested=, **shape)`` turns the resolved family into what really runs (or None)."""
    _OPS[op] = (implemented, refine)


def op_backends() -> dict[str, Callable[[], tuple[str, ...]]]:
    """op -> the function listing its backends besides eager."""
    return {op: implemented for op, (implemented, _) in _OPS.items()}


def backend_for(op: str, where, backend: str = "auto", *, dtype: Optional[torch.dtype] = None, **shape) -> str:
    """What runs ``op``: ``"eager"``, ``"triton"``, a LoRA linear path (``LORA_PATHS``) or
    ``"cuda"``. ``where`` is the op's tensors (a tensor or a sequence; their device and dtype, and a
    DTensor among them sends the op to eager, whose torch ops DTensor shards itself) or a device;
    ``shape`` what the op's choice depends on besides (LoRA: ``M``, ``K``, ``N``, ``r``, ``dropout``).
    Raises ``ValueError`` exactly when the op call would."""
    if op not in _OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(_OPS)}")
    implemented, refine = _OPS[op]
    tensors = [t for t in (where if isinstance(where, (list, tuple)) else [where]) if isinstance(t, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        dtype = dtype if dtype is not None else tensors[0].dtype
    else:
        device = torch.device(where)
    chosen = resolve_backend(op, backend, device, implemented(), dtype=dtype)
    if chosen != "eager" and has_dtensor(*tensors):
        return "eager"
    if refine is not None and chosen != "eager":
        chosen = refine(chosen, device=device, dtype=dtype, requested=requested_backend(backend), **shape)
    return chosen


def has_dtensor(*tensors) -> bool:
    """True when any argument is a DTensor (e.g. a parameter sharded by FSDP2's fully_shard).

    Kernels take plain tensors only; a DTensor goes through the eager path, whose torch ops
    DTensor knows how to shard (and redistribute) itself."""
    return any(t is not None and hasattr(t, "placements") and hasattr(t, "to_local") for t in tensors)


# ----------------------------------------------------------------------------- kernel modules
_KERNEL_MODULES: dict[str, ModuleType] = {}
_ON_IMPORT: dict[str, list[Callable[[ModuleType], None]]] = {}


def kernel_autograd(name: str, register: Callable[[ModuleType], Any]) -> Callable[[], Any]:
    """How an op module puts its autograd on the launchers of ``odelta_fast.kernels.<name>``
    without importing Triton before it runs: ``register(module)`` runs once that module is
    imported (at once if it is) and returns what the op calls (a launcher, or a dict of them);
    the returned getter imports the module on first use and hands that back."""
    registered: dict[str, Any] = {}

    def hook(module: ModuleType) -> None:
        registered["launchers"] = register(module)

    module = _KERNEL_MODULES.get(name)
    if module is not None:
        hook(module)
    else:
        _ON_IMPORT.setdefault(name, []).append(hook)

    def launchers() -> Any:
        if "launchers" not in registered:
            kernels(name)
        return registered["launchers"]

    return launchers


def kernels(name: str) -> ModuleType:
    """The Triton kernel module ``odelta_fast.kernels.<name>``, imported on first use (a plain
    dict lookup afterwards, which ``torch.compile`` traces without a graph break)."""
    module = _KERNEL_MODULES.get(name)
    if module is None:
        module = _KERNEL_MODULES[name] = _import_kernels(name)
        for hook in _ON_IMPORT.pop(name, []):
            hook(module)
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
