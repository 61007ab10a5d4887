"""Run configuration for ``odelta-fast train``: one YAML file, flags, and dotted ``--set`` overrides.

The configuration is a two-level mapping (``section.key``). Each value remembers where it came
from (``train.yaml:7``, ``--lr``, ``--set train.lr=...``) so that a bad value is reported
against the place the user can fix. Precedence: defaults < YAML file < flags < ``--set``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .common import CLIError

# section -> key -> (type, default). "list" values are lists of strings.
SCHEMA: dict[str, dict[str, tuple[str, Any]]] = {
    "model": {
        "path": ("str", None),
        "class": ("str", None),
        "tokenizer": ("str", None),
        "dtype": ("str", "float32"),
    },
    "data": {
        "path": ("str", None),
        "task": ("str", "auto"),
        "text_column": ("str", "text"),
        "label_column": ("str", "label"),
        "max_length": ("int", 128),
    },
    "method": {
        "name": ("str", "lora"),
        "targets": ("list", None),
        "exclude": ("list", None),
        "unfrozen": ("list", None),
        "backend": ("str", "auto"),
        # Any other method.<key> is a hyper-parameter of the method's constructor (lora_r, ...).
    },
    "train": {
        "output_dir": ("str", None),
        "epochs": ("int", 1),
        "max_steps": ("int", None),
        "batch_size": ("int", 8),
        "lr": ("float", 1e-3),
        "weight_decay": ("float", 0.0),
        "warmup_steps": ("int", 0),
        "max_grad_norm": ("float", 1.0),
        "seed": ("int", 0),
        "save_every": ("int", 100),
        "log_every": ("int", 10),
        "device": ("str", "auto"),
        "progress": ("bool", None),
        "resume": ("bool", False),
        "overwrite": ("bool", False),
    },
}
# "model: ./dir" stands for "model: {path: ./dir}"; likewise data and method.
SHORTHAND = {"model": "path", "data": "path", "method": "name"}
CHOICES = {
    "data.task": ("auto", "classification", "causal-lm"),
    "method.backend": ("auto", "eager", "triton", "cuda"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
}


@dataclass
class RunConfig:
    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values.get(key)

    def source(self, key: str) -> str:
        return self.sources.get(key, f"the default of {key}")

    def method_params(self) -> dict[str, Any]:
        fixed = SCHEMA["method"]
        return {k.split(".", 1)[1]: v for k, v in self.values.items()
                if k.startswith("method.") and k.split(".", 1)[1] not in fixed}

    def nested(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {section: {} for section in SCHEMA}
        for key, value in self.values.items():
            section, name = key.split(".", 1)
            out[section][name] = value
        return out


def defaults() -> RunConfig:
    config = RunConfig()
    for section, keys in SCHEMA.items():
        for key, (_, default) in keys.items():
            config.values[f"{section}.{key}"] = default
    return config


def _known_keys() -> list[str]:
    return [f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys] + ["method.<hyper-parameter>"]


def check_key(key: str, where: str) -> None:
    section, _, name = key.partition(".")
    if section not in SCHEMA or not name or "." in name:
        raise CLIError(f"{where}: unknown key {key!r}; expected one of {', '.join(_known_keys())}")
    if section != "method" and name not in SCHEMA[section]:
        raise CLIError(f"{where}: unknown key {key!r}; {section} takes {', '.join(SCHEMA[section])}")


def coerce(key: str, value: Any, where: str, kind: Optional[str] = None) -> Any:
    """``value`` as the schema's type for ``key`` (YAML reads ``1e-3`` as a string, so
    numbers are converted here rather than trusted to the parser)."""
    section, _, name = key.partition(".")
    kind = kind or SCHEMA.get(section, {}).get(name, ("any", None))[0]
    if value is None:
        return None
    try:
        if kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if kind == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "yes", "on", "1"):
                return True
            if text in ("false", "no", "off", "0"):
                return False
            raise ValueError
        if kind == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if kind == "list":
            if isinstance(value, str):
                return [v for v in value.replace(",", " ").split() if v]
            if isinstance(value, (list, tuple)) and all(isinstance(v, (str, int)) for v in value):
                return [str(v) for v in value]
            raise ValueError
        if kind == "dict":
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
                    "list": "a list of names", "dict": 'a JSON object such as {"q_proj": 4}'}[kind]
        raise CLIError(f"{where}: {key} = {value!r} is not {expected}")
    return value


def check_choice(key: str, value: Any, where: str) -> None:
    allowed = CHOICES.get(key)
    if allowed and value is not None and value not in allowed:
        raise CLIError(f"{where}: {key} = {value!r}; expected one of {', '.join(allowed)}")


def set_value(config: RunConfig, key: str, value: Any, where: str) -> None:
    check_key(key, where)
    value = coerce(key, value, where)
    check_choice(key, value, where)
    config.values[key] = value
    config.sources[key] = where


# ---------------------------------------------------------------------- YAML with line numbers
def load_yaml(path: str) -> list[tuple[str, Any, int]]:
    """``(dotted key, value, line)`` for every setting in a YAML config file."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"--config {path}: no such file; expected a YAML config file")
    text = file.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise CLIError(f"{where}: invalid YAML ({problem})")
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise CLIError(f"{path}:{root.start_mark.line + 1}: expected a mapping of sections "
                       f"({', '.join(SCHEMA)}), got {root.tag.rsplit(':', 1)[-1]}")
    constructor = yaml.SafeLoader(text)

    def value_of(node):
        return constructor.construct_object(node, deep=True)

    out: list[tuple[str, Any, int]] = []
    for key_node, value_node in root.value:
        section = str(value_of(key_node))
        line = key_node.start_mark.line + 1
        if section not in SCHEMA:
            raise CLIError(f"{path}:{line}: unknown section {section!r}; expected one of {', '.join(SCHEMA)}")
        if isinstance(value_node, yaml.MappingNode):
            for sub_key, sub_value in value_node.value:
                out.append((f"{section}.{value_of(sub_key)}", value_of(sub_value), sub_key.start_mark.line + 1))
        elif isinstance(value_node, yaml.ScalarNode) and section in SHORTHAND:
            out.append((f"{section}.{SHORTHAND[section]}", value_of(value_node), line))
        elif isinstance(value_node, yaml.ScalarNode) and value_of(value_node) is None:
            continue
        else:
            raise CLIError(f"{path}:{line}: section {section!r} must be a mapping of keys "
                           f"({', '.join(SCHEMA[section])})")
    return out


def parse_assignment(text: str, flag: str = "--set") -> tuple[str, Any]:
    import yaml

    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise CLIError(f"{flag} {text!r}: expected KEY=VALUE (e.g. {flag} train.lr=1e-3)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def resolve(config_file: Optional[str], flags: list[tuple[str, Any, str]], overrides: list[str],
            method_keys: Optional[Callable[[str, str], dict[str, str]]] = None) -> RunConfig:
    """Defaults, then the YAML file, then flags ``(key, value, flag name)``, then ``--set``.

    ``method_keys(name, where)`` maps a method's hyper-parameters to types (``where`` is the
    place the method was named, for its error); unknown ones are an error naming the place
    they were set."""
    config = defaults()
    if config_file:
        for key, value, line in load_yaml(config_file):
            set_value(config, key, value, f"{config_file}:{line}")
    for key, value, flag in flags:
        if value is not None:
            set_value(config, key, value, flag)
    for item in overrides:
        key, value = parse_assignment(item)
        set_value(config, key, value, f"--set {item}")
    if method_keys is not None:
        accepted = method_keys(config.get("method.name"), config.sources.get("method.name", "--method"))
        for name, value in list(config.method_params().items()):
            key = f"method.{name}"
            if name not in accepted:
                hint = ", ".join(sorted(accepted)) or "none"
                raise CLIError(f"{config.source(key)}: method {config.get('method.name')!r} has no hyper-parameter "
                               f"{name!r}; it takes {hint}")
            config.values[key] = coerce(key, value, config.source(key), accepted[name])
    return config


def dump(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.nested(), sort_keys=False, default_flow_style=False)
