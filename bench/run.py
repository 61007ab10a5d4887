"""Run the benchmark suite and publish it: ``bench/results/<date>-<device>.{json,md,png,log}``,
and (``--update-readme``) the README's performance section, generated from the newest results.

    python bench/run.py                       # full suite on the GPU
    python bench/run.py --small --out /tmp/x  # toy sizes (CPU smoke run)
    python bench/run.py --report-only         # regenerate table, plot and README from the newest JSON
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from common import add_ratios, device_of, environment, measure_ceilings  # noqa: E402
from roofline import roofline_ms  # noqa: E402

RESULTS = HERE / "results"
README = HERE.parent / "README.md"
MARK_START, MARK_END = "<!-- perf:start -->", "<!-- perf:end -->"


class Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for s in self.streams:
            s.write(text)
        return len(text)

    def flush(self):
        for s in self.streams:
            s.flush()


def run_suites(device, size: str, suites: list[str], providers, e2e: bool) -> dict:
    from kernels import SUITES

    small = size == "small"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    record = {"date": dt.date.today().isoformat(), "environment": environment(device), "small": small, "size": size,
              "ceilings": measure_ceilings(device, small), "rows": [], "e2e": None}
    c = record["ceilings"]
    print(f"ceilings: {c['gemm_tflops']:.1f} TFLOP/s ({c['gemm_dtype']} GEMM {c['gemm_shape']}), "
          f"copy {c['copy_gbps']:.0f} GB/s")
    for name in suites:
        for row in SUITES[name](device, dtype, size, providers):
            d = row.to_dict()
            record["rows"].append(d)
            valid = d["extra"].get("valid")
            flag = "" if valid in (True, None) else f"  INVALID: {d['extra'].get('why_invalid')}"
            limit = roofline_ms(d["flops"], d["bytes"], c["gemm_tflops"], c["copy_gbps"])
            passes = d["extra"].get("extra_passes")
            print(f"{d['suite']:8} {d['mode']:8} {d['provider']:7} {json.dumps(d['shape']):60} "
                  f"{d['ms']:9.3f} ms {d['tflops']:8.2f} TFLOP/s {d['gbps']:8.1f} GB/s  roofline {limit:.3f} ms "
                  f"({limit / d['ms']:.0%})" + (f", +{passes} passes" if passes is not None else "") + flag,
                  flush=True)
    add_ratios(record["rows"], record["ceilings"])
    if e2e:
        from e2e_train import e2e_rows

        record["e2e"] = e2e_rows(device, small)
        for r in record["e2e"]:
            print(f"e2e {r['provider']:12} {r['tokens_per_s']:10.0f} tokens/s  peak {r['peak_memory_bytes']}")
    return record


def markdown(record: dict) -> str:
    env = record["environment"]
    lines = [f"Device: {env['device']} (driver {env.get('driver')}), torch {env['torch']}, Triton {env.get('triton')}, "
             f"CUDA {env.get('cuda')}; measured {record['date']}. Ceilings measured in the same run: "
             f"{record['ceilings']['gemm_tflops']:.3g} TFLOP/s GEMM, {record['ceilings']['copy_gbps']:.3g} GB/s copy.",
             *([""] + ["**Toy sizes (`--small`): this run shows the suite works on this machine; its timings are "
                       "not a performance claim.** The GPU-size suite needs a CUDA device."] if record.get("small") else []),
             "", "Roofline: the larger of FLOPs at the measured GEMM peak and bytes at the measured copy bandwidth "
                 "(`bench/roofline.py`); for LoRA, passes over the M x K and M x N tensors beyond the frozen base "
                 "layer's, per path (`tests/ops/test_lora_passes.py` checks the model against the real launches).",
             "", "| suite | mode | shape | provider | ms | TFLOP/s | GB/s | roofline ms (of it) | extra passes "
             "| vs base | vs eager | vs PEFT | vs copy | output |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    for r in record["rows"]:
        limit = (f"{r['roofline_ms']:.3f} ({r['fraction_of_roofline']:.0%})" if r.get("roofline_ms") is not None
                 else "")
        passes = (r.get("extra") or {}).get("extra_passes")
        lines.append(f"| {r['suite']} | {r['mode']} | {_shape(r)} | {r['provider']} | {r['ms']:.3f} | "
                     f"{r['tflops']:.1f} | {r['gbps']:.0f} | {limit} | {'' if passes is None else passes} | "
                     f"{_ratio_cells(r)} | {_validity(r)} |")
    return "\n".join(lines + _e2e_table(record)) + "\n"


def _validity(r: dict) -> str:
    """Whether the row's output matched eager at the benchmark shape before it was timed."""
    extra = r.get("extra") or {}
    valid = extra.get("valid")
    if valid is True:
        return "checked"
    if valid is False:
        return f"**INVALID** ({extra.get('why_invalid')})"
    return extra.get("why_invalid") or "not checked"


def _fmt(value, spec=".2f") -> str:
    return "" if value is None else format(value, spec)


def _shape(r: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in r["shape"].items())


def _ratio_cells(r: dict) -> str:
    """The "vs base | vs eager | vs PEFT | vs copy" cells of a row."""
    return " | ".join(_fmt(r.get(f"ratio_vs_{ref}")) for ref in ("base", "eager", "peft", "copy"))


def _e2e_table(record: dict) -> list[str]:
    if not record.get("e2e"):
        return []
    return ["", "| end-to-end training | tokens/s | peak memory (GiB) | vs PEFT |", "|---|---|---|---|",
            *(_e2e_line(r) for r in record["e2e"])]


def _e2e_line(r: dict) -> str:
    peak = r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] else None
    versus = "reference" if r["provider"] == "peft" else (
        f"{_fmt(r.get('speedup_vs_peft'))}x tokens/s" + (f", {_fmt(r.get('memory_vs_peft'))}x peak memory"
                                                       if r.get("memory_vs_peft") else ""))
    return f"| {r['provider']} | {r['tokens_per_s']:.0f} | {_fmt(peak)} | {versus} |"


def _headline(rows: list[dict], suite: str, mode: str, prefer: dict) -> list[dict]:
    """The rows of one representative configuration: the largest M, with preferred shape values."""
    rows = [r for r in rows if r["suite"] == suite and r["mode"] == mode]
    for key, value in prefer.items():
        if any(r["shape"].get(key) == value for r in rows):
            rows = [r for r in rows if r["shape"].get(key) == value]
    if not rows:
        return []
    size_key = next(k for k in ("M", "N", "tokens") if k in rows[0]["shape"])
    biggest = max(r["shape"][size_key] for r in rows)
    rows = [r for r in rows if r["shape"][size_key] == biggest]
    first_shape = rows[0]["shape"]
    return [r for r in rows if r["shape"] == first_shape]


def summary(record: dict) -> str:
    """The headline figures against their targets, for the README."""
    rows = record["rows"]
    lines = ["| what | shape | provider | ms | vs base | vs eager | vs PEFT | vs copy |", "|---|---|---|---|---|---|---|---|"]
    picks = (_headline(rows, "lora", "fwd+bwd", {"K": 4096, "N": 4096, "r": 16, "M": 8192, "dropout": 0.0})
             + _headline(rows, "lora", "fwd+bwd", {"K": 4096, "N": 4096, "r": 16, "M": 8192, "dropout": 0.05})
             + _headline(rows, "adapter", "fwd+bwd", {}) + _headline(rows, "bias", "fwd+bwd", {})
             + _headline(rows, "merge", "merge", {"r": 16})
             + _headline(rows, "multi", "decode", {"batch": "mixed"}) + _headline(rows, "multi", "decode", {"batch": "one delta"})
             + _headline(rows, "moe", "fwd+bwd", {}) + _headline(rows, "qlora", "fwd+bwd", {})
             + _headline(rows, "dora", "fwd+bwd", {}))
    for r in picks:
        ms = f"{r['ms']:.3f}" if (r.get("extra") or {}).get("valid") is not False else f"~~{r['ms']:.3f}~~ invalid"
        lines.append(f"| {r['suite']} {r['mode']} | {_shape(r)} | {r['provider']} | {ms} | {_ratio_cells(r)} |")
    return "\n".join(lines + _e2e_table(record)) + "\n"


def plot(record: dict, path: Path) -> bool:
    """Time against M per provider for the LoRA layer, one panel per (K, N, r) at dropout 0."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in record["rows"] if r["suite"] == "lora" and r["mode"] == "fwd+bwd" and r["shape"]["dropout"] == 0]
    panels = sorted({(r["shape"]["K"], r["shape"]["N"], r["shape"]["r"]) for r in rows})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (K, N, rank) in zip(axes[0], panels):
        for provider in sorted({r["provider"] for r in rows}):
            pts = sorted((r["shape"]["M"], r["ms"]) for r in rows
                         if r["provider"] == provider and (r["shape"]["K"], r["shape"]["N"], r["shape"]["r"]) == (K, N, rank))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set(title=f"LoRA fwd+bwd K={K} N={N} r={rank}", xlabel="M (tokens)", ylabel="ms", xscale="log", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(f"{record['environment']['device']} - {record['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def update_readme(record_path: Path, record: dict) -> None:
    text = README.read_text()
    rel = record_path.relative_to(HERE.parent)
    md_lines = markdown(record).split("\n\n| suite")[0]  # the header paragraph(s), without the full table
    section = (f"{MARK_START}\nGenerated by `python bench/run.py --update-readme` from [`{rel}`]({rel}) "
               f"(full table: [`{rel.with_suffix('.md')}`]({rel.with_suffix('.md')}), raw log: "
               f"[`{rel.with_suffix('.log')}`]({rel.with_suffix('.log')})).\n\n{md_lines}\n\n{summary(record)}\n"
               f"![LoRA time against M]({rel.with_suffix('.png')})\n{MARK_END}")
    if MARK_START in text:
        text = re.sub(re.escape(MARK_START) + ".*?" + re.escape(MARK_END), lambda m: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    README.write_text(text)


def newest_result() -> Path:
    files = sorted(RESULTS.glob("*-*.json"), key=lambda p: p.stat().st_mtime)
    files = [f for f in files if "cpu-train-step" not in f.name]
    if not files:
        raise SystemExit(f"no results in {RESULTS}; run the suite first")
    return files[-1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="toy sizes (CPU smoke run)")
    parser.add_argument("--headline", action="store_true",
                        help="only the target shapes (M=8192, K=N=4096), no end-to-end run: the time-boxed GPU check")
    parser.add_argument("--device", default=None)
    parser.add_argument("--suites", nargs="+", default=["lora", "adapter", "bias", "merge", "multi", "moe", "qlora",
                                                        "dora"])
    parser.add_argument("--providers", nargs="+", default=None)
    parser.add_argument("--no-e2e", action="store_true")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--update-readme", action="store_true")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--write-dispatch", action="store_true",
                        help="write the fastest LoRA path (split / fused / persistent) per measured shape into the table "
                             "backend='auto' reads (odelta_fast/ops/lora_dispatch.json)")
    args = parser.parse_args(argv)

    if args.report_only:
        path = newest_result()
        record = json.loads(path.read_text())
    else:
        device = device_of(args.device)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = re.sub(r"[^A-Za-z0-9]+", "-", environment(device)["device"]).strip("-").lower() or "cpu"
        size = "small" if args.small else "headline" if args.headline else "full"
        path = out / f"{dt.date.today().isoformat()}-{tag}{'' if size == 'full' else '-' + size}.json"
        with open(path.with_suffix(".log"), "w") as log, contextlib.redirect_stdout(Tee(sys.stdout, log)):
            record = run_suites(device, size, args.suites, args.providers,
                                e2e=not (args.no_e2e or args.headline))
        path.write_text(json.dumps(record, indent=1) + "\n")
    md = markdown(record)
    path.with_suffix(".md").write_text(md)
    plotted = plot(record, path.with_suffix(".png"))
    print(f"wrote {path} (+ .md, .log{', .png' if plotted else ''})")
    if args.update_readme:
        update_readme(path, record)
        print(f"updated the performance section of {README}")
    if args.write_dispatch:
        write_dispatch(record, path.name)
    return 0


def write_dispatch(record: dict, run: str) -> None:
    """The LoRA path table from this run's split / fused / persistent rows (a GPU run: CPU runs time
    none of them)."""
    from odelta_fast.ops import lora_dispatch

    capability = record["environment"].get("capability")
    if not capability:
        print("no GPU capability in this run: dispatch table left as it is")
        return
    entries = lora_dispatch.entries_from_rows(record["rows"], capability, run)
    if not entries:
        print("no shape has valid split and fused rows: dispatch table left as it is")
        return
    print(f"wrote {len(entries)} shapes into {lora_dispatch.write(entries)}")


if __name__ == "__main__":
    sys.exit(main())
