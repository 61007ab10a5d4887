"""PEFT's LoRA checkpoint format, both ways.

PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ``(r, in)`` / ``lora_B.weight`` ``(out, r)``,
and modules it trains in full (``modules_to_save``) under their own keys. Shapes are the same for
Linear and GPT-2 ``Conv1D`` targets (``fan_in_fan_out`` only changes how merges transpose), so a
LoRA delta maps onto the format one to one.

Loading takes the target modules from the weight keys, not from ``target_modules``: the keys
say exactly which modules carry LoRA, whatever matching rule wrote them.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .addressing import backbone_modules, pattern_value
from .checkpoint import CheckpointError, atomic_write, read_json, read_safetensors, save_tensors

logger = logging.getLogger("odelta_fast")

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])\.weight$")

# Config keys PEFT writes for LoRA; anything else is from a newer PEFT and is ignored with a warning.
KNOWN_LORA_KEYS = {
    "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "fan_in_fan_out",
    "bias", "use_rslora", "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "megatron_config", "megatron_core", "trainable_token_indices",
    "loftq_config", "eva_config", "corda_config", "use_dora", "layer_replication", "lora_bias",
    "target_parameters", "use_qalora", "qalora_group_size", "arrow_config", "use_bdlora", "kasa_config",
    "ensure_weight_tying", "alora_invocation_tokens", "runtime_config", "lora_ga_config", "monteclora_config",
    "velora_config",
}
# Features that change the math: loading them as plain LoRA would give wrong outputs.
UNSUPPORTED_WHEN_SET = {"use_dora": "DoRA", "lora_bias": "LoRA bias terms", "use_qalora": "QALoRA",
                        "layer_replication": "layer replication", "target_parameters": "parameter targeting",
                        "kasa_config": "KaSA", "monteclora_config": "MonteCLoRA", "arrow_config": "Arrow routing",
                        "use_bdlora": "block-diagonal LoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)",
                        "trainable_token_indices": "trainable tokens"}

_TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
               ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
               ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"))


def is_peft_checkpoint(path: str | os.PathLike) -> bool:
    config = Path(path) / PEFT_CONFIG_NAME
    if not config.is_file():
        return False
    try:
        return "peft_type" in read_json(config)
    except CheckpointError:
        return False


ANCHORED = "[r]^"  # an addressing spec matching one whole path: ANCHORED + re.escape(path)

# Heads PEFT adds to ``modules_to_save`` by itself for these task types, and then expects in the
# adapter file (a SEQ_CLS adapter without them makes PeftModel.from_pretrained raise KeyError).
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
               "QUESTION_ANS": ("qa_outputs",)}


def _task_heads(model: nn.Module, task_type) -> list[str]:
    names = _TASK_HEADS.get(task_type, ())
    heads: list[str] = []
    for path, _ in model.named_modules():
        if path and path.rsplit(".", 1)[-1] in names and not any(path.startswith(h + ".") for h in heads):
            heads.append(path)
    return heads


def _task_type(model: nn.Module):
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def exact_path_spec(path: str) -> str:
    """The addressing spec that selects the module at ``path`` and nothing else."""
    return ANCHORED + re.escape(path)


def _exact_pattern(path: str) -> str:
    # PEFT reads rank_pattern / alpha_pattern keys as regexes on the end of module names (so does
    # ``pattern_value``); the caret keeps ``lin0`` from also naming ``block.lin0``.
    return "^" + re.escape(path)


def _peft_target_modules(backbone: nn.Module, paths: list[str]):
    """``target_modules`` that PEFT reads as exactly ``paths``: the list of them (PEFT matches a
    list entry against whole names and their dotted tails), unless one is also the tail of another
    module's name here; then a regex, which PEFT matches against whole names."""
    wanted = set(paths)
    if any(path not in wanted and any(path.endswith("." + p) for p in wanted) for path, _ in backbone_modules(backbone)):
        return "|".join(re.escape(p) for p in sorted(wanted))
    return sorted(wanted)


def save_peft(delta, path: str | os.PathLike) -> str:
    """Write a LoRA delta (a ``LoraModel``) in PEFT's layout: weights first, then the config that
    makes the directory a checkpoint."""
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern, alpha_pattern = {}, {}
    for slot in delta.slots:
        tensors[f"{PREFIX}{slot.path}.lora_A.weight"] = slot.delta.lora_A
        tensors[f"{PREFIX}{slot.path}.lora_B.weight"] = slot.delta.lora_B
        if slot.delta.r != delta.lora_r:
            rank_pattern[_exact_pattern(slot.path)] = slot.delta.r
        if slot.delta.alpha != delta.lora_alpha:
            alpha_pattern[_exact_pattern(slot.path)] = slot.delta.alpha
    backbone = delta.backbone_model
    task_type = _task_type(backbone)
    # The head PEFT would train for this task goes in too (its current values when this delta did
    # not train it): PEFT's loader requires it, and it is what makes outputs equal on reload.
    heads = _task_heads(backbone, task_type)
    saved = {name: p for head in heads for name, p in backbone.get_submodule(head).named_parameters(prefix=head)}
    saved.update(delta._claimed_parameter_values())
    for name, param in saved.items():
        tensors[PREFIX + name] = param
    owners = sorted(set(heads) | {name.rsplit(".", 1)[0] for name in saved
                                  if not any(name.startswith(h + ".") for h in heads)})
    # One entry per outermost module: PEFT wraps each listed module, and nested wraps break it.
    modules_to_save = [m for m in owners if not any(m.startswith(o + ".") for o in owners)]
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(backbone, "name_or_path", None) or None,
        "inference_mode": True,
        "r": delta.lora_r,
        "lora_alpha": delta.lora_alpha,
        "lora_dropout": delta.lora_dropout,
        "target_modules": _peft_target_modules(backbone, [slot.path for slot in delta.slots]),
        "fan_in_fan_out": any(slot.delta.fan_in_fan_out for slot in delta.slots),
        "bias": "none",
        "use_rslora": delta.use_rslora,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": False,
    }
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_tensors(directory / PEFT_WEIGHTS_NAME, cpu, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return str(directory)


def read_peft_config(path: str | os.PathLike) -> dict[str, Any]:
    config_path = Path(path) / PEFT_CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{str(path)!r} holds no {PEFT_CONFIG_NAME}; is it a PEFT adapter directory?")
    config = read_json(config_path, "PEFT adapter config")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"{config_path}: peft_type {peft_type!r} is not supported; only PEFT LORA checkpoints can be loaded"
        )
    unknown = sorted(set(config) - KNOWN_LORA_KEYS)
    if unknown:
        warnings.warn(f"{config_path}: ignoring unknown PEFT config keys {unknown} (written by a newer PEFT?)",
                      stacklevel=3)
    for key, feature in UNSUPPORTED_WHEN_SET.items():
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key}={config[key]!r} ({feature}) is not supported; "
                                  "only plain LoRA / rsLoRA checkpoints can be loaded")
    if config.get("bias", "none") != "none":
        raise CheckpointError(f"{config_path}: bias={config['bias']!r} is not supported; expected 'none'")
    return config


@dataclass
class PeftAdapter:
    """A PEFT LoRA adapter read from disk, in the terms of ``LoraModel``."""

    lora_kwargs: dict[str, Any]             # LoraModel keyword arguments that rebuild it
    factors: dict[str, dict[str, torch.Tensor]]  # module path -> {"A": (r, in), "B": (out, r)}
    module_tensors: dict[str, torch.Tensor]      # modules_to_save, by parameter name in the backbone
    source: str                                  # the weights file, for messages


def read_peft_adapter(path: str | os.PathLike) -> PeftAdapter:
    """Read a PEFT LoRA directory: its config checked (unsupported features raise), its tensors
    grouped per module. The targets come from the weight keys, not from ``target_modules``."""
    config = read_peft_config(path)
    weights = Path(path) / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        pickle_hint = " (only a pickled adapter_model.bin is there, which is never unpickled here)" \
            if (Path(path) / PEFT_PICKLE_NAME).is_file() else ""
        raise CheckpointError(f"{str(path)!r} holds no {PEFT_WEIGHTS_NAME}{pickle_hint}")
    raw = read_safetensors(weights)
    tensors = {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in raw.items()}
    factors: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match:
            factors.setdefault(match["path"], {})[match["which"]] = tensor
        else:
            extra[key] = tensor
    if not factors:
        raise CheckpointError(f"{weights}: no lora_A / lora_B tensors found")
    incomplete = sorted(p for p, f in factors.items() if set(f) != {"A", "B"})
    if incomplete:
        raise CheckpointError(f"{weights}: modules with only one of lora_A / lora_B: {incomplete[:10]}")

    rank_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    # Per-module ranks come from the tensors; alphas from PEFT's pattern rules.
    # Exact paths throughout: a module whose name is the tail of another's (``lin0``, ``block.lin0``)
    # must not pull the other in.
    rank_pattern = {_exact_pattern(p): int(f["A"].shape[0]) for p, f in factors.items()
                    if f["A"].shape[0] != rank_default}
    alpha_pattern = {_exact_pattern(p): pattern_value(config.get("alpha_pattern") or {}, p, alpha_default)
                     for p in factors}
    alpha_pattern = {k: v for k, v in alpha_pattern.items() if v != alpha_default}
    unfrozen = ["deltas", *(exact_path_spec(m) for m in sorted({name.rsplit(".", 1)[0] for name in extra}))]
    kwargs = dict(lora_r=rank_default, lora_alpha=alpha_default, lora_dropout=config.get("lora_dropout", 0.0),
                  modified_modules=[exact_path_spec(p) for p in sorted(factors)], common_structure=False,
                  exclude_modules=[],
                  unfrozen_modules=unfrozen, use_rslora=bool(config.get("use_rslora", False)),
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    return PeftAdapter(kwargs, factors, extra, str(weights))

