"""CPU training step: odelta_fast's eager LoRA path against PEFT, in one run.

A small LLaMA-style model (hidden 512, intermediate 1376, 4 layers, 8 heads, vocab 2000), batch
4 x 256 tokens, LoRA r=16 on all seven projections. Each provider gets its own identical copy
of the model; steps alternate between providers so drift in machine load hits both alike.
Prints the median step time of each and the ratio ours / PEFT (target: <= 1.0), and writes a
JSON record under bench/results/.

    python bench/cpu_train_step.py [--steps 12] [--dropout 0.05 0.0] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import torch

TARGETS_COMMON = ["attn.q", "attn.k", "attn.v", "attn.o", "ff.gate", "ff.w1", "ff.w2"]
TARGETS_PEFT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_model(seed: int, small: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    size = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=200) if small else \
        dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=2000)
    config = LlamaConfig(**size, max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).train()


def with_odelta(model, rank: int, dropout: float):
    from odelta_fast import LoraModel

    delta = LoraModel(model, lora_r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                      modified_modules=TARGETS_COMMON, backend="eager")
    delta.freeze_module(set_state_dict=False)
    return model


def with_peft(model, rank: int, dropout: float):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                            target_modules=TARGETS_PEFT))


def make_step(model, batch):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


def measure(dropout: float, steps: int, warmup: int, small: bool, batch_size: int, seq: int, rank: int) -> dict:
    vocab = 200 if small else 2000
    batch = torch.randint(0, vocab, (batch_size, seq), generator=torch.Generator().manual_seed(0))
    providers = {
        "odelta_fast": make_step(with_odelta(build_model(0, small), rank, dropout), batch),
        "peft": make_step(with_peft(build_model(0, small), rank, dropout), batch),
    }
    times: dict[str, list[float]] = {name: [] for name in providers}
    for i in range(warmup + steps):
        order = list(providers) if i % 2 == 0 else list(reversed(providers))
        for name in order:
            elapsed = providers[name]()
            if i >= warmup:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "dropout": dropout,
        "median_s": medians,
        "all_s": times,
        "ratio_ours_over_peft": medians["odelta_fast"] / medians["peft"],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.05, 0.0])
    parser.add_argument("--small", action="store_true", help="a toy size for smoke tests (CI)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"),
                        help="directory for the JSON record ('' to skip writing)")
    args = parser.parse_args(argv)
    batch_size, seq, rank = (2, 16, 4) if args.small else (4, 256, 16)

    from common import environment

    record = {
        "benchmark": "cpu_train_step",
        "date": dt.date.today().isoformat(),
        "environment": environment(torch.device("cpu")),
        "shape": {"batch": batch_size, "seq": seq, "rank": rank, "small": args.small},
        "results": [],
    }
    for p in args.dropout:
        result = measure(p, args.steps, args.warmup, args.small, batch_size, seq, rank)
        record["results"].append(result)
        m = result["median_s"]
        print(f"dropout {p:<5}: odelta_fast {m['odelta_fast'] * 1e3:8.1f} ms | peft {m['peft'] * 1e3:8.1f} ms | "
              f"ours / peft = {result['ratio_ours_over_peft']:.3f}  (target <= 1.0)")
    if args.out and not args.small:
        from common import write_record

        path = write_record(args.out, f"{record['date']}-cpu-train-step.json", record)
        print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
