"""``odelta-fast bench``: run a benchmark script from ``bench/`` (``--list`` shows them).

A thin dispatcher: every ``bench/<name>.py`` with a ``__main__`` guard is a benchmark, run in a
fresh interpreter with the remaining arguments passed through, so each script stays runnable
on its own and keeps its own ``--help``.
"""
from __future__ import annotations

import argparse
import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from .common import CLIError

DEFAULT = "cpu_train_step"


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench", help="run a benchmark script from bench/ (--list shows them)",
        description="Run bench/<NAME>.py with the given arguments (default: cpu_train_step). Arguments after "
                    "NAME go to the script; use '--' before them if they start with '-'. The bench directory is "
                    "--bench-dir, else $ODELTA_BENCH_DIR, else ./bench, else the one beside the source checkout.",
        epilog="examples:\n  odelta-fast bench --list\n  odelta-fast bench cpu_train_step -- --small --steps 2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--bench-dir", metavar="DIR", help="where the benchmark scripts are")
    p.add_argument("name", nargs="?", metavar="NAME", help=f"benchmark to run (default: {DEFAULT})")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the script")
    p.set_defaults(func=run)


def bench_dir(explicit: Optional[str] = None) -> Path:
    candidates: list[tuple[str, Path]] = []
    if explicit:
        candidates.append(("--bench-dir", Path(explicit)))
    elif os.environ.get("ODELTA_BENCH_DIR"):
        candidates.append(("ODELTA_BENCH_DIR", Path(os.environ["ODELTA_BENCH_DIR"])))
    else:
        candidates += [("./bench", Path.cwd() / "bench"),
                       ("the source checkout", Path(__file__).resolve().parents[2] / "bench")]
    for _, path in candidates:
        if path.is_dir():
            return path
    where, path = candidates[0]
    if explicit or os.environ.get("ODELTA_BENCH_DIR"):
        raise CLIError(f"{where} {path}: no such directory; expected the directory holding the benchmark scripts")
    raise CLIError("no bench/ directory found (benchmarks ship with the source checkout, not the wheel); "
                   "run from the repository root or pass --bench-dir DIR")


def scripts(directory: Path) -> dict[str, Path]:
    """The runnable scripts: those with a ``__main__`` guard (the rest are helper modules)."""
    out = {}
    for path in sorted(directory.glob("*.py")):
        try:
            runnable = "__main__" in path.read_text(errors="replace")
        except OSError:
            runnable = False
        if runnable and not path.name.startswith("_"):
            out[path.stem] = path
    return out


def summary(path: Path) -> str:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text()))
    except (SyntaxError, OSError, UnicodeDecodeError):
        doc = None
    return doc.strip().splitlines()[0] if doc else ""


def run(args: argparse.Namespace) -> int:
    directory = bench_dir(args.bench_dir)
    available = scripts(directory)
    if args.list:
        width = max((len(n) for n in available), default=0)
        for name, path in available.items():
            print(f"{name:<{width}}  {summary(path)}")
        if not available:
            print(f"(no benchmark scripts in {directory})")
        return 0
    name = args.name or DEFAULT
    if name.endswith(".py"):
        name = name[:-3]
    if name not in available:
        raise CLIError(f"bench {name}: no such benchmark in {directory}; expected one of "
                       f"{', '.join(available) or '(none)'}")
    script_args = list(args.script_args)
    if script_args[:1] == ["--"]:
        script_args = script_args[1:]
    return subprocess.call([sys.executable, str(available[name]), *script_args])
