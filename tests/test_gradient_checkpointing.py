"""Gradient checkpointing with every method: under transformers' activation checkpointing
(``activation_checkpointing_enable()``, ``gradient_checkpointing_enable()`` before 5.24),
reentrant and not, gradients reach every delta parameter and equal those computed without
checkpointing (dropout included: checkpointing replays the RNG, and the LoRA op regenerates its
mask from a seed drawn inside the recomputed forward)."""
from __future__ import annotations

import warnings

import pytest
import torch

from odelta_fast import PrefixModel, SoftPromptModel
from odelta_fast.integrations import enable_activation_checkpointing, enable_input_require_grads
from helpers import method_factories, randomize_
from tiny_models import tiny_model


METHODS = {
    **method_factories(),
    "prefix": lambda m: PrefixModel(m, prefix_token_num=3, embed_dim=8, mid_dim=8),
    "prefix_direct": lambda m: PrefixModel(m, prefix_token_num=3, reparameterize=False),
    "soft_prompt": lambda m: SoftPromptModel(m, soft_token_num=3),
}
MODES = {"non_reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


def _grads(arch, method, checkpointing, input_grads=False):
    model, inputs = tiny_model(arch)
    delta = METHODS[method](model)
    # Fresh deltas are no-ops whose factors have zero gradients (LoRA's A, an adapter's down
    # projection); random values make every gradient non-trivial.
    randomize_(delta.parameters())
    delta.freeze_module()
    if checkpointing is not None:
        with warnings.catch_warnings():
            # The name in use must not be a deprecated one on the installed transformers.
            warnings.simplefilter("error", FutureWarning)
            enable_activation_checkpointing(model, **checkpointing)
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    if input_grads:
        enable_input_require_grads(model)
    model.train()
    torch.manual_seed(0)
    out = model(**inputs)
    (out.logits if hasattr(out, "logits") else out[0]).float().pow(2).mean().backward()
    return {name: p.grad for name, p in delta.named_parameters()}


def _check_same(checkpointed, reference):
    assert checkpointed.keys() == reference.keys()
    for name, grad in checkpointed.items():
        assert grad is not None, f"{name} got no gradient under checkpointing"
        assert grad.abs().sum() > 0, f"{name} got an all-zero gradient under checkpointing"
        torch.testing.assert_close(grad, reference[name], atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2", "t5"])
def test_checkpointing_gives_the_same_gradients(arch, method):
    reference = _grads(arch, method, None)
    for name, grad in reference.items():
        assert grad is not None and grad.abs().sum() > 0, f"{name}: no gradient even without checkpointing"
    for mode, kwargs in MODES.items():
        _check_same(_grads(arch, method, kwargs), reference)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_reentrant_checkpointing_on_a_non_text_model(method):
    """transformers turns input gradients on by itself only for ``input_ids`` models; a ViT
    (``pixel_values``) under reentrant checkpointing gets none, and a frozen backbone with only
    deltas inside the checkpointed blocks then has nothing to backpropagate into.
    ``enable_input_require_grads`` is the fix."""
    reference = _grads("vit", method, None)
    _check_same(_grads("vit", method, MODES["reentrant"], input_grads=True), reference)


def test_enable_input_require_grads_is_idempotent_and_removable():
    from odelta_fast.integrations.checkpointing import disable_input_require_grads

    model, _ = tiny_model("llama")
    embeddings = enable_input_require_grads(model)
    assert enable_input_require_grads(model) is embeddings
    assert len(embeddings._forward_hooks) == 1
    assert embeddings(torch.tensor([[3, 4]])).requires_grad
    disable_input_require_grads(model)
    assert not embeddings._forward_hooks
    with pytest.raises(ValueError, match="get_input_embeddings"):
        enable_input_require_grads(torch.nn.Linear(2, 2))
