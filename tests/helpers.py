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


def check_method_on_architecture(arch: str, make, tmp_path) -> None:
    """What every method must do on a tiny ``arch`` model: attach only adds keys, a fresh delta is
    a no-op, only the delta trains after freezing, save/load round trip bit for bit, merge
    agrees and unmerge is exact, detach restores the original forward exactly."""
    from odelta_fast import AutoDeltaModel
    from tiny_models import tiny_model

    model, inputs = tiny_model(arch)
    original = main_output(model, inputs)
    state_before = model.state_dict()

    delta = make(model)
    assert delta.slots, f"{type(delta).__name__} selected no module on {arch}"

    # Attaching only adds keys; every backbone tensor is still there, the very same storage.
    state_after = model.state_dict()
    for key, tensor in state_before.items():
        assert key in state_after, f"attaching removed {key}"
        assert state_after[key].data_ptr() == tensor.data_ptr()
    assert set(state_after) - set(state_before) == {name for name, _ in delta.named_parameters()}

    # A fresh delta is a no-op; with random values it must change the output.
    assert torch.allclose(main_output(model, inputs), original, atol=1e-6)
    randomize_(delta.parameters())
    with_delta = main_output(model, inputs)
    assert not torch.allclose(with_delta, original, atol=1e-4)

    # Only delta parameters train after freezing, and all of them get gradients.
    delta.freeze_module()
    delta_names = {name for name, _ in delta.named_parameters()}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == delta_names
    model.train()
    out = model(**inputs)
    (out.logits if hasattr(out, "logits") else out[0]).float().pow(2).mean().backward()
    for name, param in model.named_parameters():
        if name in delta_names:
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
        else:
            assert param.grad is None, f"frozen {name} received a gradient"
    assert any(p.grad.abs().sum() > 0 for p in delta.parameters())
    model.eval()

    # Save, load into a fresh backbone: the same outputs, bit for bit.
    delta.save_finetuned(str(tmp_path / "ckpt"))
    fresh, _ = tiny_model(arch)
    AutoDeltaModel.from_finetuned(str(tmp_path / "ckpt"), fresh)
    assert torch.equal(main_output(fresh, inputs), with_delta)

    # Merge folds what can be folded; outputs agree; unmerge restores exactly.
    delta.merge()
    assert torch.allclose(main_output(model, inputs), with_delta, atol=1e-5, rtol=1e-4)
    delta.unmerge()
    assert torch.equal(main_output(model, inputs), with_delta)

    # Detach restores the original forward exactly; attach re-applies.
    delta.detach()
    assert routed_modules(model) == []
    assert torch.equal(main_output(model, inputs), original)
    delta.attach()
    assert torch.equal(main_output(model, inputs), with_delta)
