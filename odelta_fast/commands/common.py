"""What the subcommands share: the user-facing error type, model directory checks, and loading."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch

from ..logging_utils import get_logger

logger = get_logger("cli")


class CLIError(Exception):
    """Bad input: printed as one ``odelta-fast: error: ...`` line, exit status 2."""


def one_line(message: object) -> str:
    """Fold a multi-line library message (e.g. addressing's near-miss list) into one line."""
    parts: list[str] = []
    listing: Optional[list[str]] = None
    for raw in str(message).splitlines():
        line = raw.strip()
        if not line:
            continue
        if line == "closest candidates:":
            listing = []
            continue
        if listing is not None and raw.startswith("    "):
            listing.append(line)
            continue
        if listing is not None:
            parts.append("closest candidates: " + ", ".join(listing))
            listing = None
        parts.append(line.rstrip(".;"))
    if listing is not None:
        parts.append("closest candidates: " + ", ".join(listing))
    return "; ".join(parts)


def brief(error: object, limit: int = 240) -> str:
    """``one_line(error)`` cut to ``limit`` characters: transformers' errors can list every model type."""
    text = one_line(error)
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def located(where: str, value: object) -> str:
    """``--model DIR`` for a flag; ``train.yaml:3: DIR`` for a config-file line or a ``--set`` item."""
    return f"{where} {value}" if where.startswith("--") and " " not in where else f"{where}: {value}"


def model_dir(path: Optional[str], flag: str = "--model") -> Path:
    """``path`` as a local Hugging Face model directory (with a config.json), or a CLIError."""
    if not path:
        raise CLIError(f"{flag} is required: a local Hugging Face model directory")
    directory = Path(path).expanduser()
    where = located(flag, path)
    if not directory.exists():
        raise CLIError(f"{where}: no such directory; expected a local Hugging Face model directory")
    if not directory.is_dir():
        raise CLIError(f"{where}: is a file; expected a local Hugging Face model directory")
    if not (directory / "config.json").is_file():
        raise CLIError(f"{where}: no config.json in this directory; expected a Hugging Face model directory "
                       "(written by save_pretrained)")
    load_model_config(directory)  # a garbage config is reported as such, not blamed on what reads it next
    check_weight_files(directory)
    return directory


def load_model_config(directory: Path):
    """The transformers config of a model directory; an unreadable ``config.json`` (not JSON, no
    ``model_type``, a type this transformers does not know) is a CLIError naming the file."""
    from transformers import AutoConfig

    from ..checkpoint import CheckpointError, read_json

    path = directory / "config.json"
    try:
        raw = read_json(path, "model config")
    except CheckpointError as err:
        raise CLIError(f"{one_line(err)}; expected the config.json that save_pretrained writes")
    if not isinstance(raw.get("model_type"), str):
        raise CLIError(f"{path}: the model config has no \"model_type\"; expected the config.json that "
                       "save_pretrained writes")
    try:
        return AutoConfig.from_pretrained(str(directory))
    except Exception as err:  # unknown model_type, bad field values: transformers' own message says which
        raise CLIError(f"{path}: transformers cannot read this model config ({brief(err)})")


def check_weight_files(directory: Path) -> None:
    """Every safetensors file of a model directory has a readable header and the size it
    declares: a truncated download is named here, not reported by ``from_pretrained`` as a raw
    error without a file name."""
    from safetensors import safe_open

    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:  # checks the header against the file size
                handle.keys()
        except Exception as err:
            raise CLIError(f"{file}: not a readable safetensors file ({brief(err)}); it is truncated or "
                           "corrupt: save or download the model again")


def offline() -> None:
    """The CLI reads local directories only; never let transformers reach for the hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def dtype_from_name(name: Optional[str], flag: str = "--dtype") -> Any:
    if name in (None, "auto"):
        return "auto"
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    try:
        return table[str(name).lower()]
    except KeyError:
        raise CLIError(f"{flag} {name}: unknown dtype; expected auto, float32, bfloat16 or float16")


def from_pretrained_kwargs(dtype: Any) -> dict[str, Any]:
    return {"dtype": dtype}


def auto_class(name: str):
    """A transformers model class by name (``AutoModelForCausalLM``, ``BertForSequenceClassification``)."""
    import transformers

    try:
        cls = getattr(transformers, name)
    except (AttributeError, ImportError, RuntimeError):
        cls = None
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise CLIError(f"--model-class {name}: transformers has no model class of that name "
                       "(e.g. AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModel)")
    return cls


def architecture_class(directory: Path, override: Optional[str] = None):
    """The class a model directory was saved as (``config.architectures[0]``), else ``AutoModel``."""
    if override:
        return auto_class(override)
    config = load_model_config(directory)
    for name in getattr(config, "architectures", None) or []:
        try:
            return auto_class(name)
        except CLIError:
            logger.info("config.architectures names %s, which this transformers lacks", name)
    return auto_class("AutoModel")


def load_tokenizer(directory: Path, tokenizer_path: Optional[str] = None):
    from transformers import AutoTokenizer

    source = Path(tokenizer_path) if tokenizer_path else directory
    flag = "--tokenizer" if tokenizer_path else "--model"
    if not source.exists():
        raise CLIError(f"{flag} {source}: no such directory; expected a directory with tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(str(source))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise CLIError(f"{flag} {source}: cannot load a tokenizer from it ({one_line(err)}); expected tokenizer files "
                       "(tokenizer.json, or vocab.txt / vocab.json + merges.txt with tokenizer_config.json); "
                       "pass --tokenizer DIR")


def method_class(name: str, flag: str = "--method"):
    """The method class for ``name``; ``flag`` is where the name came from (``--method``, or a
    YAML location / ``--set`` item, whose text already shows the value)."""
    from ..auto import DELTA_MODEL_MAPPING, model_class

    is_flag = flag.startswith("--") and " " not in flag
    where, what = (f"{flag} {name}", "") if is_flag else (flag, f" {name!r}")
    if name not in DELTA_MODEL_MAPPING:
        raise CLIError(f"{where}: unknown method{what}; expected one of {', '.join(sorted(DELTA_MODEL_MAPPING))}")
    try:
        return model_class(name)
    except ImportError as err:
        raise CLIError(f"{where}: method{what} is not available in this installation ({err})")


def main_tensor(output) -> torch.Tensor:
    """The tensor a forward is mostly about: logits, else the last hidden state, else the first tensor."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, torch.Tensor):
        return output
    for value in (output.values() if hasattr(output, "values") else output):
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no tensor in the model output {type(output).__name__}")


def probe_inputs(model, n: int, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A few deterministic inputs for comparing two versions of ``model``: random token ids
    (ids 3 and up, clear of the usual pad/bos/eos ids), or random pixels for vision models."""
    config = model.config
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        size = getattr(config, "image_size", 224)
        channels = getattr(config, "num_channels", 3)
        dtype = next(model.parameters()).dtype
        return {"pixel_values": torch.randn(n, channels, size, size, generator=g).to(device=device, dtype=dtype)}
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 4:
        raise CLIError(f"cannot build probe inputs: config.vocab_size is {vocab!r}")
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or seq_len
    seq_len = max(2, min(seq_len, int(max_pos) - 2))
    ids = torch.randint(3, vocab, (n, seq_len), generator=g)
    inputs = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (n, max(2, seq_len // 2)), generator=g).to(device)
    return inputs
