"""PEFT's LoRA checkpoint format, both ways.

PEFT writes ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.lora_A.weight`` ``(r, in)`` / ``lora_B.weight`` ``(out, r)``,
and modules it trains in full (``modules_to_save``) under their own keys. Shapes are the same for
Linear and GPT-2 ``Conv1D`` targets (``fan_in_fan_out`` only changes how merges transpose), so a
LoRA delta maps onto the format one to one.

Loading takes the target modules from the weight keys, not from ``target_modules``: the keys
say exactly which modules carry LoRA, whatever matching rule wrote them.

A PEFT ``LoraConfig`` (the object or its dict) translates into ``LoraModel`` arguments with
``lora_kwargs_from_peft_config``: the modules it selects are found by PEFT's own rules (a str
``target_modules`` / ``exclude_modules`` is ``re.fullmatch``-ed against the whole module name, a
list entry matches the name or its dotted tail, ``layers_to_transform`` / ``layers_pattern`` keep
the layers whose first index fits, ``"all-linear"`` is every Linear / Conv1D but the output layer,
``modules_to_save`` and their insides are never adapted, ``None`` is PEFT's default for the model
type) and handed to ``LoraModel`` as anchored exact paths.
"""
from __future__ import annotations

import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .addressing import TargetNotFoundError, backbone_modules, pattern_value
from .projections import linear_types
from .checkpoint import CheckpointError, atomic_write, read_json, read_safetensors, save_tensors

logger = logging.getLogger("odelta_fast")

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# Linear / Conv1D / convolutions: lora_A.weight, lora_B.weight; embeddings: lora_embedding_A / _B
# (no .weight); DoRA: lora_magnitude_vector (".weight" in some PEFT releases).
LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?:(?P<which>[AB])\.weight|embedding_(?P<embedding>[AB])"
                      r"|(?P<magnitude>magnitude_vector)(?:\.weight)?)$")

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
UNSUPPORTED_WHEN_SET = {"lora_bias": "LoRA bias terms", "use_qalora": "QALoRA",
                        "layer_replication": "layer replication",
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


def peft_keys(lora_delta) -> dict[str, torch.Tensor]:
    """A LoRA delta module's tensors under PEFT's key suffixes (each delta class names its own:
    ``peft_factor_names``)."""
    name_a, name_b = lora_delta.peft_factor_names
    keys = {name_a: lora_delta.lora_A, name_b: lora_delta.lora_B}
    magnitude = getattr(lora_delta, "lora_magnitude_vector", None)
    if magnitude is not None:
        # PEFT keeps a convolution's magnitude as (1, out, 1[, 1]); ours is a vector everywhere.
        keys["lora_magnitude_vector"] = magnitude.view(getattr(lora_delta, "peft_magnitude_shape", (-1,)))
    return keys


def exact_path_spec(path: str) -> str:
    """The addressing spec that selects the module at ``path`` and nothing else."""
    return ANCHORED + re.escape(path)


def exact_path_pattern(path: str) -> str:
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
    target_parameters: list[str] = []
    layout_version = _installed_version("peft")
    for slot in delta.slots:
        entries = getattr(slot.delta, "peft_entries", None)
        if entries is not None:
            # LoRA on parameters (MoE expert stacks): PEFT's target_parameters layout, as the
            # installed PEFT writes it (the layout changed in PEFT 0.19; peft_version says which).
            found = entries(slot.target, slot.path, layout_version)
            tensors.update({PREFIX + key: value for key, value in found.tensors.items()})
            target_parameters += found.parameters
            rank_pattern.update({re.escape(k): v for k, v in found.ranks.items() if v != delta.lora_r})
            alpha_pattern.update({re.escape(k): v for k, v in found.alphas.items() if v != delta.lora_alpha})
            continue
        for key, tensor in peft_keys(slot.delta).items():
            tensors[f"{PREFIX}{slot.path}.{key}"] = tensor
        # Anchored full paths: PEFT matches patterns against the end of the module name.
        if slot.delta.r != delta.lora_r:
            rank_pattern[exact_path_pattern(slot.path)] = slot.delta.r
        if slot.delta.alpha != delta.lora_alpha:
            alpha_pattern[exact_path_pattern(slot.path)] = slot.delta.alpha
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
        "target_modules": _peft_target_modules(
            backbone, [slot.path for slot in delta.slots if not hasattr(slot.delta, "peft_entries")]),
        "fan_in_fan_out": any(getattr(slot.delta, "fan_in_fan_out", False) for slot in delta.slots),
        "bias": "none",
        "use_rslora": delta.use_rslora,
        "modules_to_save": modules_to_save or None,
        "init_lora_weights": True,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "use_dora": bool(delta.use_dora),
    }
    if target_parameters:
        # Without PEFT installed the layout written is the current one, first written by 0.19.1.
        config.update(target_parameters=target_parameters, peft_version=layout_version or "0.19.1")
    cpu = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_tensors(directory / PEFT_WEIGHTS_NAME, cpu, metadata={"format": "pt"})
    text = json.dumps(config, indent=2, sort_keys=True) + "\n"
    atomic_write(directory / PEFT_CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return str(directory)


def _installed_version(package: str):
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


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
    factors: dict[str, dict[str, torch.Tensor]]  # module path -> {"A", "B"[, "magnitude"]}
    module_tensors: dict[str, torch.Tensor]      # modules_to_save, by parameter name in the backbone
    source: str                                  # the weights file, for messages
    config: dict[str, Any] = field(default_factory=dict)  # adapter_config.json as read
    # Base weights of targeted modules (PEFT's save_embedding_layers copy of an embedding it
    # adapted), by parameter name: loaded into the backbone, but not modules to train or save.
    base_tensors: dict[str, torch.Tensor] = field(default_factory=dict)


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
    base: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if match:
            which = match["which"] or match["embedding"] or "magnitude"
            factors.setdefault(match["path"], {})[which] = tensor.reshape(-1) if which == "magnitude" else tensor
        elif ".base_layer." in key:
            # PEFT saves a targeted embedding's own weight under its wrapper's name (save_embedding_layers).
            base[key.replace(".base_layer.", ".")] = tensor
        else:
            extra[key] = tensor
    if not factors:
        raise CheckpointError(f"{weights}: no lora_A / lora_B tensors found")
    incomplete = sorted(p for p, f in factors.items() if not {"A", "B"} <= set(f))
    if incomplete:
        raise CheckpointError(f"{weights}: modules with only one of lora_A / lora_B: {incomplete[:10]}")
    dora = bool(config.get("use_dora"))
    undecided = sorted(p for p, f in factors.items() if ("magnitude" in f) != dora)
    if undecided:
        raise CheckpointError(f"{weights}: use_dora={dora} in {PEFT_CONFIG_NAME}, but modules "
                              f"{'lack' if dora else 'carry'} a lora_magnitude_vector: {undecided[:10]}")

    rank_default = int(config.get("r", 8))
    alpha_default = config.get("lora_alpha", 8)
    # Per-module ranks come from the tensors; alphas from PEFT's pattern rules.
    # Exact paths throughout: a module whose name is the tail of another's (``lin0``, ``block.lin0``)
    # must not pull the other in.
    rank_pattern = {exact_path_pattern(p): int(f["A"].shape[0]) for p, f in factors.items()
                    if f["A"].shape[0] != rank_default}
    alpha_pattern = {exact_path_pattern(p): pattern_value(config.get("alpha_pattern") or {}, p, alpha_default)
                     for p in factors}
    alpha_pattern = {k: v for k, v in alpha_pattern.items() if v != alpha_default}
    unfrozen = ["deltas", *(exact_path_spec(m) for m in sorted({name.rsplit(".", 1)[0] for name in extra}))]
    kwargs = dict(lora_r=rank_default, lora_alpha=alpha_default, lora_dropout=config.get("lora_dropout", 0.0),
                  modified_modules=[exact_path_spec(p) for p in sorted(factors)], common_structure=False,
                  exclude_modules=[],
                  unfrozen_modules=unfrozen, use_rslora=bool(config.get("use_rslora", False)),
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, use_dora=dora)
    return PeftAdapter(kwargs, factors, extra, str(weights), config, base)


# ---------------------------------------------------------------------- PEFT LoraConfig -> LoraModel
# PEFT's default ``target_modules`` per ``config.model_type`` (its
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), for the architectures mapped here.
PEFT_DEFAULT_TARGETS = {
    "bert": ["query", "value"], "roberta": ["query", "value"], "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"], "deberta-v2": ["query_proj", "value_proj"], "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"], "gpt_neo": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "opt": ["q_proj", "v_proj"], "bloom": ["query_key_value"],
    "falcon": ["query_key_value"], "mpt": ["Wqkv"], "llama": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"], "qwen3": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"],
}
# PEFT's own initialisations that a fresh LoraModel reproduces (the others fit the factors to the
# weights or data: PiSSA, OLoRA, LoftQ, EVA, CorDA, ...).
PEFT_INITS = (True, False, "gaussian")
_SEQ_CLS_HEADS = ("score", "classifier")  # PEFT's SEQ_CLS_HEAD_NAMES, in its order


def peft_config_dict(config: Any) -> dict[str, Any]:
    """A PEFT ``LoraConfig`` (or its dict, e.g. a read ``adapter_config.json``) as a checked plain
    dict: another PEFT method, a LoRA variant that changes the math, a bias mode or an
    initialisation a fresh ``LoraModel`` cannot reproduce raise ``ValueError`` naming it, and so
    do the combinations PEFT's own ``LoraConfig`` refuses."""
    if hasattr(config, "to_dict"):
        values = dict(config.to_dict())
    elif isinstance(config, Mapping):
        values = dict(config)
    else:
        raise TypeError(f"expected a PEFT LoraConfig or a dict of one, got {type(config).__name__}")
    peft_type = values.get("peft_type") or "LORA"
    peft_type = getattr(peft_type, "value", peft_type)
    if peft_type != "LORA":
        raise ValueError(f"peft_type {peft_type!r} is not a LoRA config; only PEFT LoRA configs translate to LoraModel")
    for key, feature in UNSUPPORTED_WHEN_SET.items():
        if values.get(key):
            raise ValueError(f"PEFT LoraConfig {key}={values[key]!r} ({feature}) is not supported by LoraModel; "
                             "only plain LoRA / rsLoRA")
    if values.get("bias", "none") != "none":
        raise ValueError(f"PEFT LoraConfig bias={values['bias']!r} is not supported; expected 'none' (train biases "
                         "with BitFitModel or unfrozen_modules)")
    init = values.get("init_lora_weights", True)
    if init not in PEFT_INITS:
        raise ValueError(f"PEFT LoraConfig init_lora_weights={init!r} is not supported; expected one of {PEFT_INITS}")
    targets = values.get("target_modules")
    if isinstance(targets, str) and (values.get("layers_to_transform") is not None
                                     or values.get("layers_pattern") is not None):
        raise ValueError("PEFT LoraConfig: layers_to_transform / layers_pattern cannot be used when target_modules "
                         "is a str (a regular expression over whole module names)")
    if values.get("layers_pattern") and values.get("layers_to_transform") is None:
        raise ValueError("PEFT LoraConfig: layers_pattern needs layers_to_transform")
    return values


def _layer_index(key: str, layers_pattern) -> Optional[int]:
    """The layer index PEFT reads from ``key``: the first ``<pattern>.<digits>.`` run (any segment
    before digits when no pattern is given; the first pattern of a list that occurs wins)."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match["idx"]) if match else None


def _peft_match(key: str, values: dict, targets) -> Optional[bool]:
    """PEFT's ``check_target_module_exists`` for one module name: None when excluded (by
    ``exclude_modules`` or as a module to save, or inside one), else whether it is a target."""
    excluded = values.get("exclude_modules")
    if excluded:
        if isinstance(excluded, str):
            if re.fullmatch(excluded, key):
                return None
        elif key in excluded or any(key.endswith(f".{name}") for name in excluded):
            return None
    if any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in values.get("modules_to_save") or ()):
        return None
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    if key in targets:
        return True
    if not any(key.endswith(f".{name}") for name in targets):
        return False
    layers = values.get("layers_to_transform")
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    index = _layer_index(key, values.get("layers_pattern"))
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def _all_linear(model: nn.Module, values: dict) -> set[str]:
    """PEFT's ``"all-linear"``: every Linear / Conv1D but a transformers model's output layer (and,
    for a SEQ_CLS task, its classifier head)."""
    names = {path for path, module in model.named_modules() if isinstance(module, linear_types())}
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        head = model.get_output_embeddings()
        if head is None and values.get("task_type") == "SEQ_CLS":
            head = next((getattr(model, n) for n in _SEQ_CLS_HEADS if getattr(model, n, None) is not None), None)
        names -= {path for path, module in model.named_modules() if head is not None and module is head}
    return names


def peft_target_paths(model: nn.Module, config: Any, module_types: Optional[tuple[type, ...]] = None) -> list[str]:
    """The paths of the modules PEFT's LoRA adapts in ``model`` under ``config`` (by PEFT's rules,
    see the module docstring), in ``named_modules`` order. Raises ``TargetNotFoundError`` where
    PEFT raises (nothing matches, everything matched is excluded) and ``ValueError`` when a selected
    module is none of ``module_types`` (default: Linear / Conv1D), the modules LoRA can modify."""
    values = peft_config_dict(config)
    targets = values.get("target_modules")
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in PEFT_DEFAULT_TARGETS:
            raise ValueError(f"PEFT has no default target_modules for {type(model).__name__} (model type "
                             f"{model_type!r}); pass target_modules")
        targets = PEFT_DEFAULT_TARGETS[model_type]
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        targets = _all_linear(model, values)
    if not isinstance(targets, str):
        targets = set(targets)
    selected, excluded = [], []
    for path, module in model.named_modules():
        if not path:
            continue
        found = _peft_match(path, values, targets)
        if found is None:
            excluded.append(path)
        elif found:
            selected.append((path, module))
    if not selected:
        shown = targets if isinstance(targets, str) else sorted(targets)
        if excluded and any(_peft_match(p, {**values, "exclude_modules": None, "modules_to_save": None}, targets)
                            for p in excluded):
            raise TargetNotFoundError(
                f"PEFT target_modules={shown!r} select only modules that exclude_modules / modules_to_save take out "
                f"({', '.join(excluded[:5])}); nothing is left to adapt")
        raise TargetNotFoundError(f"PEFT target_modules={shown!r} select no module of {type(model).__name__}"
                                  + (f" (layers_to_transform={values['layers_to_transform']!r}, layers_pattern="
                                     f"{values.get('layers_pattern')!r})" if values.get("layers_to_transform")
                                     is not None else ""))
    module_types = module_types or linear_types()
    others = [f"{path} ({type(module).__name__})" for path, module in selected if not isinstance(module, module_types)]
    if others:
        raise ValueError(f"PEFT target_modules select {', '.join(others[:5])}: LoraModel modifies "
                         f"{', '.join(sorted({t.__name__ for t in module_types}))} modules only")
    if values.get("exclude_modules") and not any(
            _peft_match(p, {**values, "modules_to_save": None}, targets) is None for p in excluded):
        warnings.warn(f"PEFT exclude_modules={values['exclude_modules']!r} excluded no module", UserWarning,
                      stacklevel=2)
    return [path for path, _ in selected]


def peft_modules_to_save_paths(model: nn.Module, config: Any) -> list[str]:
    """The modules PEFT trains in full: ``modules_to_save`` (plus the head of a SEQ_CLS / TOKEN_CLS /
    QUESTION_ANS task), matched as PEFT does (the name ends with the entry), outermost only."""
    values = peft_config_dict(config)
    names = list(values.get("modules_to_save") or [])
    names += [h for h in _TASK_HEADS.get(getattr(values.get("task_type"), "value", values.get("task_type")), ())
              if h not in names]
    found: list[str] = []
    for path, _ in model.named_modules(remove_duplicate=False):
        if path and any(path.endswith(name) for name in names) and not any(path.startswith(f + ".") for f in found):
            found.append(path)
    return found


def lora_kwargs_from_peft_config(model: nn.Module, config: Any,
                                 module_types: Optional[tuple[type, ...]] = None) -> dict[str, Any]:
    """``LoraModel`` keyword arguments that adapt what PEFT's LoRA would adapt under ``config``,
    with PEFT's rank, alpha, dropout, rsLoRA, DoRA, rank / alpha patterns, modules to save and
    parameter targets (``target_parameters``; with ``target_modules=[]`` only those)."""
    values = peft_config_dict(config)
    to_save = peft_modules_to_save_paths(model, values)
    parameters = values.get("target_parameters") or None
    only_parameters = parameters and values.get("target_modules") in (None, [], ())
    paths = [] if only_parameters else peft_target_paths(model, values, module_types)
    return dict(
        lora_r=int(values.get("r", 8)), lora_alpha=values.get("lora_alpha", 8),
        lora_dropout=values.get("lora_dropout", 0.0), use_rslora=bool(values.get("use_rslora", False)),
        use_dora=bool(values.get("use_dora", False)), target_parameters=parameters,
        rank_pattern=dict(values.get("rank_pattern") or {}), alpha_pattern=dict(values.get("alpha_pattern") or {}),
        modified_modules=[exact_path_spec(p) for p in paths], common_structure=False,
        exclude_modules=[], unfrozen_modules=["deltas", *(exact_path_spec(p) for p in to_save)],
    )
