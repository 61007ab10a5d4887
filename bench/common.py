"""Shared benchmark machinery: timing, device ceilings, FLOP / byte accounting, result rows.

Every figure is a median of many runs (``triton.testing.do_bench`` on CUDA, wall clock on CPU),
and every speed claim is a ratio against a reference measured in the same run.
"""
from __future__ import annotations

import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from roofline import roofline_ms


def device_of(name: Optional[str] = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, reps: int = 50, warmup: int = 5,
            graph: bool = False) -> dict:
    """Median (and 20th / 80th percentile) milliseconds per call of ``fn``. ``graph``: replay ``fn``
    from a CUDA graph, for kernels of a few microseconds whose launch overhead would otherwise be
    what is measured (falls back to plain launches if ``fn`` cannot be captured)."""
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        if graph:
            try:
                fn()  # compile and autotune outside the capture
                torch.cuda.synchronize(device)
                p50, p20, p80 = do_bench_cudagraph(fn, rep=max(reps, 100), quantiles=[0.5, 0.2, 0.8])
                return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "timer": "cudagraph"}
            except Exception as err:  # noqa: BLE001 - not capturable: time plain launches
                print(f"  (CUDA graph capture failed: {type(err).__name__}; timing plain launches)")
        p50, p20, p80 = do_bench(fn, warmup=25, rep=max(reps, 100), quantiles=[0.5, 0.2, 0.8])
        return {"ms": p50, "ms_p20": p20, "ms_p80": p80, "timer": "do_bench"}
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    return {"ms": statistics.median(samples), "ms_p20": samples[len(samples) // 5],
            "ms_p80": samples[(4 * len(samples)) // 5], "timer": "wall"}


def check_output(got, want, dtype: torch.dtype) -> dict:
    """Whether a provider's result (a tensor or a sequence of tensors) matches the reference's at
    the benchmark shape, before its time is taken as a claim: ``{"valid", "max_rel_err",
    "why_invalid"}``. The error is relative to the reference's largest magnitude; the bound allows
    16-bit rounding over long reductions (2e-2), 1e-3 in fp32 (tf32-free GEMMs agree far better)."""
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    bound = 1e-3 if dtype == torch.float32 else 2e-2
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            return {"valid": False, "max_rel_err": None, "why_invalid": f"output {i} missing"}
        if g.shape != w.shape:
            return {"valid": False, "max_rel_err": None, "why_invalid": f"output {i} shape {tuple(g.shape)} != {tuple(w.shape)}"}
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.isfinite(g64).all():
            return {"valid": False, "max_rel_err": None, "why_invalid": f"output {i} has non-finite values"}
        scale = max(w64.abs().max().item(), 1e-30) if w64.numel() else 1.0
        err = (g64 - w64).abs().max().item() / scale if w64.numel() else 0.0
        worst = max(worst, err)
    valid = worst <= bound
    return {"valid": valid, "max_rel_err": worst,
            "why_invalid": None if valid else f"max relative error {worst:.3g} > {bound:g}"}


def measure_ceilings(device: torch.device, small: bool = False) -> dict:
    """The device's practical limits, measured now: a large bf16 GEMM and a device-to-device copy."""
    n = 1024 if small or device.type != "cuda" else 8192
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    gemm = time_ms(lambda: a @ b, device, reps=10 if device.type != "cuda" else 50, warmup=2)
    numel = (1 << 20 if small or device.type != "cuda" else 1 << 30) // 2
    src = torch.empty(numel, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    dst = torch.empty_like(src)
    copy = time_ms(lambda: dst.copy_(src), device, reps=20, warmup=2)
    copy_bytes = 2 * src.numel() * src.element_size()  # read and write
    return {
        "gemm_shape": [n, n, n], "gemm_dtype": str(dtype).replace("torch.", ""),
        "gemm_tflops": 2 * n**3 / (gemm["ms"] * 1e-3) / 1e12,
        "copy_bytes": copy_bytes,
        "copy_gbps": copy_bytes / (copy["ms"] * 1e-3) / 1e9,
    }


def environment(device: torch.device) -> dict:
    info = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "device_type": device.type,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
    }
    for package in ("triton", "transformers", "peft"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    if device.type == "cuda":
        info["capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))  # the dispatch table's key
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


@dataclass
class Row:
    """One measured configuration of one provider."""

    suite: str
    provider: str
    mode: str
    shape: dict
    dtype: str
    ms: float
    ms_p20: float
    ms_p80: float
    flops: float
    bytes: float
    extra: dict = field(default_factory=dict)

    @property
    def tflops(self) -> float:
        return self.flops / (self.ms * 1e-3) / 1e12

    @property
    def gbps(self) -> float:
        return self.bytes / (self.ms * 1e-3) / 1e9

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(tflops=self.tflops, gbps=self.gbps)
        return d


def add_ratios(rows: list[dict], ceilings: dict) -> None:
    """Ratios against the references of the same configuration (same suite, mode, shape, dtype)."""
    def key(r):
        return (r["suite"], r["mode"], tuple(sorted(r["shape"].items())), r["dtype"])

    by_key: dict = {}
    for row in rows:
        by_key.setdefault(key(row), {})[row["provider"]] = row
    for row in rows:
        peers = by_key[key(row)]
        for ref in ("base", "eager", "peft", "copy"):
            if ref in peers and peers[ref] is not row:
                row[f"ratio_vs_{ref}"] = row["ms"] / peers[ref]["ms"]
        row["fraction_of_gemm_peak"] = row["tflops"] / ceilings["gemm_tflops"] if ceilings.get("gemm_tflops") else None
        row["fraction_of_copy_bw"] = row["gbps"] / ceilings["copy_gbps"] if ceilings.get("copy_gbps") else None
        if ceilings.get("gemm_tflops") and ceilings.get("copy_gbps"):
            row["roofline_ms"] = roofline_ms(row["flops"], row["bytes"], ceilings["gemm_tflops"], ceilings["copy_gbps"])
            row["fraction_of_roofline"] = row["roofline_ms"] / row["ms"]


def write_record(out_dir, file_name: str, record: dict) -> Path:
    """Write one benchmark record as JSON under ``out_dir`` (created if missing)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / file_name
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
