"""The subcommands of ``odelta-fast``, one module each; ``odelta_fast.cli`` wires them together.

Each module has ``add_parser(subparsers)`` and a ``run(args) -> int``; bad input raises
``CLIError``, which the command line prints as one ``odelta-fast: error: ...`` line.
"""
from .common import CLIError

SUBCOMMANDS = ("train", "merge", "inspect", "bench", "env")

__all__ = ["CLIError", "SUBCOMMANDS"]
