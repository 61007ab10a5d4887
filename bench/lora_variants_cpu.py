"""DoRA against LoRA and against PEFT's DoRA on the CPU: one Linear, fwd+bwd, ms per step.

    python bench/lora_variants_cpu.py [--m 2048 --k 1024 --n 1024 --r 16 --steps 10]

A quick side-by-side on any machine; the GPU figures (the issue's targets) come from bench/run.py
on a GPU. Prints one line per variant and the two ratios.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn


def _step_ms(model: nn.Module, x: torch.Tensor, steps: int) -> float:
    for _ in range(2):
        model(x).sum().backward()
    start = time.perf_counter()
    for _ in range(steps):
        model(x).sum().backward()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in (("m", 2048), ("k", 1024), ("n", 1024), ("r", 16), ("steps", 10)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    args = parser.parse_args()
    import peft

    from odelta_fast import LoraModel

    x = torch.randn(args.m, args.k)
    variants = {
        "ours lora": lambda m: LoraModel(m, lora_r=args.r, modified_modules=["0"]),
        "ours dora": lambda m: LoraModel(m, lora_r=args.r, modified_modules=["0"], use_dora=True),
        "peft lora": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=args.r, target_modules=["0"])),
        "peft dora": lambda m: peft.get_peft_model(m, peft.LoraConfig(r=args.r, target_modules=["0"], use_dora=True)),
    }
    times = {}
    for name, make in variants.items():
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(args.k, args.n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = make(base)
        for pname, param in base.named_parameters():
            param.requires_grad_("lora" in pname)
        times[name] = _step_ms(wrapped if name.startswith("peft") else base, x, args.steps)
        print(f"{name}: {times[name]:.1f} ms/step")
    print(f"ours dora / ours lora = {times['ours dora'] / times['ours lora']:.2f} (target <= 1.25 on a GPU); "
          f"peft dora / ours dora = {times['peft dora'] / times['ours dora']:.2f} (target >= 1.5)")


if __name__ == "__main__":
    main()
