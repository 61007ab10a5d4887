"""Every Triton kernel compiles with the real compiler for sm_90 and sm_80, without a GPU, with the
specialization a real launch gets (16-byte alignment, divisibility by 16, sizes equal to 1 as
constants), and no config the autotuner can choose exceeds its target's shared memory or spills
registers in fp16/bf16 (``compile_for_gpu.py --quick``: the aligned launch of every op, and in fp16
the launch whose K and N are not multiples of 16)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("compile_for_gpu.py")


def test_triton_kernels_compile_for_hopper_and_ampere_within_resources():
    pytest.importorskip("triton", reason="triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--jobs", str(os.cpu_count() or 1)],
                            capture_output=True, text=True, timeout=1800, env=env, cwd=SCRIPT.parents[2])
    out = result.stdout + result.stderr
    problems = [line for line in out.splitlines() if line.startswith("PROBLEM")]
    assert result.returncode == 0, f"exit {result.returncode}:\n" + "\n".join(problems or out.splitlines()[-40:])
    last = result.stdout.strip().splitlines()[-1]
    assert last.endswith("; 0 problems") and " 0 variants" not in last, last
