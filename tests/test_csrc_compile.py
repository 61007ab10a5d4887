"""CI without a GPU: every ``csrc/*.cu`` compiles to an object file for sm_80 and sm_90 with nvcc
against torch's headers (``nvcc -c``, no link), so a syntax or template error fails here instead
of at the first JIT build on a GPU machine.

The flags mirror ``torch.utils.cpp_extension.load``: torch's include directories, the Python
include, the C++ standard torch's builder uses, its ``COMMON_NVCC_FLAGS``, ``TORCH_EXTENSION_NAME``,
``TORCH_API_INCLUDE_EXTENSION_H`` and ``_GLIBCXX_USE_CXX11_ABI`` matching this torch. One nvcc call
per file covers both architectures (the host side is compiled once); files compile in parallel.

The same compile reports each kernel's resources (``--resource-usage``): no kernel may spill, and
every kernel states the blocks per SM it is built for in ``__launch_bounds__(threads, min_blocks)``,
which its registers must allow (what the occupancy comments in the sources claim).

A CPU-only torch wheel omits one generated header of its CUDA wheels
(``c10/cuda/impl/cuda_cmake_macros.h``, a single define); the test supplies it in a temporary
include directory when it is missing, which changes nothing when compiling against a CUDA torch.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from odelta_fast.ops import cuda_ext

NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
if NVCC is not None and not os.path.exists(NVCC):
    NVCC = None

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit): the CUDA sources were not compiled")

ARCHS = ("8.0", "9.0")
SOURCES = cuda_ext.sources()
# One file, both architectures: about 30 s of CPU on this CI's 2 cores; several minutes means a
# runaway template instantiation, which fails instead of blocking the suite.
TIMEOUT_S = 600


def _flags(stub_dir: Path) -> list[str]:
    from torch.utils import cpp_extension

    includes = list(cpp_extension.include_paths()) + [sysconfig.get_paths()["include"], str(cuda_ext.source_dir())]
    flags = [f"-I{p}" for p in includes]
    macros = Path(cpp_extension.include_paths()[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not macros.exists():
        target = stub_dir / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        flags.append(f"-I{stub_dir}")
    flags += [
        f"-std=c++{cuda_ext.torch_cxx_std()}",
        *cpp_extension.COMMON_NVCC_FLAGS,
        f"-DTORCH_EXTENSION_NAME={cuda_ext.EXTENSION_NAME}",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        "-Xcompiler", "-fPIC",
        *cuda_ext.nvcc_flags(ARCHS),
    ]
    return flags


def _compile(source: Path, out_dir: Path, flags: list[str]) -> dict:
    obj = out_dir / (source.stem + ".o")
    cmd = [NVCC, "-c", str(source), "-o", str(obj), "--resource-usage", *flags]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    if proc.returncode != 0 and "unsupported GNU version" in proc.stderr:
        # nvcc refuses host compilers newer than it knows; torch's headers are fine with them.
        cmd.insert(1, "-allow-unsupported-compiler")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    return {"cmd": cmd, "rc": proc.returncode, "log": proc.stdout + proc.stderr, "obj": obj,
            "seconds": time.perf_counter() - start}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("csrc_objects")
    flags = _flags(out_dir / "stub_include")
    with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
        futures = {src.name: pool.submit(_compile, src, out_dir, flags) for src in SOURCES}
        return {name: f.result() for name, f in futures.items()}


def test_sources_exist():
    names = {p.name for p in SOURCES}
    assert {"bgmv.cu", "merge.cu"} <= names, f"csrc/ lost a source file: {sorted(names)}"


@pytest.mark.parametrize("source", [p.name for p in SOURCES])
def test_cu_file_compiles_for_sm80_and_sm90(compiled, source):
    result = compiled[source]
    assert result["rc"] == 0, f"nvcc failed on {source}:\n{' '.join(result['cmd'])}\n{result['log'][-6000:]}"
    assert result["obj"].stat().st_size > 0
    # Warnings in our own files (not torch's headers) fail too: they are how template mistakes
    # that still compile (narrowing, unused results, shadowing) show up.
    own = [line for line in result["log"].splitlines()
           if "warning" in line.lower() and str(cuda_ext.source_dir()) in line]
    assert not own, f"{source} compiles with warnings:\n" + "\n".join(own)
    # Both architectures' machine code is in the object (cuobjdump lists the embedded cubins).
    cuobjdump = shutil.which("cuobjdump") or str(Path(NVCC).parent / "cuobjdump")
    if os.path.exists(cuobjdump):
        listing = subprocess.run([cuobjdump, "--list-elf", str(result["obj"])], capture_output=True, text=True)
        if listing.returncode == 0:
            for arch in ARCHS:
                assert f"sm_{arch.replace('.', '')}" in listing.stdout, f"{source}: no sm_{arch} code\n{listing.stdout}"


REGISTERS_PER_SM = 65536


def _resources(log: str) -> list[dict]:
    """Per compiled kernel (name, architecture): registers and spill bytes, from ptxas's report."""
    found, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if m:
            current = {"kernel": m.group(1), "arch": m.group(2), "spill": 0}
            found.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current["spill"] = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return found


def _launch_bounds(source: Path) -> dict[str, tuple[int, int]]:
    """kernel name -> (threads, min blocks per SM) from ``__launch_bounds__`` and the file's
    integer constants."""
    text = source.read_text()
    consts = {name: int(value) for name, value in re.findall(r"constexpr (?:int|int64_t) (k\w+) = (\d+);", text)}
    bounds = {}
    for threads, blocks, name in re.findall(
            r"__global__ void __launch_bounds__\(([^,()]+)(?:,\s*([^()]+))?\)\s*(\w+)\(", text):
        evaluate = lambda expr: int(eval(expr, {"__builtins__": {}}, consts))  # noqa: E731,S307
        bounds[name] = (evaluate(threads), evaluate(blocks) if blocks else 0)
    return bounds


@pytest.mark.parametrize("source", [p.name for p in SOURCES])
def test_cu_kernels_fit_their_stated_occupancy_without_spilling(compiled, source):
    result = compiled[source]
    assert result["rc"] == 0, result["log"][-3000:]
    bounds = _launch_bounds(cuda_ext.source_dir() / source)
    assert bounds, f"{source}: no __global__ kernel with __launch_bounds__ found"
    for name, (threads, blocks) in bounds.items():
        assert blocks > 0, f"{source}: {name} states no minimum blocks per SM in __launch_bounds__"
    kernels = _resources(result["log"])
    assert kernels, f"{source}: no ptxas resource report in the nvcc output"
    for k in kernels:
        name = next((n for n in bounds if n in k["kernel"]), None)
        assert name is not None, f"{source}: compiled kernel {k['kernel']} has no __launch_bounds__"
        threads, blocks = bounds[name]
        assert k["spill"] == 0, f"{source}: {name} ({k['arch']}) spills {k['spill']} bytes"
        # Registers are allocated per warp in units of 256 (8 per thread).
        per_thread = -(-k["registers"] // 8) * 8
        assert per_thread * threads * blocks <= REGISTERS_PER_SM, (
            f"{source}: {name} ({k['arch']}) uses {k['registers']} registers: {blocks} blocks of {threads} threads "
            f"do not fit an SM's {REGISTERS_PER_SM}")
