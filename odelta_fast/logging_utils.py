"""Logging for odelta_fast: the standard ``logging`` module under the package logger ``odelta_fast``.

The library itself only emits records (quiet by default: WARNING). A program that wants to see
them, such as the ``odelta-fast`` command line, calls :func:`configure` once: it installs one
stderr handler on the package logger whose level comes from ``ODELTA_VERBOSITY``
(``debug``, ``info``, ``warning``, ``error``, ``critical``), mirroring ``TRANSFORMERS_VERBOSITY``.

The handler writes through ``tqdm.write`` so a log line never tears a progress bar, and drops
records on processes whose ``RANK`` is not 0 (one copy of each message under ``torchrun``).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Optional, Union

PACKAGE_LOGGER = "odelta_fast"
ENV_VAR = "ODELTA_VERBOSITY"
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
DEFAULT_LEVEL = logging.WARNING
_HANDLER_MARK = "_odelta_cli_handler"


def get_logger(name: Optional[str] = None) -> logging.Logger:
    """``odelta_fast`` or a child of it (``get_logger("cli.train")`` -> ``odelta_fast.cli.train``)."""
    if not name or name == PACKAGE_LOGGER:
        return logging.getLogger(PACKAGE_LOGGER)
    if name.startswith(PACKAGE_LOGGER + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{PACKAGE_LOGGER}.{name}")


def parse_level(value: Union[str, int, None], source: str = ENV_VAR) -> int:
    """A level from a name (any case) or a number; a bad name raises ``ValueError`` naming ``source``."""
    if value is None or value == "":
        return DEFAULT_LEVEL
    if isinstance(value, int):
        return value
    text = str(value).strip().lower()
    if text.isdigit():
        return int(text)
    if text in LEVELS:
        return LEVELS[text]
    raise ValueError(f"{source}={value!r} is not a verbosity; expected one of {', '.join(LEVELS)}")


_warned: set = set()


def invalid_verbosity() -> Optional[str]:
    """What is wrong with ``ODELTA_VERBOSITY``, or None when it is unset or a level."""
    try:
        parse_level(os.environ.get(ENV_VAR))
    except ValueError as err:
        return f"{err}; using {logging.getLevelName(DEFAULT_LEVEL).lower()}"
    return None


def env_level(warn: bool = True) -> int:
    """The level ``ODELTA_VERBOSITY`` asks for; a value that is not a level means the default,
    with one warning (a typo in a logging variable must not stop a program)."""
    problem = invalid_verbosity()
    if problem is None:
        return parse_level(os.environ.get(ENV_VAR))
    if warn and problem not in _warned:
        _warned.add(problem)
        import warnings

        warnings.warn(problem, stacklevel=2)
    return DEFAULT_LEVEL


def is_debug() -> bool:
    """True when ``ODELTA_VERBOSITY=debug``: the command line then shows tracebacks."""
    return env_level(warn=False) <= logging.DEBUG


def set_verbosity(level: Union[str, int]) -> None:
    get_logger().setLevel(parse_level(level, source="verbosity"))


def get_verbosity() -> int:
    return get_logger().getEffectiveLevel()


def is_main_process() -> bool:
    """Rank 0 or not distributed (``RANK`` as set by torchrun / accelerate)."""
    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return rank.strip() in ("", "0")


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return is_main_process()


class _TqdmHandler(logging.Handler):
    """Writes above any active tqdm bar instead of through it. Without an explicit stream it
    writes to whatever ``sys.stderr`` is at the time (pytest and notebooks swap it)."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream if self.stream is not None else sys.stderr)
        except Exception:  # the logging module's own policy: never raise from a handler
            self.handleError(record)


def configure(level: Union[str, int, None] = None, stream=None, warn: bool = True) -> logging.Logger:
    """Install (once) the stderr handler on the package logger and set its level.

    ``level`` defaults to ``ODELTA_VERBOSITY`` (WARNING when unset or not a level). Records stop at the package logger (``propagate = False``): otherwise a root
    handler that ``basicConfig`` installed elsewhere would print each line a second time.
    Returns the package logger.
    """
    logger = get_logger()
    resolved = env_level(warn) if level is None else parse_level(level, source="verbosity")
    logger.setLevel(resolved)
    handler = next((h for h in logger.handlers if getattr(h, _HANDLER_MARK, False)), None)
    if handler is None:
        handler = _TqdmHandler(stream)
        setattr(handler, _HANDLER_MARK, True)
        handler.setFormatter(logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        handler.addFilter(_RankZeroFilter())
        logger.addHandler(handler)
    else:
        handler.stream = stream
    logger.propagate = False
    _quiet_transformers(resolved)
    return logger


@contextlib.contextmanager
def configured(level: Union[str, int, None] = None, stream=None, warn: bool = True):
    """``configure()`` for the duration of a block, then the previous state back (the package
    logger's level, handlers and propagation, and transformers' verbosity and progress bars), so
    that calling the command line in-process (tests, notebooks) leaves logging as it found it."""
    logger = get_logger()
    saved = (logger.level, list(logger.handlers), logger.propagate)
    try:
        from transformers.utils import logging as hf_logging

        hf_saved = (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
    except ImportError:  # pragma: no cover - transformers is a dependency
        hf_logging, hf_saved = None, None
    try:
        yield configure(level, stream, warn)
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
        if hf_logging is not None:
            hf_logging.set_verbosity(hf_saved[0])
            (hf_logging.enable_progress_bar if hf_saved[1] else hf_logging.disable_progress_bar)()


def _quiet_transformers(level: int) -> None:
    """Keep transformers' advisory warnings (a freshly initialised classifier head, ...) out of
    a quiet run unless the user asked for them with ``TRANSFORMERS_VERBOSITY``."""
    if os.environ.get("TRANSFORMERS_VERBOSITY"):
        return
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    # One step quieter than ours: at "info" its config dumps would drown the training log.
    hf_logging.set_verbosity(logging.ERROR if level > logging.INFO else logging.WARNING if level > logging.DEBUG
                             else logging.INFO)
    # Its per-file "Loading weights" bars too: the command's own bar is the one that matters.
    if level > logging.INFO:
        hf_logging.disable_progress_bar()
    else:
        hf_logging.enable_progress_bar()


def tqdm_disable(requested: Optional[bool] = None) -> Optional[bool]:
    """tqdm's ``disable`` argument for a bar: off on non-zero ranks and when ``CI`` is set;
    ``requested`` (a ``--progress/--no-progress`` flag) wins otherwise. ``None`` lets tqdm decide
    (it hides the bar when stderr is not a terminal)."""
    if not is_main_process():
        return True
    if requested is not None:
        return not requested
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        return True
    return None
