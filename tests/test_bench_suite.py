"""The benchmark suite keeps working on CPU at toy sizes (pytest-benchmark; no timing
assertions: speed targets are ratios measured on a GPU by bench/run.py)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from odelta_fast import ops

ROOT = Path(__file__).resolve().parents[1]


def test_eager_lora_fwd_bwd_small(benchmark):
    x = torch.randn(256, 128, requires_grad=True)
    w = torch.randn(96, 128)
    a = torch.randn(8, 128, requires_grad=True)
    b = torch.randn(96, 8, requires_grad=True)

    def step():
        y = ops.lora_linear(x, w, None, a, b, 2.0, 0.05, backend="eager")
        y.sum().backward()
        return y

    y = benchmark(step)
    assert y.shape == (256, 96) and a.grad is not None


def test_eager_adapter_fwd_bwd_small(benchmark):
    h = torch.randn(256, 128, requires_grad=True)
    down = torch.randn(16, 128, requires_grad=True)
    up = torch.randn(128, 16, requires_grad=True)

    def step():
        y = ops.adapter_bottleneck(h, down, None, up, None, residual=h, backend="eager")
        y.sum().backward()
        return y

    assert benchmark(step).shape == h.shape


def test_suite_writes_results_table_and_plot(tmp_path):
    pytest.importorskip("peft")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--small", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (json_path,) = tmp_path.glob("*.json")
    record = json.loads(json_path.read_text())
    providers = {(r["suite"], r["provider"]) for r in record["rows"]}
    assert {("lora", "base"), ("lora", "eager"), ("lora", "peft"), ("adapter", "eager"), ("merge", "copy"),
            ("multi", "eager"), ("multi", "peft"), ("moe", "base"), ("moe", "eager"), ("moe", "peft")} <= providers
    try:
        import bitsandbytes  # noqa: F401

        assert {("qlora", "base"), ("qlora", "eager"), ("qlora", "peft")} <= providers
    except ImportError:  # the suite prints that it skipped
        pass
    lora_eager = [r for r in record["rows"] if r["suite"] == "lora" and r["provider"] == "eager"]
    assert all(r["ms"] > 0 and "ratio_vs_base" in r and "ratio_vs_peft" in r for r in lora_eager)
    assert record["e2e"] and {r["provider"] for r in record["e2e"]} == {"odelta_fast", "peft"}
    assert "| lora | fwd+bwd |" in json_path.with_suffix(".md").read_text()
    assert json_path.with_suffix(".png").stat().st_size > 1000
    assert json_path.with_suffix(".log").read_text().startswith("ceilings:")
