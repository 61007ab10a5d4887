"""``odelta-fast train``: attach a delta to a local model directory and train it on a JSONL/CSV file.

Output directory layout::

    <out>/train_config.yaml     the resolved configuration of the run
    <out>/train_log.jsonl       one line per logged step: step, epoch, loss, lr
    <out>/checkpoint-<step>/    the delta every --save-every steps (a save_finetuned directory)
    <out>/final/                the delta after the last step

Each checkpoint directory is written under a hidden temporary name and renamed into place
only once complete, so a run interrupted at any point (Ctrl-C, kill, power loss) leaves every
``checkpoint-<step>`` it shows loadable with ``AutoDeltaModel.from_finetuned``. Besides the
delta, each holds ``training.json`` (step, loss, task, labels, model class) which ``merge``
reads to rebuild the right model head.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..addressing import TargetNotFoundError
from ..logging_utils import get_logger, tqdm_disable
from . import config as cfg
from .common import (CLIError, auto_class, brief, dtype_from_name, from_pretrained_kwargs, load_model_config,
                     load_tokenizer, located, method_class, model_dir, offline, one_line)

logger = get_logger("cli.train")

TRAINING_STATE = "training.json"
OPTIMIZER_STATE = "optimizer.safetensors"  # tensors only: resuming never unpickles
CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"
# Names under which a sequence-classification head lives; it is new, so it trains with the delta.
HEAD_SPECS = ["lm_head", "classifier", "score"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a delta (LoRA, adapter, BitFit, ...) on a JSONL/CSV dataset",
        description="Attach a delta to a local Hugging Face model directory, train it on a JSONL or CSV file "
                    "(columns text + label: sequence classification; text only: causal LM) and save it with "
                    "save_finetuned to OUT/checkpoint-<step> every --save-every steps and to OUT/final at the end. "
                    "Settings come from flags or one YAML file (--config) with dotted overrides (--set).",
        epilog="examples:\n"
               "  odelta-fast train --model ./bert --data train.jsonl --method lora --targets attn.q attn.v "
               "-p lora_r=16 --output runs/lora\n"
               "  odelta-fast train --config train.yaml --set method.lora_r=16 train.lr=1e-3\n"
               "  odelta-fast train --config train.yaml --print-config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", help="a YAML file with sections model, data, method, train")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="dotted overrides applied last, e.g. --set method.lora_r=16 train.lr=1e-3")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", metavar="DIR", help="a local Hugging Face model directory (model.path)")
    g.add_argument("--model-class", metavar="NAME",
                   help="transformers class to load, e.g. AutoModelForCausalLM (default: from the task)")
    g.add_argument("--tokenizer", metavar="DIR", help="tokenizer directory (default: the model directory)")
    g.add_argument("--dtype", choices=cfg.CHOICES["model.dtype"], help="weights dtype (default: float32)")
    g.add_argument("--data", metavar="FILE", help="a .jsonl or .csv file (data.path)")
    g.add_argument("--task", choices=cfg.CHOICES["data.task"],
                   help="auto (default): classification if the first row has a label, else causal-lm")
    g.add_argument("--text-column", metavar="NAME", help="default: text")
    g.add_argument("--label-column", metavar="NAME", help="default: label")
    g.add_argument("--max-length", type=int, metavar="N", help="truncate inputs to N tokens (default: 128)")
    g = p.add_argument_group("method")
    g.add_argument("--method", metavar="NAME", help="a delta method: lora (default), adapter, bitfit, ...")
    g.add_argument("--targets", nargs="+", metavar="SPEC",
                   help="modules to modify, by common or raw name (default: the method's defaults)")
    g.add_argument("--exclude", nargs="+", metavar="SPEC", help="modules never to modify")
    g.add_argument("--unfrozen", nargs="+", metavar="SPEC",
                   help="backbone modules trained and saved with the delta (default: the classifier head "
                        "for classification, none for causal LM)")
    g.add_argument("--backend", choices=cfg.CHOICES["method.backend"], help="op backend (default: auto)")
    g.add_argument("-p", "--param", dest="params", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="method hyper-parameters, e.g. -p lora_r=16 lora_alpha=32 (same as --set method.KEY=VALUE)")
    g = p.add_argument_group("training")
    g.add_argument("-o", "--output", "--output-dir", dest="output", metavar="DIR", help="output directory")
    g.add_argument("--epochs", type=int, metavar="N", help="passes over the data (default: 1)")
    g.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=int, metavar="N", help="default: 8")
    g.add_argument("--lr", type=float, metavar="LR", help="AdamW learning rate (default: 1e-3)")
    g.add_argument("--weight-decay", type=float, metavar="W", help="default: 0")
    g.add_argument("--warmup-steps", type=int, metavar="N", help="linear warm-up steps (default: 0)")
    g.add_argument("--seed", type=int, metavar="N", help="seed for the delta's init and the data order (default: 0)")
    g.add_argument("--save-every", type=int, metavar="N",
                   help="checkpoint every N steps, 0 = only at the end (default: 100)")
    g.add_argument("--log-every", type=int, metavar="N", help="log the mean loss every N steps (default: 10)")
    g.add_argument("--device", metavar="DEV", help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=None,
                   help="continue from the newest complete checkpoint in the output directory: the delta, "
                        "the optimizer and learning-rate schedule, and the position in the data")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=None,
                   help="start afresh in an output directory that holds an earlier run, deleting its "
                        "checkpoints (without it, such a directory is refused)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="show a progress bar (default: when stderr is a terminal and CI is unset)")
    p.set_defaults(func=run)


FLAG_KEYS = [
    ("model", "model.path", "--model"), ("model_class", "model.class", "--model-class"),
    ("tokenizer", "model.tokenizer", "--tokenizer"), ("dtype", "model.dtype", "--dtype"),
    ("data", "data.path", "--data"), ("task", "data.task", "--task"),
    ("text_column", "data.text_column", "--text-column"), ("label_column", "data.label_column", "--label-column"),
    ("max_length", "data.max_length", "--max-length"),
    ("method", "method.name", "--method"), ("targets", "method.targets", "--targets"),
    ("exclude", "method.exclude", "--exclude"), ("unfrozen", "method.unfrozen", "--unfrozen"),
    ("backend", "method.backend", "--backend"),
    ("output", "train.output_dir", "--output"), ("epochs", "train.epochs", "--epochs"),
    ("max_steps", "train.max_steps", "--max-steps"), ("batch_size", "train.batch_size", "--batch-size"),
    ("lr", "train.lr", "--lr"), ("weight_decay", "train.weight_decay", "--weight-decay"),
    ("warmup_steps", "train.warmup_steps", "--warmup-steps"), ("seed", "train.seed", "--seed"),
    ("save_every", "train.save_every", "--save-every"), ("log_every", "train.log_every", "--log-every"),
    ("device", "train.device", "--device"), ("progress", "train.progress", "--progress"),
    ("resume", "train.resume", "--resume"), ("overwrite", "train.overwrite", "--overwrite"),
]


def method_hyperparameters(name: str, where: str = "--method") -> dict[str, str]:
    """A method's own hyper-parameters (its config's fields besides the addressing ones) -> the
    kind of value each takes, from the config's declared types."""
    config_class = method_class(name, flag=where).config_class
    kinds = config_class.field_kinds()
    return {key: kinds[key] for key in config_class.hyperparameter_names()}


def resolve_config(args: argparse.Namespace) -> cfg.RunConfig:
    flags = [(key, getattr(args, attr), flag) for attr, key, flag in FLAG_KEYS]
    overrides = list(args.overrides)
    for item in args.params:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--param {item!r}: expected KEY=VALUE (e.g. --param lora_r=16)")
        overrides.append(f"method.{key}={value}")
    return cfg.resolve(args.config, flags, overrides, method_keys=method_hyperparameters)


# ---------------------------------------------------------------------- data
@dataclass
class Dataset:
    texts: list[str]
    labels: Optional[list[int]]
    task: str
    id2label: Optional[dict[int, str]] = None
    columns: tuple[str, ...] = ()  # of the first row, for messages


def _rows(path: Path):
    """``(line number, row dict)`` for every record of a .jsonl / .json-lines / .csv / .tsv file."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise CLIError(f"{path}:{number}: not valid JSON ({err.msg}); expected one JSON object per line")
                if not isinstance(row, dict):
                    raise CLIError(f"{path}:{number}: expected a JSON object such as "
                                   f'{{"text": "...", "label": 0}}, got {type(row).__name__}')
                yield number, row
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            if not reader.fieldnames:
                raise CLIError(f"{path}:1: expected a header row naming the columns (e.g. text,label)")
            # line_num after reading a row is the line the row ended on (rows may span lines).
            for row in reader:
                yield reader.line_num, {k: v for k, v in row.items() if k is not None}
    else:
        raise CLIError(f"--data {path}: unsupported file type {suffix or '(none)'!r}; expected .jsonl or .csv")


def read_dataset(path_text: Optional[str], text_column: str, label_column: str, task: str,
                 where: str = "--data") -> Dataset:
    if not path_text:
        raise CLIError("--data is required: a .jsonl or .csv file with a text column (and a label column to classify)")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise CLIError(f"{located(where, path_text)}: no such file; expected a .jsonl or .csv dataset")
    texts: list[str] = []
    raw_labels: list[tuple[int, Any]] = []
    columns: tuple[str, ...] = ()
    for number, row in _rows(path):
        columns = columns or tuple(row)
        if text_column not in row:
            found = ", ".join(repr(k) for k in row) or "no columns"
            raise CLIError(f"{path}:{number}: row has no {text_column!r} column (found {found}); "
                           f"expected a text column (set --text-column)")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise CLIError(f"{path}:{number}: {text_column!r} is {text!r}; expected a non-empty string")
        if task == "auto":
            task = CLASSIFICATION if row.get(label_column) not in (None, "") else CAUSAL_LM
        if task == CLASSIFICATION:
            label = row.get(label_column)
            if label is None or label == "":
                raise CLIError(f"{path}:{number}: row has no {label_column!r} value; every row needs a label for "
                               f"classification (set --label-column, or --task causal-lm)")
            raw_labels.append((number, label))
        texts.append(text)
    if not texts:
        raise CLIError(f"{path}: no rows; expected at least one record with a {text_column!r} column")
    if task != CLASSIFICATION:
        return Dataset(texts, None, CAUSAL_LM, columns=columns)
    labels, id2label = _encode_labels(path, label_column, raw_labels)
    return Dataset(texts, labels, CLASSIFICATION, id2label, columns=columns)


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _encode_labels(path: Path, column: str, raw: list[tuple[int, Any]]) -> tuple[list[int], dict[int, str]]:
    """Integer labels are class ids as they stand; any other label set is mapped to ids in sorted order."""
    ints = [_as_int(v) for _, v in raw]
    if all(i is not None for i in ints):
        for (number, value), i in zip(raw, ints):
            if i < 0:
                raise CLIError(f"{path}:{number}: {column!r} is {value!r}; expected a class id >= 0")
        return ints, {i: str(i) for i in range(max(ints) + 1)}
    for number, value in raw:
        if not isinstance(value, (str, int)) or isinstance(value, bool):
            raise CLIError(f"{path}:{number}: {column!r} is {value!r}; expected a class id or a class name")
    names = sorted({str(v) for _, v in raw})
    index = {name: i for i, name in enumerate(names)}
    return [index[str(v)] for _, v in raw], dict(enumerate(names))


# ---------------------------------------------------------------------- checkpoints
def optimizer_tensors(optimizer, names: list[str]) -> dict[str, Any]:
    """The optimizer's per-parameter state as named tensors (``<param>::<key>``)."""
    import torch

    tensors = {}
    for index, per_param in optimizer.state_dict()["state"].items():
        for key, value in per_param.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{names[index]}::{key}"] = tensor.detach().to("cpu").contiguous()
    return tensors


def load_optimizer_tensors(optimizer, names: list[str], tensors: dict[str, Any], device) -> None:
    state: dict[int, dict[str, Any]] = {}
    index_of = {name: i for i, name in enumerate(names)}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("::")
        if name not in index_of:
            raise CLIError(f"--resume: the checkpoint's optimizer state names {name!r}, which this run does not train")
        # Adam's step counter stays on the CPU (as torch keeps it); moments go where the parameters are.
        state.setdefault(index_of[name], {})[field] = tensor if field == "step" else tensor.to(device)
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(delta, out_dir: Path, name: str, state: dict[str, Any],
                    optimizer_state: Optional[dict[str, Any]] = None) -> Path:
    """Save the delta (and what resuming needs) to ``out_dir/name`` so that the directory appears
    only when complete."""
    from ..checkpoint import atomic_directory, save_tensors

    final = out_dir / name
    with atomic_directory(final) as tmp:
        delta.save_finetuned(str(tmp))
        if optimizer_state is not None:
            save_tensors(tmp / OPTIMIZER_STATE, optimizer_state)
        (tmp / TRAINING_STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    logger.info("saved %s", final)
    return final


def latest_checkpoint(out_dir: str | os.PathLike) -> Optional[Path]:
    """``final`` if the run finished, else the ``checkpoint-<step>`` with the highest step."""
    out = Path(out_dir)
    if (out / "final" / TRAINING_STATE).is_file():
        return out / "final"
    steps = [(int(p.name.split("-", 1)[1]), p) for p in out.glob("checkpoint-*")
             if p.name.split("-", 1)[1].isdigit() and (p / TRAINING_STATE).is_file()]
    return max(steps)[1] if steps else None


def _resume_point(out_dir: Path) -> Path:
    latest = latest_checkpoint(out_dir)
    if latest is None:
        raise CLIError(f"--resume: {out_dir} holds no complete checkpoint to resume from")
    if latest.name == "final":
        raise CLIError(f"--resume: the run in {out_dir} already finished ({latest}); nothing to resume")
    if not (latest / OPTIMIZER_STATE).is_file():
        raise CLIError(f"--resume: {latest} has no {OPTIMIZER_STATE} (written by an older version); "
                       "start a new run or load the delta with AutoDeltaModel.from_finetuned")
    return latest


def _restore(path: Path, delta, optimizer, scheduler, names: list[str], device) -> tuple[int, int, float]:
    """Load the delta, optimizer and schedule saved in ``path``; returns (step, epoch, loss)."""
    from .. import checkpoint as ckpt

    try:
        state = ckpt.read_json(path / TRAINING_STATE, "training state")
        config, tensors = ckpt.load_checkpoint(path)
        delta.load_delta_state_dict(tensors, expected_targets=config.get("targets"), source=str(path),
                                    saved_name=config.get("name"))
        optimizer_state = ckpt.read_safetensors(path / OPTIMIZER_STATE)
    except ckpt.CheckpointError as err:
        raise CLIError(f"--resume: {one_line(err)}")
    load_optimizer_tensors(optimizer, names, optimizer_state, device)
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    return state["step"], state["epoch"], state.get("loss", float("nan"))


def _clean_stale(out_dir: Path) -> None:
    for stale in list(out_dir.glob(".*.tmp-*")) + list(out_dir.glob(".*.old-*")):
        shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------- training
def _optimizer_step(optimizer, scheduler) -> None:
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _device(name: str):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name}: not a device; expected cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check_causal_lm_possible(config: cfg.RunConfig, directory: Path, data: Dataset) -> None:
    """A causal LM needs a decoder: an encoder (BERT, RoBERTa) trained on next-token labels sees
    the tokens it predicts, so its loss falls to nothing while it learns nothing."""
    if data.task != CAUSAL_LM or config.get("model.class"):
        return
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    model_config = load_model_config(directory)
    encoder_only = (model_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
                    and not getattr(model_config, "is_encoder_decoder", False)
                    and not getattr(model_config, "is_decoder", False))
    if not encoder_only:
        return
    label = config.get("data.label_column")
    found = ", ".join(repr(c) for c in data.columns) or "no columns"
    chosen = "--task causal-lm was given" if config.get("data.task") == CAUSAL_LM else \
        f"the data has no {label!r} column (found {found}), so the task became causal-lm"
    raise CLIError(f"{config.get('data.path')}: {chosen}, but {type(model_config).__name__} is an encoder-only "
                   "model, which cannot train as a causal LM; for classification name the label column with "
                   "--label-column (and --task classification), or train a decoder model")


RUN_FILES = ("train_config.yaml", "train_log.jsonl")


def _earlier_run(out_dir: Path) -> list[Path]:
    """What an earlier run left in ``out_dir``."""
    if not out_dir.is_dir():
        return []
    found = sorted(out_dir.glob("checkpoint-*")) + [out_dir / n for n in ("final", *RUN_FILES) if (out_dir / n).exists()]
    return found


def _prepare_output(config: cfg.RunConfig, out_dir: Path) -> Optional[Path]:
    """Check the output directory against --resume / --overwrite before anything is written;
    returns the checkpoint to resume from."""
    resume, overwrite = config.get("train.resume"), config.get("train.overwrite")
    if resume and overwrite:
        raise CLIError("--resume and --overwrite contradict each other: resume continues the run in the output "
                       "directory, overwrite deletes it")
    if out_dir.exists() and not out_dir.is_dir():
        raise CLIError(f"{_flag_for(config, 'train.output_dir')} {out_dir}: is a file; expected a directory")
    earlier = _earlier_run(out_dir)
    if resume:
        return _resume_point(out_dir)
    if earlier and not overwrite:
        names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise CLIError(f"{_flag_for(config, 'train.output_dir')} {out_dir}: holds an earlier run ({names}); pass "
                       "--resume to continue it, --overwrite to replace it, or choose another output directory")
    return None


def _load_model(config: cfg.RunConfig, directory: Path, data: Dataset, tokenizer):
    class_name = config.get("model.class") or (
        "AutoModelForSequenceClassification" if data.task == CLASSIFICATION else "AutoModelForCausalLM")
    cls = auto_class(class_name)
    kwargs = from_pretrained_kwargs(dtype_from_name(config.get("model.dtype"), flag="model.dtype"))
    if data.task == CLASSIFICATION:
        base_config = load_model_config(directory)
        kwargs.update(num_labels=len(data.id2label), id2label=data.id2label,
                      label2id={v: k for k, v in data.id2label.items()})
        # A directory saved with another label count has a head of the wrong shape; it is new anyway.
        kwargs["ignore_mismatched_sizes"] = getattr(base_config, "num_labels", None) != len(data.id2label)
    try:
        model = cls.from_pretrained(str(directory), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(f"--model {directory}: cannot load it as {class_name} ({brief(err)}); "
                       "pass --model-class (e.g. AutoModelForSeq2SeqLM) for other architectures")
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        # Decoder classifiers find each row's last token through pad_token_id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, class_name


def _attach(config: cfg.RunConfig, model, task: str):
    cls = method_class(config.get("method.name"), flag=_flag_for(config, "method.name"))
    kwargs = dict(config.method_params())
    if config.get("method.targets") is not None:
        kwargs["modified_modules"] = config.get("method.targets")
    if config.get("method.exclude") is not None:
        kwargs["exclude_modules"] = config.get("method.exclude")
    kwargs["backend"] = config.get("method.backend") or "auto"
    try:
        delta = cls(model, **kwargs)
    except TargetNotFoundError as err:
        where = _flag_for(config, "method.targets" if config.get("method.targets") else "method.name")
        raise CLIError(f"{where}: {one_line(err)}")
    except (ValueError, TypeError) as err:
        raise CLIError(f"method {config.get('method.name')!r}: {one_line(err)}")
    unfrozen = config.get("method.unfrozen")
    if unfrozen is None:
        unfrozen = ["deltas"] + (HEAD_SPECS if task == CLASSIFICATION else [])
    elif "deltas" not in unfrozen:
        unfrozen = ["deltas"] + list(unfrozen)
    delta.freeze_module(exclude=unfrozen, set_state_dict=False)
    return delta


def _flag_for(config: cfg.RunConfig, key: str) -> str:
    source = config.sources.get(key)
    if source:
        return source
    return {"method.targets": "--targets", "method.name": "--method", "model.path": "--model",
            "data.path": "--data"}.get(key, key)


def _batches(n: int, batch_size: int, seed: int, epoch: int):
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _encode(tokenizer, data: Dataset, index: list[int], max_length: int, device):
    import torch

    enc = tokenizer([data.texts[i] for i in index], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    batch = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    if data.task == CLASSIFICATION:
        batch["labels"] = torch.tensor([data.labels[i] for i in index], device=device)
    else:
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        batch["labels"] = labels
    return batch


def _check_positive(config: cfg.RunConfig, key: str, allow_zero: bool = False) -> None:
    value = config.get(key)
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        expected = "a non-negative" if allow_zero else "a positive"
        raise CLIError(f"{_flag_for(config, key)}: {key} = {value}; expected {expected} number")


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.print_config:
        print(cfg.dump(config), end="")
        return 0
    return train(config)


def train(config: cfg.RunConfig) -> int:
    import torch

    offline()
    for key in ("train.batch_size", "train.epochs", "train.max_steps", "data.max_length", "train.log_every"):
        _check_positive(config, key)
    for key in ("train.save_every", "train.warmup_steps"):
        _check_positive(config, key, allow_zero=True)
    if not config.get("train.output_dir"):
        raise CLIError("--output is required: the directory for checkpoints (or train.output_dir in --config)")
    directory = model_dir(config.get("model.path"), flag=_flag_for(config, "model.path"))
    method_class(config.get("method.name"), flag=_flag_for(config, "method.name"))
    task = config.get("data.task")
    data = read_dataset(config.get("data.path"), config.get("data.text_column"), config.get("data.label_column"),
                        task, where=_flag_for(config, "data.path"))
    if data.task == CLASSIFICATION and len(data.id2label) < 2:
        raise CLIError(f"{config.get('data.path')}: every row has the label {data.id2label[0]!r}; classification "
                       "needs at least two classes")
    _check_causal_lm_possible(config, directory, data)
    device = _device(config.get("train.device"))
    out_dir = Path(config.get("train.output_dir")).expanduser()
    resume_from = _prepare_output(config, out_dir)

    tokenizer = load_tokenizer(directory, config.get("model.tokenizer"))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"--model {directory}: the tokenizer has neither a pad nor an eos token; batching needs one")
        tokenizer.pad_token = tokenizer.eos_token
    seed = config.get("train.seed")
    torch.manual_seed(seed)
    model, class_name = _load_model(config, directory, data, tokenizer)
    model.to(device)
    torch.manual_seed(seed)  # the delta's init depends on the seed only, not on what loading consumed
    delta = _attach(config, model, data.task)
    model.train()

    # Everything that can be checked is checked: only now does the run write anything.
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    _clean_stale(out_dir)
    if config.get("train.overwrite"):
        for old in _earlier_run(out_dir):
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    if resume_from is None:
        (out_dir / "train_config.yaml").write_text(cfg.dump(config))
    try:
        return _train_loop(config, out_dir, model, delta, data, tokenizer, class_name, directory, device, seed,
                           resume_from)
    except BaseException:
        if resume_from is None and not any(out_dir.glob("checkpoint-*")):
            # Nothing resumable was written: leave no trace of the run.
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
            if created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        raise


def _train_loop(config: cfg.RunConfig, out_dir: Path, model, delta, data: Dataset, tokenizer, class_name: str,
                directory: Path, device, seed: int, resume_from: Optional[Path]) -> int:
    import torch
    from tqdm.auto import tqdm

    trainable = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    print(f"{type(delta).__name__} on {len(delta.slots)} modules of {type(model).__name__} ({data.task}, "
          f"{len(data.texts)} rows)")
    # PEFT's wording, so scripts that parse print_trainable_parameters() read ours too.
    print(f"trainable params: {n_trainable:,d} || all params: {total:,d} || "
          f"trainable%: {100 * n_trainable / total:.4f}")

    batch_size = config.get("train.batch_size")
    per_epoch = math.ceil(len(data.texts) / batch_size)
    total_steps = config.get("train.max_steps") or per_epoch * config.get("train.epochs")
    optimizer = torch.optim.AdamW(trainable, lr=config.get("train.lr"), weight_decay=config.get("train.weight_decay"))
    warmup = config.get("train.warmup_steps")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    save_every, log_every = config.get("train.save_every"), config.get("train.log_every")
    max_grad_norm = config.get("train.max_grad_norm")
    state_base = {
        "task": data.task, "model": str(directory.resolve()), "model_class": class_name,
        "method": config.get("method.name"), "total_steps": total_steps,
        "num_labels": len(data.id2label) if data.id2label else None,
        "id2label": {str(k): v for k, v in data.id2label.items()} if data.id2label else None,
    }

    trainable_names = [n for n, p in model.named_parameters() if p.requires_grad]
    step, epoch, window, last_loss, last_saved = 0, 0, [], float("nan"), None
    skip = 0  # batches of the current epoch already trained before a resume
    if resume_from is not None:
        step, epoch, last_loss = _restore(resume_from, delta, optimizer, scheduler, trainable_names, device)
        skip = step - epoch * per_epoch
        last_saved = resume_from
        print(f"resuming from {resume_from} at step {step} (epoch {epoch})")
    log_file = (out_dir / "train_log.jsonl").open("a" if resume_from is not None else "w")
    bar = tqdm(total=total_steps, desc=f"train {config.get('method.name')}", unit="step",
               disable=tqdm_disable(config.get("train.progress")))
    started = time.perf_counter()
    try:
        while step < total_steps:
            for index in _batches(len(data.texts), batch_size, seed, epoch):
                if skip:  # the data order is a function of (seed, epoch): replay it up to the resume point
                    skip -= 1
                    continue
                batch = _encode(tokenizer, data, index, config.get("data.max_length"), device)
                loss = model(**batch).loss
                loss.backward()
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
                _optimizer_step(optimizer, scheduler)
                step += 1
                window.append(loss.item())
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    last_loss = sum(window) / len(window)
                    window.clear()
                    lr = scheduler.get_last_lr()[0]
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                    logger.info("step %d/%d epoch %d loss %.4f lr %.2e", step, total_steps, epoch, last_loss, lr)
                    log_file.write(json.dumps({"step": step, "epoch": epoch, "loss": last_loss, "lr": lr}) + "\n")
                    log_file.flush()
                if save_every and step % save_every == 0 and step < total_steps:
                    last_saved = save_checkpoint(
                        delta, out_dir, f"checkpoint-{step}",
                        dict(state_base, step=step, epoch=epoch, loss=last_loss, scheduler=scheduler.state_dict()),
                        optimizer_tensors(optimizer, trainable_names))
                if step >= total_steps:
                    break
            else:
                epoch += 1
        bar.close()
        final = save_checkpoint(delta, out_dir, "final", dict(state_base, step=step, epoch=epoch, loss=last_loss))
    except KeyboardInterrupt:
        bar.close()
        where = f"; the last complete checkpoint is {last_saved}" if last_saved else "; no checkpoint was completed"
        logger.warning("interrupted at step %d%s", step, where)
        raise
    finally:
        log_file.close()
    print(f"trained {step} steps in {time.perf_counter() - started:.1f} s, final loss {last_loss:.4f}; "
          f"saved the delta to {final}")
    return 0
