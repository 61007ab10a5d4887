"""``odelta-fast build-ext``: build the CUDA C++ extension ahead of time (it is otherwise built
just in time on first use of ``backend="cuda"``)."""
from __future__ import annotations

import argparse

from .common import CLIError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "build-ext", help="build the CUDA C++ extension now instead of on first use",
        description="Build the CUDA C++ kernels in csrc/ with ninja for the given GPU architectures "
                    "(default: the visible GPUs, else TORCH_CUDA_ARCH_LIST, else 8.0 and 9.0) into the cache.",
    )
    p.add_argument("--arch", nargs="+", metavar="X.Y", help="compute capabilities, e.g. 8.0 9.0")
    p.add_argument("--verbose", action="store_true", help="show the compiler's output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ops import cuda_ext

    try:
        path = cuda_ext.build_extension(args.arch, verbose=args.verbose, load=False)
    except RuntimeError as err:
        raise CLIError(str(err)) from None
    print(f"built the odelta_fast CUDA extension in {path}")
    return 0
