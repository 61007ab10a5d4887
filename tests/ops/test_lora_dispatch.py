"""The LoRA path table: built from benchmark rows (the faster valid path per shape, both times and
the run named), read back by ``backend="auto"`` / ``"triton"``; an unmeasured shape runs split."""
from __future__ import annotations

import json

import pytest
import torch

from odelta_fast.ops import lora_dispatch


def _row(provider, ms, M=4096, valid=True, dropout=0.0):
    return {"suite": "lora", "mode": "fwd+bwd", "provider": provider, "ms": ms, "dtype": "bfloat16",
            "shape": {"M": M, "K": 4096, "N": 4096, "r": 16, "dropout": dropout}, "extra": {"valid": valid}}


def test_entries_take_the_faster_valid_path_and_name_the_run():
    rows = [_row("split", 2.0), _row("fused", 1.5), _row("eager", 0.1),  # eager is not a path
            _row("split", 1.0, M=64), _row("fused", 0.5, M=64, valid=False),  # an invalid row is no claim
            _row("split", 3.0, dropout=0.05), _row("fused", 3.5, dropout=0.05)]
    entries = lora_dispatch.entries_from_rows(rows, "9.0", "2026-12-01-h200-headline.json")
    by = {(e["m_bucket"], e["dropout"]): e for e in entries}
    assert set(by) == {(4096, False), (4096, True)}  # M=64 has one valid path only: not decided
    assert by[(4096, False)]["path"] == "fused" and by[(4096, False)]["split_ms"] == 2.0
    assert by[(4096, True)]["path"] == "split"
    assert all(e["run"] == "2026-12-01-h200-headline.json" for e in entries)


def test_the_persistent_path_enters_the_table_where_it_was_measured():
    rows = [_row("split", 2.0), _row("fused", 1.5), _row("persistent", 1.2),
            _row("split", 1.0, M=64), _row("fused", 1.5, M=64)]  # a GPU without TMA: two paths
    by = {e["m_bucket"]: e for e in lora_dispatch.entries_from_rows(rows, "9.0", "run-p")}
    assert by[4096]["path"] == "persistent" and by[4096]["persistent_ms"] == 1.2 and by[4096]["fused_ms"] == 1.5
    assert by[64]["path"] == "split" and "persistent_ms" not in by[64]


def test_written_table_is_what_the_choice_reads(tmp_path, monkeypatch):
    table = tmp_path / "lora_dispatch.json"
    table.write_text(json.dumps({"format": lora_dispatch.FORMAT, "entries": []}))
    entries = lora_dispatch.entries_from_rows([_row("split", 2.0), _row("fused", 1.5)], "9.0", "run-a")
    lora_dispatch.write(entries, table)
    monkeypatch.setattr(lora_dispatch, "capability", lambda device: "9.0")
    choose = lora_dispatch.choose
    cpu = torch.device("cpu")
    assert choose(cpu, torch.bfloat16, 3000, 4096, 4096, 16, False, path=str(table)) == "fused"  # same M bucket
    assert choose(cpu, torch.bfloat16, 100, 4096, 4096, 16, False, path=str(table)) == "split"  # unmeasured M
    assert choose(cpu, torch.float16, 4096, 4096, 4096, 16, False, path=str(table)) == "split"  # other dtype
    assert choose(cpu, torch.bfloat16, None, 4096, 4096, 16, False, path=str(table)) == "fused"  # for log()
    # a later run's measurement of the same key replaces the earlier one
    lora_dispatch.write(lora_dispatch.entries_from_rows([_row("split", 1.0), _row("fused", 1.5)], "9.0", "run-b"),
                        table)
    assert choose(cpu, torch.bfloat16, 4096, 4096, 4096, 16, False, path=str(table)) == "split"
    assert len(json.loads(table.read_text())["entries"]) == 1


def test_the_shipped_table_loads_and_a_wrong_format_is_named(tmp_path):
    lora_dispatch.load()  # the table in the package parses
    bad = tmp_path / "t.json"
    bad.write_text(json.dumps({"format": 99, "entries": []}))
    with pytest.raises(ValueError, match="format 99"):
        lora_dispatch.load(str(bad))
