"""Finding a module's KV-cache argument by what it is, not by what it is called.

transformers has renamed the cache argument of attention modules and models several times
(``layer_past``, ``past_key_value``, ``past_key_values``, and in 5.24 ``cache``), and will again.
A cache is recognised by its annotation (``Cache``, ``Cache | None``, ``EncoderDecoderCache``, a
string annotation naming one) and, for values, by behaving like one (``update`` and
``get_seq_length``). The historical names are only a fallback for forwards without annotations.
"""
from __future__ import annotations

import inspect
import re
import sys
import typing
from typing import Any, Mapping, Optional

from torch import nn

# Names transformers has used for the cache argument; consulted only when no annotation says.
HISTORICAL_CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")

_CACHE_IN_STRING = re.compile(r"\b\w*Cache\b")


def _is_cache_class(candidate: Any) -> bool:
    if not isinstance(candidate, type):
        return False
    cache_utils = sys.modules.get("transformers.cache_utils")
    base = getattr(cache_utils, "Cache", None)
    if base is not None and issubclass(candidate, base):
        return True
    # A cache class of a library that is not transformers' (or a stub): same idea, same methods.
    return candidate.__name__.endswith("Cache") and callable(getattr(candidate, "update", None))


def annotation_is_cache(annotation: Any) -> bool:
    """True when a parameter annotation says "a KV cache" (possibly optional or in a union)."""
    if annotation is inspect.Parameter.empty or annotation is None:
        return False
    if isinstance(annotation, str):
        return bool(_CACHE_IN_STRING.search(annotation))
    if _is_cache_class(annotation):
        return True
    return any(annotation_is_cache(arg) for arg in typing.get_args(annotation))


def forward_parameters(module: nn.Module) -> list[inspect.Parameter]:
    """The named parameters of the module class's forward, after ``self``."""
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def cache_parameter(module: nn.Module) -> Optional[str]:
    """The name of the forward parameter of ``module`` that takes its KV cache, or None."""
    params = forward_parameters(module)
    for param in params:
        if annotation_is_cache(param.annotation):
            return param.name
    names = [p.name for p in params]
    return next((name for name in HISTORICAL_CACHE_NAMES if name in names), None)


def is_cache_value(value: Any) -> bool:
    return value is not None and callable(getattr(value, "get_seq_length", None)) and callable(
        getattr(value, "update", None))


def cache_in(kwargs: Mapping[str, Any]) -> Optional[Any]:
    """The KV cache among call arguments, whatever name the caller used for it."""
    for name in HISTORICAL_CACHE_NAMES:
        if is_cache_value(kwargs.get(name)):
            return kwargs[name]
    return next((value for value in kwargs.values() if is_cache_value(value)), None)


def cache_length(kwargs: Mapping[str, Any]) -> int:
    """How many positions the KV cache among ``kwargs`` already holds (0 without one)."""
    cache = cache_in(kwargs)
    return 0 if cache is None else int(cache.get_seq_length())
