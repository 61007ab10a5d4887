"""Every method on every mapped architecture: forward and backward, freezing, exact detach,
exact save/load round trip, merge. Tiny random models built from config objects."""
from __future__ import annotations

import pytest
import torch

from odelta_fast import AutoDeltaModel
from helpers import main_output, method_factories, randomize_, routed_modules
from tiny_models import ARCHITECTURES, tiny_model

METHODS = method_factories()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_method_on_architecture(arch, method, tmp_path):
    model, inputs = tiny_model(arch)
    original = main_output(model, inputs)
    state_before = model.state_dict()

    delta = METHODS[method](model)
    assert delta.slots, f"{method} selected no module on {arch}"

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
