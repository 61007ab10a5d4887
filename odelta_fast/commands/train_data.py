"""``odelta-fast train``'s data: reading a JSONL / CSV file into texts (and labels), and
turning rows into batches. Every bad row is an error naming the file and line."""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .common import CLIError, located

CLASSIFICATION, CAUSAL_LM = "classification", "causal-lm"


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


def batches(n: int, batch_size: int, seed: int, epoch: int):
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def encode(tokenizer, data: Dataset, index: list[int], max_length: int, device):
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

