"""The command line parses and documents itself; the CPU benchmark script runs at toy size
(no timing assertions: speed targets live in bench/, measured as ratios)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from odelta_fast.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_has_help(capsys):
    parser = build_parser()
    subcommands = parser._subparsers._group_actions[0].choices
    assert "demo" in subcommands
    for name in subcommands:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        assert exit_info.value.code == 0
        assert "usage: odelta-fast " + name in capsys.readouterr().out


def test_demo_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(SystemExit, match="config.json"):
        main(["demo", "--model", str(tmp_path)])


def test_cpu_train_step_benchmark_runs_at_toy_size():
    pytest.importorskip("peft")
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "cpu_train_step.py"), "--small", "--steps", "1", "--warmup", "0",
         "--dropout", "0.05"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "ours / peft" in result.stdout
