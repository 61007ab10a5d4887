"""odelta_fast: plug-and-play delta tuning for any PyTorch / Hugging Face model.

Attach LoRA, adapters, BitFit, prefixes and more by module name, with no edit to the model's
code; every delta computation goes through one op layer with an eager reference path and
fused kernels underneath.
"""
import logging as _logging
import os as _os

from .version import __version__
from .addressing import TargetNotFoundError, UnmatchedSpecWarning
from .auto import AutoDeltaConfig, AutoDeltaModel
from .checkpoint import CheckpointError
from .configs import BaseDeltaConfig
from .delta import DeltaBase
from .methods.adapter import AdapterModel
from .methods.bitfit import BitFitModel
from .methods.compacter import CompacterModel
from .methods.lora import LoraModel
from .methods.low_rank_adapter import LowRankAdapterModel
from .methods.parallel_adapter import ParallelAdapterModel
from .visualize import Visualization

# A library only emits records: no handler beyond NullHandler, and the root logger is left alone.
# ODELTA_VERBOSITY sets the package level; programs (the CLI) install a handler via logging_utils.
_logger = _logging.getLogger(__name__)
_logger.addHandler(_logging.NullHandler())
if _os.environ.get("ODELTA_VERBOSITY"):
    from .logging_utils import parse_level as _parse_level

    try:
        _logger.setLevel(_parse_level(_os.environ["ODELTA_VERBOSITY"]))
    except ValueError as _err:  # a typo in an environment variable must not break the import
        import warnings as _warnings

        _warnings.warn(str(_err), stacklevel=2)


def __getattr__(name):
    # Prefix and soft-prompt tuning pull in attention internals of transformers; import on use.
    if name == "PrefixModel":
        from .methods.prefix import PrefixModel

        return PrefixModel
    if name == "MultiDelta":
        from .multi import MultiDelta

        return MultiDelta
    if name == "SoftPromptModel":
        from .methods.soft_prompt import SoftPromptModel

        return SoftPromptModel
    raise AttributeError(f"module 'odelta_fast' has no attribute {name!r}")


__all__ = [
    "AdapterModel", "AutoDeltaConfig", "AutoDeltaModel", "BaseDeltaConfig", "BitFitModel", "CheckpointError",
    "CompacterModel",
    "DeltaBase", "LoraModel", "LowRankAdapterModel", "MultiDelta", "ParallelAdapterModel", "PrefixModel",
    "SoftPromptModel", "TargetNotFoundError", "UnmatchedSpecWarning", "Visualization",
    "__version__",
]
