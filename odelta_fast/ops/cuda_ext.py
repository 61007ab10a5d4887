"""The CUDA C++ extension (``csrc/``): built just-in-time on first use, loaded, or skipped.

``available()`` builds the extension with ``torch.utils.cpp_extension.load`` (ninja) the first
time a CUDA op asks for it, for the visible GPU's own architecture (``sm_80``, ``sm_90``, ...),
into ``<cache>/odelta_fast/cuda_ext/<tag>`` where ``<cache>`` is ``$ODELTA_CACHE_DIR`` or the user's
cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``) and ``<tag>`` names torch, CUDA, the
architecture and a digest of the sources, so an upgrade or an edit rebuilds and nothing stale
loads. Where it cannot be built (no GPU, a CPU-only torch, no ``nvcc``, no ``ninja``, a compiler
error) it warns ONCE per process and every op falls back to Triton or eager; nothing raises.
``ODELTA_CUDA_EXT=0`` disables it without a warning.

``build_extension()`` builds ahead of time (the ``odelta-fast build-ext`` command).

The ops land in ``torch.ops.odelta_fast_cuda``: ``bgmv_shrink``, ``bgmv_expand_``, ``lora_merge_``
(schemas, CUDA and Meta implementations in ``csrc/*.cu``).

``backend="auto"`` picks CUDA over Triton for an op only where a benchmark on a GPU showed it
faster; ``AUTO_TABLE`` records the decision and the measurement behind it.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

logger = logging.getLogger("odelta_fast")

EXTENSION_NAME = "odelta_fast_cuda"
ENV_DISABLE = "ODELTA_CUDA_EXT"
ENV_CACHE = "ODELTA_CACHE_DIR"
CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# op -> (what "auto" picks on a CUDA device, the measurement that decided it).
AUTO_TABLE: dict[str, tuple[str, str]] = {
    "multi_lora_shrink": ("triton", "not measured yet: defaults to Triton"),
    "multi_lora_expand": ("triton", "not measured yet: defaults to Triton"),
    "lora_merge_": ("triton", "not measured yet: defaults to Triton"),
}


def auto_prefers_cuda(op: str) -> bool:
    return AUTO_TABLE.get(op, ("triton", ""))[0] == "cuda"


def source_dir() -> Path:
    """``csrc/``: beside the package in a checkout, ``odelta_fast/csrc`` once installed."""
    installed = Path(__file__).resolve().parents[1] / "csrc"
    if installed.is_dir() and any(installed.glob("*.cu")):
        return installed
    return Path(__file__).resolve().parents[2] / "csrc"


def sources() -> list[Path]:
    return sorted(source_dir().glob("*.cu"))


def headers() -> list[Path]:
    return sorted(source_dir().glob("*.cuh"))


def cache_root() -> Path:
    root = os.environ.get(ENV_CACHE)
    if root:
        return Path(root).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "odelta_fast"


def arch_flags(archs: Sequence[str]) -> list[str]:
    """nvcc flags for compute capabilities like ``"8.0"``/``"9.0"``: real machine code for each,
    no PTX. The kernels use no sm_90a-only instruction (no wgmma, no setmaxnreg), so Hopper gets
    plain ``sm_90``; arch-specific ``sm_90a`` would tie the binary to Hopper for nothing."""
    flags = []
    for arch in archs:
        digits = arch.replace(".", "").replace("+PTX", "")
        flags.append(f"-gencode=arch=compute_{digits},code=sm_{digits}")
    return flags


def device_archs() -> list[str]:
    """Compute capabilities of the visible GPUs (deduplicated), e.g. ``["9.0"]``."""
    found = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        arch = f"{major}.{minor}"
        if arch not in found:
            found.append(arch)
    return found


def nvcc_flags(archs: Sequence[str]) -> list[str]:
    # No -std: torch's builder adds the standard its headers need (C++17 or C++20 by version).
    # No fast math: the kernels are checked against float64 references.
    return ["-O3", "-lineinfo", *arch_flags(archs)]


def torch_cxx_std() -> int:
    """The C++ standard torch's own extension builder passes (C++17 in older releases, C++20 in
    recent ones); its headers warn or fail under another one. The CI compile test uses it."""
    import inspect

    from torch.utils import cpp_extension

    try:
        return 20 if "-std=c++20" in inspect.getsource(cpp_extension) else 17
    except (OSError, TypeError):  # pragma: no cover - source not shipped
        return 17


def _tag(archs: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for path in sources() + headers():
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(nvcc_flags(archs)).encode())
    cuda = (torch.version.cuda or "none").replace(".", "")
    arch = "_".join(a.replace(".", "") for a in archs)
    return f"torch{torch.__version__.split('+')[0]}-cu{cuda}-sm{arch}-{digest.hexdigest()[:12]}"


def missing_prerequisite() -> Optional[str]:
    """Why the extension cannot be built here, or None."""
    if os.environ.get(ENV_DISABLE, "1") == "0":
        return f"disabled by {ENV_DISABLE}=0"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    if not sources():
        return f"no CUDA sources found in {source_dir()}"
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = shutil.which("nvcc") if cuda_home is None else str(Path(cuda_home) / "bin" / "nvcc")
    if nvcc is None or not Path(nvcc).exists():
        return "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def build_extension(archs: Optional[Sequence[str]] = None, *, verbose: bool = False, load: bool = True) -> Path:
    """Build (or find in the cache) the extension for ``archs`` (default: the visible GPUs, else
    ``TORCH_CUDA_ARCH_LIST``, else ``8.0`` and ``9.0``) and return its build directory. Raises
    ``RuntimeError`` with the reason where it cannot be built. With ``load`` the library is also
    loaded into this process (``torch.utils.cpp_extension.load`` always does)."""
    reason = missing_prerequisite()
    if reason is not None:
        raise RuntimeError(f"cannot build the odelta_fast CUDA extension: {reason}")
    if archs is None:
        archs = device_archs() if torch.cuda.is_available() else []
        if not archs:
            env = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
            archs = [a for a in env.replace(";", " ").split() if a] or ["8.0", "9.0"]
    archs = list(archs)
    from torch.utils import cpp_extension

    build_dir = cache_root() / "cuda_ext" / _tag(archs)
    build_dir.mkdir(parents=True, exist_ok=True)
    logger.info("building the CUDA extension for %s in %s", ",".join(archs), build_dir)
    cpp_extension.load(
        name=EXTENSION_NAME,
        sources=[str(p) for p in sources()],
        extra_cflags=["-O3"],
        extra_cuda_cflags=nvcc_flags(archs),
        extra_include_paths=[str(source_dir())],
        build_directory=str(build_dir),
        verbose=verbose,
        is_python_module=False,
    )
    return build_dir


_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str once decided


def available() -> bool:
    """Whether the CUDA ops can run here; the first call builds and loads the extension. On
    failure: one warning, then False for the rest of the process."""
    ok = _state.get("ok")
    if ok is not None:
        return ok
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        reason = missing_prerequisite()
        if reason is None and not torch.cuda.is_available():
            reason = "no CUDA device is visible"
        if reason is None:
            try:
                build_extension(device_archs())
                ops()  # the library registered its ops
            except Exception as err:  # noqa: BLE001 - any build or load failure means "fall back"
                reason = f"building or loading it failed: {type(err).__name__}: {err}"
        _state["ok"] = reason is None
        _state["reason"] = reason
        if reason is not None and reason != f"disabled by {ENV_DISABLE}=0":
            warnings.warn(
                f"odelta_fast: the CUDA C++ kernels are unavailable ({reason}); backend='cuda' falls back to "
                "Triton or eager for the rest of this process", RuntimeWarning, stacklevel=3)
        return _state["ok"]


def unavailable_reason() -> Optional[str]:
    available()
    return _state.get("reason")


def ops():
    """``torch.ops.odelta_fast_cuda`` (after ``available()`` returned True)."""
    namespace = torch.ops.odelta_fast_cuda
    namespace.bgmv_shrink  # raises AttributeError/RuntimeError if the library is not loaded
    return namespace


def lora_merge_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, alpha: float,
                fan_in_fan_out: bool) -> None:
    """``weight += alpha * B A`` in place with the CUDA kernel (fp32 accumulation, one rounding);
    for ``ops.merge.lora_merge_``'s ``"cuda"`` backend."""
    ops().lora_merge_(weight, lora_a.to(weight.dtype).contiguous(), lora_b.to(weight.dtype).contiguous(),
                      float(alpha), bool(fan_in_fan_out))


def _reset_for_tests() -> None:
    _state.clear()
