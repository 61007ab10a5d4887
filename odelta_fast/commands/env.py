"""``odelta-fast env``: versions and usable backends, for bug reports (like ``accelerate env``)."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from typing import Any, Optional


def add_parser(sub) -> None:
    p = sub.add_parser(
        "env", help="print versions, the GPU and which backends are usable (paste it into bug reports)",
        description="Print the versions of Python, torch, Triton, transformers, peft and odelta_fast, the CUDA "
                    "runtime and GPU, and which op backends (eager, triton, cuda) this machine can run.",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _nvcc() -> tuple[Optional[str], Optional[str]]:
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
            except (OSError, subprocess.SubprocessError):
                return path, None
            release = next((line.split("release", 1)[1].split(",")[0].strip()
                            for line in out.splitlines() if "release" in line), None)
            return path, release
    return None, None


def collect() -> dict[str, Any]:
    import torch

    from ..version import __version__

    info: dict[str, Any] = {
        "odelta_fast": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "safetensors": _version("safetensors"),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": props.name, "capability": f"{props.major}.{props.minor}",
                                 "memory_gib": round(props.total_memory / 2**30, 1)})
        try:
            info["cuda_driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # informational only
            info["cuda_driver"] = None
    nvcc_path, nvcc_release = _nvcc()
    info["nvcc"] = f"{nvcc_release or '?'} ({nvcc_path})" if nvcc_path else None
    ninja = shutil.which("ninja") or (importlib.util.find_spec("ninja") is not None and "python package")
    info["ninja"] = ninja or None
    triton_importable = importlib.util.find_spec("triton") is not None
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    backends = {"eager": "yes"}
    if not triton_importable:
        backends["triton"] = "no (triton not installed)"
    elif torch.cuda.is_available():
        backends["triton"] = "yes"
    elif interpret:
        backends["triton"] = "interpreter mode (TRITON_INTERPRET=1, CPU, slow: for tests)"
    else:
        backends["triton"] = "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
    if nvcc_path and ninja and torch.cuda.is_available():
        backends["cuda"] = "yes (JIT build with nvcc + ninja)"
    else:
        lacking = [n for n, ok in (("nvcc", nvcc_path), ("ninja", ninja), ("a CUDA device", torch.cuda.is_available()))
                   if not ok]
        backends["cuda"] = "no (missing: " + ", ".join(lacking) + ")"
    info["backends"] = backends
    from ..ops import lora_dispatch

    info["lora_paths"] = lora_dispatch.summary()
    info["lora_persistent"] = _persistent_path(triton_importable, interpret)
    info["env"] = {k: os.environ[k] for k in ("ODELTA_BACKEND", "ODELTA_VERBOSITY", "TRITON_INTERPRET",
                                              "CUDA_VISIBLE_DEVICES") if k in os.environ}
    return info


def _persistent_path(triton_importable: bool, interpret: bool) -> str:
    """Whether ``backend="persistent"`` (LoRA's TMA GEMM path) can run here, and if not, why."""
    import torch

    if not triton_importable:
        return "no (triton not installed)"
    if not torch.cuda.is_available() and not interpret:
        return "no CUDA device"
    from ..ops import backend_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        backend_for("lora_linear", device, "persistent")
    except ValueError as err:
        return f"no: {err}"
    return "yes" if device == "cuda" else "interpreter mode"


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    rows = [
        ("odelta_fast", info["odelta_fast"]), ("Python", f"{info['python']} ({sys.executable})"),
        ("Platform", info["platform"]), ("torch", info["torch"]), ("Triton", info["triton"] or "not installed"),
        ("transformers", info["transformers"]), ("peft", info["peft"] or "not installed"),
        ("safetensors", info["safetensors"]),
        ("CUDA (torch build)", info["torch_cuda"] or "none (CPU build)"),
        ("CUDA available", "yes" if info["cuda_available"] else "no"),
        ("GPU", ", ".join(f"{g['name']} (sm {g['capability']}, {g['memory_gib']} GiB)" for g in info["gpus"])
         or "none"),
        ("nvcc", info["nvcc"] or "not found"), ("ninja", info["ninja"] or "not found"),
    ]
    rows += [(f"backend {name}", state) for name, state in info["backends"].items()]
    rows.append(("LoRA Triton path", info["lora_paths"]))
    rows.append(("LoRA persistent", info["lora_persistent"]))
    rows += [(name, value) for name, value in info["env"].items()]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0
