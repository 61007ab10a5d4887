"""Small helpers shared by the frontend tests."""
from __future__ import annotations

import torch


def main_output(model, inputs) -> torch.Tensor:
    """The tensor a model's forward is mostly about: logits, or the first output."""
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out[0]


def randomize_(params, std: float = 0.2, seed: int = 1) -> None:
    """Give delta parameters non-trivial values (new deltas are exact no-ops by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(std).to(p.dtype))


def routed_modules(model) -> list[str]:
    from odelta_fast import routing

    return [name for name, m in model.named_modules() if routing.is_routed(m)]


def method_factories() -> dict:
    """One small configuration of every insertion-based method, keyed by delta type; hidden 32 /
    reduction 8 gives Compacter a bottleneck of 4, divisible by its 4 hypercomplex divisions."""
    from odelta_fast import (AdapterModel, BitFitModel, CompacterModel, LoraModel, LowRankAdapterModel,
                             ParallelAdapterModel)

    return {
        "lora": lambda m: LoraModel(m, lora_r=4, lora_dropout=0.1),
        "adapter": lambda m: AdapterModel(m, bottleneck_dim=8),
        "parallel_adapter": lambda m: ParallelAdapterModel(m, bottleneck_dim=8, scaled=0.5),
        "bitfit": lambda m: BitFitModel(m),
        "compacter": lambda m: CompacterModel(m, reduction_factor=8),
        "low_rank_adapter": lambda m: LowRankAdapterModel(m, reduction_factor=8, low_rank_rank=2),
    }
