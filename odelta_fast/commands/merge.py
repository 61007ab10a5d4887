"""``odelta-fast merge``: fold a delta checkpoint into its base model and write a plain HF model directory.

Peak memory stays near the loaded model plus one layer:

* the delta is merged in place, one target module at a time, and each module's delta is
  detached right after (no backup of the original weights is kept: the base directory is
  the backup);
* the weights are written as safetensors shards of one transformer block each (small modules
  are packed together up to the size of the largest block), so serialising a shard never
  needs more than about one block of extra memory, unlike a single ``save_file`` of the whole
  state dict.

The result is checked against the unmerged model on a few probe inputs, in memory and after
reloading the written directory with ``from_pretrained``; a difference beyond the tolerance
exits with status 1.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import shutil
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any, Optional

from ..logging_utils import get_logger, tqdm_disable
from .common import (CLIError, architecture_class, auto_class, brief, dtype_from_name, from_pretrained_kwargs,
                     main_tensor, model_dir, offline, one_line, probe_inputs)

logger = get_logger("cli.merge")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files a model directory needs besides config and weights for AutoTokenizer / AutoProcessor.
TOKENIZER_PATTERNS = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json",
                      "*.model", "*.tiktoken", "chat_template*", "preprocessor_config.json", "processor_config.json")
_BLOCK = re.compile(r"^(.*?\.\d+)\.")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge", help="fold a delta into its base model and write a standalone model directory",
        description="Load the base model, load the delta checkpoint, merge it into the weights module by module, "
                    "write OUT (config, tokenizer files, safetensors shards written one block at a time) so that "
                    "transformers' from_pretrained loads it, and compare the merged outputs with the unmerged ones "
                    "on a few inputs. Deltas that add computation (adapters, prefixes) cannot be merged.",
        epilog="example:\n  odelta-fast merge --model ./llama --delta runs/lora/final --output ./llama-merged",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", metavar="DIR", required=True, help="the base model directory the delta was trained on")
    p.add_argument("--delta", metavar="DIR", required=True, help="a delta checkpoint (save_finetuned directory)")
    p.add_argument("-o", "--output", metavar="DIR", required=True, help="the merged model directory to write")
    p.add_argument("--model-class", metavar="NAME",
                   help="transformers class to load (default: the class the delta was trained on)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="load and write the weights in this dtype (default: auto, as stored)")
    p.add_argument("--device", default="cpu", help="where to merge (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--verify-inputs", type=int, default=4, metavar="N", help="probe inputs to compare (default: 4)")
    p.add_argument("--atol", type=float, metavar="TOL",
                   help="tolerated max |merged - unmerged|, relative to max(1, max |unmerged|) "
                        "(default: 1e-4 for float32, 3e-2 for 16-bit)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with the unmerged model")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show progress bars")
    p.set_defaults(func=run)


def _training_state(delta_dir: Path) -> dict[str, Any]:
    path = delta_dir / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CLIError(f"{path}: not valid JSON ({err.msg})")


def _model_class(args, directory: Path, delta_config: dict, state: dict):
    if args.model_class:
        return auto_class(args.model_class)
    for name in (state.get("model_class"), delta_config.get("backbone_class")):
        if name:
            try:
                return auto_class(name)
            except CLIError:
                logger.info("cannot use model class %s; trying the next source", name)
    return architecture_class(directory)


def _check_mergeable_type(delta_config: dict, delta_arg: str) -> None:
    """Refuse before loading anything when the method can never be merged."""
    from ..auto import DELTA_MODEL_MAPPING, model_class

    delta_type = delta_config.get("delta_type")
    if delta_type not in DELTA_MODEL_MAPPING:
        raise CLIError(f"--delta {delta_arg}: unknown delta_type {delta_type!r}; expected one of "
                       f"{', '.join(sorted(DELTA_MODEL_MAPPING))}")
    delta_class = getattr(model_class(delta_type), "delta_class", None)
    if delta_class is not None and not getattr(delta_class, "mergeable", False):
        raise CLIError(_not_mergeable(delta_arg, delta_type))


def _not_mergeable(delta_arg: str, delta_type: str, detail: str = "") -> str:
    return (f"--delta {delta_arg}: {delta_type!r} deltas cannot be merged into the base weights: they add "
            f"computation rather than change existing weights{detail}; deploy it with "
            "AutoDeltaModel.from_finetuned(path, model) instead; mergeable: lora, bitfit (on modules with a bias)")


# ---------------------------------------------------------------------- sharded writing
def _unit_of(key: str) -> str:
    """The group a tensor is written with: its numbered block (``model.layers.3``), else its module."""
    match = _BLOCK.match(key)
    return match.group(1) if match else key.rsplit(".", 1)[0]


def plan_shards(state: "OrderedDict[str, Any]") -> list[list[str]]:
    """Keys grouped into shards: one per block; consecutive small modules packed together up to
    the size of the largest block, so no shard is much bigger than one block (or one tensor)."""
    units: "OrderedDict[str, list[str]]" = OrderedDict()
    for key in state:
        units.setdefault(_unit_of(key), []).append(key)

    def nbytes(keys):
        return sum(state[k].numel() * state[k].element_size() for k in keys)

    blocks = [nbytes(keys) for unit, keys in units.items() if _BLOCK.match(unit + ".")]
    limit = max(blocks) if blocks else max(nbytes(keys) for keys in units.values())
    shards: list[list[str]] = []
    current: list[str] = []
    for unit, keys in units.items():
        is_block = bool(_BLOCK.match(unit + "."))
        if current and (is_block or nbytes(current) + nbytes(keys) > limit):
            shards.append(current)
            current = []
        current.extend(keys)
        if is_block:
            shards.append(current)
            current = []
    if current:
        shards.append(current)
    return shards


def unique_state_dict(model) -> "OrderedDict[str, Any]":
    """``model.state_dict()`` (references, no copies) without the second name of a tied tensor:
    transformers re-ties ``lm_head.weight`` to the embeddings on load, as after save_pretrained."""
    state = model.state_dict()
    seen: dict[tuple, str] = {}
    out: "OrderedDict[str, Any]" = OrderedDict()
    for key, tensor in state.items():
        ident = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tensor.dtype) if tensor.numel() else None
        if ident is not None and ident in seen:
            logger.info("%s shares storage with %s; written once", key, seen[ident])
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = tensor
    return out


def write_weights(model, directory: Path, progress: Optional[bool] = None) -> list[str]:
    """Write the model's tensors as safetensors shards (see ``plan_shards``) plus an index;
    returns the shard file names."""
    from tqdm.auto import tqdm

    from ..checkpoint import atomic_write, save_tensors

    state = unique_state_dict(model)
    shards = plan_shards(state)
    names = [SINGLE_NAME] if len(shards) == 1 else \
        [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map: dict[str, str] = {}
    total = 0
    for name, keys in tqdm(list(zip(names, shards)), desc="writing", unit="shard", disable=tqdm_disable(progress)):
        # Only this shard's tensors are copied to the CPU and serialised: memory for one block.
        tensors = {k: state[k].detach().to("cpu").contiguous() for k in keys}
        save_tensors(directory / name, tensors, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in keys})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        atomic_write(directory / INDEX_NAME, lambda tmp: Path(tmp).write_text(text))
    return names


def _copy_tokenizer_files(source: Path, target: Path) -> list[str]:
    copied = []
    for pattern in TOKENIZER_PATTERNS:
        for file in sorted(source.glob(pattern)):
            if file.is_file() and not (target / file.name).exists():
                shutil.copy2(file, target / file.name)
                copied.append(file.name)
    return copied


def _write_config(model, directory: Path) -> None:
    model.config.architectures = [type(model).__name__]
    model.config.dtype = model.dtype  # the dtype the weights are written in, as save_pretrained records it
    model.config.save_pretrained(str(directory))
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        try:
            if model.can_generate():
                generation_config.save_pretrained(str(directory))
        except Exception as err:  # a generation config is optional for from_pretrained
            logger.warning("generation_config.json not written: %s", err)


# ---------------------------------------------------------------------- command
def _outputs(model, inputs):
    import torch

    with torch.no_grad():
        return main_tensor(model(**inputs)).float().cpu()


def run(args: argparse.Namespace) -> int:
    from .. import checkpoint
    from ..auto import AutoDeltaModel

    offline()
    directory = model_dir(args.model)
    delta_dir = Path(args.delta).expanduser()
    try:
        delta_config = checkpoint.read_config(delta_dir)
    except checkpoint.CheckpointError as err:
        raise CLIError(f"--delta {args.delta}: {one_line(err)}; expected a directory written by save_finetuned "
                       "(e.g. OUT/final of odelta-fast train)")
    _check_mergeable_type(delta_config, args.delta)
    if args.verify_inputs < 1:
        raise CLIError(f"--verify-inputs {args.verify_inputs}: expected at least 1")
    out = Path(args.output).expanduser()
    if out.resolve() in (directory.resolve(), delta_dir.resolve()):
        raise CLIError(f"--output {args.output}: must differ from --model and --delta")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise CLIError(f"--output {args.output}: exists and is not empty; pass --overwrite to replace it")
    state = _training_state(delta_dir)
    cls = _model_class(args, directory, delta_config, state)
    kwargs = from_pretrained_kwargs(dtype_from_name(args.dtype))
    if state.get("task") == "classification" and state.get("id2label"):
        id2label = {int(k): v for k, v in state["id2label"].items()}
        kwargs.update(num_labels=len(id2label), id2label=id2label, label2id={v: k for k, v in id2label.items()},
                      ignore_mismatched_sizes=True)
    try:
        model = cls.from_pretrained(str(directory), **kwargs).eval()
    except (OSError, ValueError, KeyError) as err:
        raise CLIError(f"--model {args.model}: cannot load it as {cls.__name__} ({brief(err)}); pass --model-class")
    model.to(args.device)
    try:
        delta = AutoDeltaModel.from_finetuned(str(delta_dir), model)
    except (checkpoint.CheckpointError, ValueError) as err:
        raise CLIError(f"--delta {args.delta}: cannot load it into {type(model).__name__} from {args.model} "
                       f"({one_line(err)})")
    blocked = [slot.path for slot in delta.slots if not slot.delta.mergeable]
    if blocked:
        raise CLIError(_not_mergeable(args.delta, delta.delta_type,
                                      f" ({len(blocked)} of its {len(delta.slots)} modules, e.g. {blocked[0]}, "
                                      "have nothing to fold into)"))

    inputs = None if args.no_verify else probe_inputs(model, args.verify_inputs)
    reference = None if inputs is None else _outputs(model, inputs)
    merged = len(delta.slots)
    delta.merge_and_unload(progress=args.progress)
    logger.info("merged %d modules", merged)
    atol = args.atol if args.atol is not None else (1e-4 if model.dtype.itemsize >= 4 else 3e-2)
    diffs: dict[str, float] = {}
    if reference is not None:
        diffs["in memory"] = (_outputs(model, inputs) - reference).abs().max().item()

    with checkpoint.atomic_directory(out) as tmp:
        _write_config(model, tmp)
        copied = _copy_tokenizer_files(directory, tmp)
        shards = write_weights(model, tmp, progress=args.progress)
    print(f"merged {merged} modules of a {delta.delta_type} delta into {type(model).__name__}; wrote {out} "
          f"({len(shards)} shard{'s' if len(shards) != 1 else ''}, tokenizer files: {len(copied)})")
    if reference is None:
        return 0

    # Reload what was written, as a user would; free the in-memory model first so that the
    # check does not hold two models at once.
    model_class = type(model)
    del model, delta
    gc.collect()
    reloaded = model_class.from_pretrained(str(out), **from_pretrained_kwargs("auto")).eval().to(args.device)
    diffs["reloaded"] = (_outputs(reloaded, inputs) - reference).abs().max().item()
    tolerance = atol * max(1.0, reference.abs().max().item())
    for what, diff in diffs.items():
        print(f"max |merged - unmerged| ({what}, {args.verify_inputs} inputs): {diff:.3e} (tolerance {tolerance:.1e})")
    worst = max(diffs.values())
    if not worst <= tolerance:
        print(f"odelta-fast: error: merged outputs differ from the unmerged ones by {worst:.3e} > {tolerance:.1e}; "
              f"{out} was written but should not be trusted", file=sys.stderr)
        return 1
    return 0
