"""End-to-end LoRA training: tokens per second and peak memory, odelta_fast against PEFT.

GPU size (the target: >= 1.25x PEFT's tokens/s at <= 0.85x its peak memory, H100 bf16):
LLaMA-style, hidden 2048, 16 layers, intermediate 5504, 16 heads, sequence 2048, batch 4,
random init, LoRA r=16 on all seven projections, dropout 0.05. ``small`` is a toy size for CPU.
Providers run one after the other, each on a fresh model, so peak memory is each one's own.
"""
from __future__ import annotations

import gc
import time

import torch

from cpu_train_step import TARGETS_COMMON, TARGETS_PEFT  # the same seven projections

GPU_SIZE = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5504, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000, seq=2048, batch=4)
SMALL_SIZE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=172, num_attention_heads=4,
                  num_key_value_heads=4, vocab_size=256, seq=32, batch=2)


def _model(size: dict, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in size.items() if k not in ("seq", "batch")},
                         max_position_embeddings=size["seq"])
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def _attach(provider: str, model, rank: int, dropout: float):
    if provider == "odelta_fast":
        from odelta_fast import LoraModel

        LoraModel(model, lora_r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                  modified_modules=TARGETS_COMMON).freeze_module(set_state_dict=False)
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout,
                                            target_modules=TARGETS_PEFT))


def run_provider(provider: str, device, small: bool, steps: int, warmup: int, rank=16, dropout=0.05) -> dict:
    size = SMALL_SIZE if small else GPU_SIZE
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = _attach(provider, _model(size, device, dtype), rank, dropout)
    batch = torch.randint(0, size["vocab_size"], (size["batch"], size["seq"]), device=device,
                          generator=torch.Generator(device=device).manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    times.sort()
    median = times[len(times) // 2]
    del model, optimizer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"provider": provider, "median_step_s": median, "tokens_per_s": size["batch"] * size["seq"] / median,
            "peak_memory_bytes": peak, "size": size, "steps": steps}


def e2e_rows(device, small: bool, steps: int = 10, warmup: int = 3) -> list[dict]:
    results = [run_provider(p, device, small, steps, warmup) for p in ("peft", "odelta_fast")]
    peft_result, ours = results
    ours["speedup_vs_peft"] = ours["tokens_per_s"] / peft_result["tokens_per_s"]
    if ours["peak_memory_bytes"] and peft_result["peak_memory_bytes"]:
        ours["memory_vs_peft"] = ours["peak_memory_bytes"] / peft_result["peak_memory_bytes"]
    return results
