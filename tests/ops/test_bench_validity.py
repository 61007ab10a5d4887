"""The benchmark checks each provider's output against a reference at the benchmark shape before
it times it, and marks a row whose output differs invalid (so a fast but wrong kernel cannot pass
as a speed result). Runs the suite code on CPU at toy sizes, the Triton provider in the interpreter."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from opcheck import needs_triton

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def bench_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import common
    import kernels as bench_kernels

    yield common, bench_kernels
    for name in ("common", "kernels", "multi_delta", "cpu_train_step"):
        sys.modules.pop(name, None)


def test_check_output_flags_wrong_missing_and_nonfinite(bench_modules):
    common, _ = bench_modules
    ref = torch.randn(64, 32)
    assert common.check_output(ref + 1e-4, ref, torch.bfloat16)["valid"] is True
    wrong = common.check_output(ref * 1.5, ref, torch.bfloat16)
    assert wrong["valid"] is False and "relative error" in wrong["why_invalid"]
    holes = ref.clone()
    holes[3:7] = float("nan")
    assert "non-finite" in common.check_output(holes, ref, torch.float32)["why_invalid"]
    assert common.check_output([ref, None], [ref, ref], torch.float32)["valid"] is False


@needs_triton
def test_lora_rows_check_the_triton_provider(bench_modules, monkeypatch):
    """Triton rows are checked (dropout mask reproduced from the seed); a kernel that returns wrong
    values is marked invalid instead of reported."""
    _, bench_kernels = bench_modules
    monkeypatch.setattr(bench_kernels, "_providers", lambda device, wanted, available: ["triton", "eager"])
    monkeypatch.setattr(bench_kernels, "time_ms", lambda fn, device, **kw: {"ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0})
    monkeypatch.setitem(bench_kernels.LORA_GRIDS, "tiny", dict(M=[33], KN=[(40, 24)], r=[8], dropout=[0.0, 0.2]))
    rows = list(bench_kernels.lora_rows(torch.device("cpu"), torch.float32, "tiny"))
    assert rows and all(r.extra["valid"] is True for r in rows), [(r.provider, r.extra) for r in rows]

    from odelta_fast.ops import lora as lora_op

    for path in ("split", "fused"):
        forward, backward = lora_op._triton_path(path)

        def broken(*args, forward=forward):
            y, *rest = forward(*args)
            return (y * 1.1, *rest)  # a wrong kernel

        monkeypatch.setitem(lora_op._PATHS, path, (broken, backward))
    rows = list(bench_kernels.lora_rows(torch.device("cpu"), torch.float32, "tiny"))
    triton_rows = [r for r in rows if r.provider == "triton"]
    assert triton_rows and all(r.extra["valid"] is False for r in triton_rows)
    assert all(r.extra["valid"] is True for r in rows if r.provider == "eager")
