"""``AutoDeltaConfig`` / ``AutoDeltaModel``: build or load any method from its ``delta_type``."""
from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from . import checkpoint
from .configs import BaseDeltaConfig
from .peft_format import is_peft_checkpoint

# delta_type -> "module:ClassName", imported on first use so one broken method cannot break the rest
# (or the class itself, for methods registered with register_method).
DELTA_MODEL_MAPPING: dict[str, Any] = {
    "lora": "odelta_fast.methods.lora:LoraModel",
    "bitfit": "odelta_fast.methods.bitfit:BitFitModel",
    "adapter": "odelta_fast.methods.adapter:AdapterModel",
    "parallel_adapter": "odelta_fast.methods.parallel_adapter:ParallelAdapterModel",
    "compacter": "odelta_fast.methods.compacter:CompacterModel",
    "low_rank_adapter": "odelta_fast.methods.low_rank_adapter:LowRankAdapterModel",
    "prefix": "odelta_fast.methods.prefix:PrefixModel",
    "soft_prompt": "odelta_fast.methods.soft_prompt:SoftPromptModel",
}


def model_class(delta_type: str):
    try:
        target = DELTA_MODEL_MAPPING[delta_type]
    except KeyError:
        raise ValueError(f"unknown delta_type {delta_type!r}; expected one of {sorted(DELTA_MODEL_MAPPING)}") from None
    if not isinstance(target, str):
        return target
    module_name, class_name = target.split(":")
    return getattr(importlib.import_module(module_name), class_name)


def register_method(cls) -> type:
    """Make a method written outside this package known to ``AutoDeltaConfig``,
    ``AutoDeltaModel`` and the command line by its ``delta_type`` (usable as a decorator)."""
    if not getattr(cls, "delta_type", "") or getattr(cls, "config_class", None) is None:
        raise ValueError(f"{cls.__name__} needs a delta_type and a config_class to be registered")
    if cls.config_class.delta_type != cls.delta_type:
        raise ValueError(f"{cls.__name__}.delta_type {cls.delta_type!r} differs from its config's "
                         f"{cls.config_class.delta_type!r}")
    known = DELTA_MODEL_MAPPING.get(cls.delta_type)
    if known is not None and known is not cls:
        raise ValueError(f"delta_type {cls.delta_type!r} is taken by {known}")
    DELTA_MODEL_MAPPING[cls.delta_type] = cls
    return cls


def config_class(delta_type: str) -> type[BaseDeltaConfig]:
    """The typed config class of a method (``LoraConfig`` for ``"lora"``)."""
    return model_class(delta_type).config_class


class AutoDeltaConfig:
    @staticmethod
    def from_dict(config: dict[str, Any], **overrides: Any) -> BaseDeltaConfig:
        """The typed config (``LoraConfig``, ...) a dict with a ``delta_type`` describes. Keys the
        method does not take are dropped with a warning (OpenDelta's behaviour)."""
        config = dict(config)
        if "delta_type" not in config:
            raise ValueError(f"a delta config needs a 'delta_type' key (one of {sorted(DELTA_MODEL_MAPPING)})")
        return config_class(config["delta_type"]).from_dict(config, **overrides)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str, **overrides: Any) -> BaseDeltaConfig:
        return AutoDeltaConfig.from_dict(checkpoint.read_config(finetuned_delta_path), **overrides)


class AutoDeltaModel:
    @staticmethod
    def from_config(config, backbone_model: nn.Module, **overrides):
        if isinstance(config, dict):
            config = AutoDeltaConfig.from_dict(config)
        return model_class(config.delta_type).from_config(config, backbone_model, **overrides)

    @staticmethod
    def from_finetuned(finetuned_delta_path: str, backbone_model: nn.Module, **overrides):
        """Load a checkpoint of any type; a PEFT adapter directory is recognised by its
        ``adapter_config.json`` carrying ``peft_type``."""
        if is_peft_checkpoint(finetuned_delta_path):
            return model_class("lora").from_peft(finetuned_delta_path, backbone_model, **overrides)
        config = checkpoint.read_config(finetuned_delta_path)
        if "delta_type" not in config:
            raise checkpoint.CheckpointError(f"{finetuned_delta_path!r}: config.json has no 'delta_type'")
        return model_class(config["delta_type"]).from_finetuned(finetuned_delta_path, backbone_model, **overrides)
