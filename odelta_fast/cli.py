"""``odelta-fast``: the command line. Thin: parses arguments and calls the library."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model_path=args.model, epochs=args.epochs, output=args.output, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odelta-fast", description="Plug-and-play delta tuning with fused kernels.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"odelta-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train, save, reload and merge a LoRA delta on a real model, offline",
                          description="Train, save, reload and merge a LoRA delta on MiniLM (or --model), offline.")
    demo.add_argument("--model", metavar="PATH", help="a local Hugging Face model directory (default: packaged MiniLM)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs over the built-in task (default: 3)")
    demo.add_argument("--output", metavar="DIR", help="where to save the delta (default: a temporary directory)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
