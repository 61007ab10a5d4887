"""``odelta-fast``: the command line. Thin: parses arguments and calls the subcommand modules in
``odelta_fast.commands`` (one per subcommand); ``demo`` lives in ``odelta_fast.demo``.

Bad input (a missing directory, a malformed dataset row, an unknown method or config key, a
spec that selects nothing) prints one line ``odelta-fast: error: ...`` to stderr and exits 2;
``ODELTA_VERBOSITY=debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(model_path=args.model, epochs=args.epochs, output=args.output, seed=args.seed)


def build_parser() -> argparse.ArgumentParser:
    from .version import __version__
    from .commands import bench, build_ext, env, inspect, merge, train

    parser = argparse.ArgumentParser(
        prog="odelta-fast", description="Plug-and-play delta tuning with fused kernels.",
        epilog="Logging: ODELTA_VERBOSITY=debug|info|warning|error (default: warning).",
    )
    parser.add_argument("--version", action="version", version=f"odelta-fast {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train, save, reload and merge a LoRA delta on a real model, offline",
                          description="Train, save, reload and merge a LoRA delta on MiniLM (or --model), offline.")
    demo.add_argument("--model", metavar="PATH", help="a local Hugging Face model directory (default: packaged MiniLM)")
    demo.add_argument("--epochs", type=int, default=3, help="training epochs over the built-in task (default: 3)")
    demo.add_argument("--output", metavar="DIR", help="where to save the delta (default: a temporary directory)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)
    for module in (train, merge, inspect, bench, env, build_ext):
        module.add_parser(sub)
    return parser


def _error(message: str) -> None:
    print(f"odelta-fast: error: {message}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from . import logging_utils

    problem = logging_utils.invalid_verbosity()
    if problem:  # a typo in ODELTA_VERBOSITY: say so once, then run at the default level
        print(f"odelta-fast: warning: {problem}", file=sys.stderr)
    with logging_utils.configured(warn=False):
        return _run(argv, logging_utils.is_debug())


def _run(argv: Optional[Sequence[str]], debug: bool) -> int:
    from .commands.common import CLIError, one_line

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as err:
        if debug:
            raise
        _error(one_line(err))
        return EXIT_USAGE
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted")
        return EXIT_INTERRUPTED
    except Exception as err:  # a bug or an environment problem: still one line, exit 1
        if debug:
            raise
        _error(f"{type(err).__name__}: {one_line(err)} (set ODELTA_VERBOSITY=debug for the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
