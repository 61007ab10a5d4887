"""Typed configurations: one dataclass per method, sharing the addressing fields.

A method's config is the single description of its arguments: the constructor builds one from
its (explicit, OpenDelta-compatible) keyword arguments, checkpoints save ``to_dict()`` and load
through ``from_dict``, ``AutoDeltaConfig`` picks the class by ``delta_type``, and the command line
parses ``-p key=value`` with the field's declared type. Values are checked when a config is
built, so a bad value is refused before any model is touched.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional

# Keys a saved checkpoint config carries for bookkeeping, not as arguments of the method.
INFORMATIONAL_KEYS = frozenset({
    "delta_type", "backbone_class", "backbone_model_type", "targets", "odelta_fast_version", "weights_file",
    "format_version",
})
BACKENDS = ("auto", "eager", "triton", "cuda")
# OpenDelta's backend names: "hf" (its default: Hugging Face / plain PyTorch models) is what every
# backend here runs on; BMTrain's "bmt" is not supported.
OPENDELTA_BACKENDS = {"hf": "auto"}


class UnusedConfigKeyWarning(UserWarning):
    """A config dict carried keys the method does not take; they were dropped (as OpenDelta does)."""


@dataclass
class BaseDeltaConfig:
    """Which modules a delta modifies and how it runs; every method's config extends this.

    ``modified_modules=None`` means the method's default targets. ``unfrozen_modules`` lists
    backbone modules trained (and saved) with the delta, ``"deltas"`` standing for the delta's
    own parameters. ``common_structure``: True matches common names only, False raw names
    only, None both."""

    delta_type: ClassVar[str] = ""

    modified_modules: Optional[list[str]] = None
    exclude_modules: Optional[list[str]] = None
    unfrozen_modules: Optional[list[str]] = None
    common_structure: Optional[bool] = None
    backend: str = "auto"
    name: Optional[str] = None

    def __post_init__(self):
        for key in ("modified_modules", "exclude_modules", "unfrozen_modules"):
            value = getattr(self, key)
            if isinstance(value, str):
                setattr(self, key, [value])
            elif value is not None:
                setattr(self, key, list(value))
        self.backend = OPENDELTA_BACKENDS.get(self.backend, self.backend)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not one of {', '.join(map(repr, BACKENDS))}"
                             + (" (OpenDelta's BMTrain backend is not supported)" if self.backend == "bmt" else ""))
        if self.name is not None and not (isinstance(self.name, str) and self.name.isidentifier()):
            raise ValueError(f"delta name {self.name!r} must be a Python identifier (it becomes a module attribute)")
        self.validate()

    def validate(self) -> None:
        """Check the method's own values; raise ``ValueError`` naming the bad one."""

    # ------------------------------------------------------------------ fields
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def addressing_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(BaseDeltaConfig))

    @classmethod
    def hyperparameter_names(cls) -> tuple[str, ...]:
        addressing = set(cls.addressing_names())
        return tuple(n for n in cls.field_names() if n not in addressing)

    @classmethod
    def field_kinds(cls) -> dict[str, str]:
        """``field -> "int" | "float" | "bool" | "str" | "list" | "dict" | "any"``, from the
        declared types: how the command line parses ``key=value``."""
        hints = typing.get_type_hints(cls)
        return {name: _kind(hints.get(name, Any)) for name in cls.field_names()}

    def hyperparameters(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.hyperparameter_names()}

    # ------------------------------------------------------------------ conversions
    @classmethod
    def from_arguments(cls, arguments: Mapping[str, Any]) -> "BaseDeltaConfig":
        """The config of a constructor call: ``arguments`` is the constructor's ``locals()``
        (its parameters; ``self`` and the backbone are not fields and are left out).
        OpenDelta's ``interactive_modify`` (a browser-based module picker) is accepted as False."""
        if arguments.get("interactive_modify"):
            raise ValueError("interactive_modify=True (OpenDelta's browser-based module picker) is not supported; "
                             "list the modules in modified_modules (`odelta-fast inspect MODEL_DIR` shows the names "
                             "and what a spec selects)")
        return cls(**{n: arguments[n] for n in cls.field_names() if n in arguments})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **overrides: Any) -> "BaseDeltaConfig":
        """A config from a dict (a checkpoint's ``config.json``, OpenDelta's ``asdict(delta_args)``),
        with ``overrides`` replacing some of its values. As in OpenDelta, keys the method does not
        take are dropped with one warning (``UnusedConfigKeyWarning``, naming the closest accepted
        key for likely typos); values are checked strictly."""
        values = {**dict(values), **overrides}
        saved_type = values.get("delta_type", cls.delta_type)
        if cls.delta_type and saved_type != cls.delta_type:
            raise ValueError(f"a {saved_type!r} config is not a {cls.__name__} ({cls.delta_type!r})")
        unknown = sorted(set(values) - set(cls.field_names()) - INFORMATIONAL_KEYS)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, cls.field_names(), n=1, cutoff=0.75)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            warnings.warn(f"{cls.__name__} ({cls.delta_type}) does not take {', '.join(hints)}; ignored. "
                          f"Accepted keys: {', '.join(sorted(cls.field_names()))}", UnusedConfigKeyWarning, stacklevel=3)
        return cls(**{k: v for k, v in values.items() if k in cls.field_names()})

    @classmethod
    def from_finetuned(cls, finetuned_delta_path, **overrides: Any) -> "BaseDeltaConfig":
        """The config of a delta checkpoint directory (``save_finetuned`` output)."""
        from .checkpoint import read_config

        return cls.from_dict(read_config(finetuned_delta_path), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {"delta_type": self.delta_type, **{n: getattr(self, n) for n in self.field_names()}}

    def to_kwargs(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this config."""
        return {n: getattr(self, n) for n in self.field_names()}


def _kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        kinds = {_kind(a) for a in typing.get_args(annotation) if a is not type(None)}
        return kinds.pop() if len(kinds) == 1 else "any"
    if annotation is bool:
        return "bool"
    if annotation is int:
        return "int"
    if annotation is float:
        return "float"
    if annotation is str:
        return "str"
    if annotation in (list, tuple) or origin in (list, tuple, typing.Sequence):
        return "list"
    if annotation is dict or origin in (dict, typing.Mapping):
        return "dict"
    return "any"


def positive_int(config: BaseDeltaConfig, *names: str) -> None:
    """``ValueError`` for any of ``names`` that is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
