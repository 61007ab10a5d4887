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
import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

from ..addressing import TargetNotFoundError
from ..logging_utils import get_logger, tqdm_disable
from . import config as cfg
from .common import (CLIError, auto_class, brief, dtype_from_name, from_pretrained_kwargs, load_model_config,
                     load_tokenizer, method_class, model_dir, offline, one_line)
from .run_state import (RUN_FILES, clean_stale, earlier_run, optimizer_tensors,
                        prepare_output, restore, save_checkpoint)
from .train_data import CAUSAL_LM, CLASSIFICATION, Dataset, batches, encode, read_dataset

logger = get_logger("cli.train")

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
    resume_from = prepare_output(out_dir, config.get("train.resume"), config.get("train.overwrite"),
                                 _flag_for(config, "train.output_dir"))

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
    clean_stale(out_dir)
    if config.get("train.overwrite"):
        for old in earlier_run(out_dir):
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
        step, epoch, last_loss = restore(resume_from, delta, optimizer, scheduler, trainable_names, device)
        skip = step - epoch * per_epoch
        last_saved = resume_from
        print(f"resuming from {resume_from} at step {step} (epoch {epoch})")
    log_file = (out_dir / "train_log.jsonl").open("a" if resume_from is not None else "w")
    bar = tqdm(total=total_steps, desc=f"train {config.get('method.name')}", unit="step",
               disable=tqdm_disable(config.get("train.progress")))
    started = time.perf_counter()
    try:
        while step < total_steps:
            for index in batches(len(data.texts), batch_size, seed, epoch):
                if skip:  # the data order is a function of (seed, epoch): replay it up to the resume point
                    skip -= 1
                    continue
                batch = encode(tokenizer, data, index, config.get("data.max_length"), device)
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
