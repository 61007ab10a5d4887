"""Which Triton path runs a LoRA linear layer: a table of GPU measurements shipped with the package.

Key: (GPU compute capability, dtype, M bucket, K, N, r, dropout on/off); value: the fastest path,
``split`` (cuBLAS for the two big GEMMs, Triton for everything small), ``fused`` (Triton GEMMs
with the low-rank terms in their accumulators) or ``persistent`` (the fused path on a persistent
TMA-descriptor GEMM, Hopper and later), with every path's time and the benchmark run that measured
them. ``bench/run.py --write-dispatch`` writes it from a GPU run; a shape no GPU has measured runs
the split path, which cannot be slower than the eager path's cuBLAS GEMMs.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

from .backend import LORA_PATHS

TABLE = Path(__file__).with_name("lora_dispatch.json")
DEFAULT_PATH = "split"
FORMAT = 1


def m_bucket(m: int) -> int:
    """Token counts are measured per power-of-two bucket (capped at 8192), like the kernels' autotuning."""
    m = max(int(m), 1)
    return min(1 << (m - 1).bit_length(), 8192)


def capability(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{major}.{minor}"
    return device.type  # the interpreter: never measured, so the default path


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _key(cap: str, dtype, m: int, K: int, N: int, r: int, dropout: bool) -> tuple:
    return (cap, _dtype_name(dtype), m_bucket(m), int(K), int(N), int(r), bool(dropout))


@functools.lru_cache(maxsize=4)
def load(path: Optional[str] = None) -> dict:
    """``{key: entry}`` from the JSON table (``path`` for tests; the shipped table otherwise)."""
    data = json.loads(Path(path or TABLE).read_text())
    if data.get("format") != FORMAT:
        raise ValueError(f"{path or TABLE}: dispatch table format {data.get('format')!r}, expected {FORMAT}")
    table = {}
    for e in data.get("entries", []):
        table[_key(e["capability"], e["dtype"], e["m_bucket"], e["K"], e["N"], e["r"], e["dropout"])] = e
    return table


def lookup(device: torch.device, dtype, M: int, K: int, N: int, r: int, dropout: bool,
           path: Optional[str] = None) -> Optional[dict]:
    """The table entry measured for this shape on this kind of GPU, or None."""
    return load(path).get(_key(capability(device), dtype, M, K, N, r, dropout))


def choose(device: torch.device, dtype, M: Optional[int], K: int, N: int, r: int, dropout: bool,
           path: Optional[str] = None) -> str:
    """The path for one call; with ``M=None`` (a module's path before it sees a batch, for
    ``log()``) the path every measured token count agrees on, else e.g. ``split/fused by M``."""
    if M is not None:
        entry = lookup(device, dtype, M, K, N, r, dropout, path)
        return entry["path"] if entry else DEFAULT_PATH
    cap = capability(device)
    found = {e["path"] for key, e in load(path).items()
             if key[:2] == (cap, _dtype_name(dtype)) and key[3:] == (int(K), int(N), int(r), bool(dropout))}
    if len(found) > 1:
        return "/".join(p for p in LORA_PATHS if p in found) + " by M"
    return found.pop() if found else DEFAULT_PATH


def summary() -> str:
    """One line for ``odelta-fast env``: how many shapes the shipped table has and from which runs."""
    table = load()
    if not table:
        return f"{DEFAULT_PATH} for every shape (no GPU measurement shipped yet)"
    runs = sorted({e.get("run", "?") for e in table.values()})
    counts = ", ".join(f"{sum(e['path'] == p for e in table.values())} {p}" for p in LORA_PATHS)
    return f"{len(table)} measured shapes ({counts}) from " + "; ".join(runs) + f"; {DEFAULT_PATH} elsewhere"


def entries_from_rows(rows: list[dict], capability_name: str, run: str) -> list[dict]:
    """Table entries from benchmark rows (LoRA fwd+bwd, one valid row per path; split and fused
    at least, persistent where the GPU runs it): the fastest path per shape, with every path's time
    and the run that measured them."""
    by_shape: dict = {}
    for row in rows:
        if row.get("suite") != "lora" or row.get("mode") != "fwd+bwd" or row.get("provider") not in LORA_PATHS:
            continue
        if (row.get("extra") or {}).get("valid") is False:
            continue
        s = row["shape"]
        key = (row["dtype"], s["M"], s["K"], s["N"], s["r"], s["dropout"] > 0)
        by_shape.setdefault(key, {})[row["provider"]] = row["ms"]
    entries = []
    for (dtype, M, K, N, r, dropout), times in sorted(by_shape.items()):
        if not {"split", "fused"} <= set(times):
            continue
        entries.append({"capability": capability_name, "dtype": dtype, "m_bucket": m_bucket(M), "K": K, "N": N,
                        "r": r, "dropout": dropout, "path": min(times, key=times.get),
                        **{f"{p}_ms": times[p] for p in LORA_PATHS if p in times}, "run": run})
    return entries


def write(entries: list[dict], path: Optional[Path] = None) -> Path:
    """Merge ``entries`` into the table (a new measurement of a key replaces the old one)."""
    path = Path(path or TABLE)
    data = json.loads(path.read_text()) if path.exists() else {"format": FORMAT, "entries": []}
    keep = {_key(e["capability"], e["dtype"], e["m_bucket"], e["K"], e["N"], e["r"], e["dropout"]): e
            for e in data.get("entries", [])}
    for e in entries:
        keep[_key(e["capability"], e["dtype"], e["m_bucket"], e["K"], e["N"], e["r"], e["dropout"])] = e
    data["entries"] = sorted(keep.values(), key=lambda e: (e["capability"], e["dtype"], e["K"], e["N"], e["r"],
                                                             e["dropout"], e["m_bucket"]))
    path.write_text(json.dumps(data, indent=1) + "\n")
    load.cache_clear()
    return path
