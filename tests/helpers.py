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
