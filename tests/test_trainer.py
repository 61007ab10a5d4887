"""The HF Trainer with a delta-carrying backbone: checkpoints hold only the delta, resuming
restores it exactly and continues the same run, and the routed forwards keep the columns the
model takes. No ``datasets`` package: plain torch Datasets and lists of dicts."""
from __future__ import annotations

import dataclasses
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("accelerate")  # the Trainer requires it
import transformers  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from odelta_fast import AdapterModel, AutoDeltaModel, LoraModel, SoftPromptModel  # noqa: E402
from odelta_fast.integrations import DeltaCallback  # noqa: E402
from tiny_models import VOCAB, tiny_model  # noqa: E402

METHODS = {
    # dropout on, so resuming must also restore the RNG stream to continue the same run
    "lora": lambda m: LoraModel(m, lora_r=4, lora_dropout=0.1),
    "adapter": lambda m: AdapterModel(m, bottleneck_dim=8),
}
STEPS, SAVE_EVERY, BATCH = 6, 3, 4


class TokenRows(torch.utils.data.Dataset):
    """Causal-LM rows plus columns the model does not take (``idx``, ``source``)."""

    def __init__(self, n: int = STEPS * BATCH, length: int = 8):
        g = torch.Generator().manual_seed(123)
        self.ids = torch.randint(3, VOCAB, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
                "idx": i, "source": "synthetic"}


def _args(out, **overrides):
    kwargs = dict(
        output_dir=str(out), per_device_train_batch_size=BATCH, max_steps=STEPS, save_steps=SAVE_EVERY,
        save_strategy="steps", learning_rate=5e-3, seed=0, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _checkpointing_args(use_reentrant: bool) -> dict:
    """TrainingArguments turning activation checkpointing on, under the names the installed
    transformers uses (``activation_checkpointing`` since 5.24, ``gradient_checkpointing`` before)."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": {"use_reentrant": use_reentrant}}


def _delta_model(method):
    model, _ = tiny_model("llama")
    delta = METHODS[method](model)
    delta.freeze_module()
    return model, delta


def _delta_values(delta):
    return {name: p.detach().clone() for name, p in delta.named_parameters()}


class _AtTrainBegin(TrainerCallback):
    """The delta as training starts, i.e. after the Trainer loaded a checkpoint to resume."""

    def __init__(self, delta):
        self.delta, self.values = delta, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.values = _delta_values(self.delta)


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_trainer_saves_only_the_delta_and_resumes_exactly(method, tmp_path):
    out = tmp_path / "run"
    model, delta = _delta_model(method)
    names = {name for name, _ in delta.named_parameters()}
    start = _delta_values(delta)
    trainer = Trainer(model=model, args=_args(out), train_dataset=TokenRows(), callbacks=[DeltaCallback(delta)])
    trainer.train()
    final = _delta_values(delta)
    trainer.save_model()  # the final model directory: the delta too
    assert set(load_file(str(out / "model.safetensors"))) == {name for name, _ in delta.named_parameters()}
    assert any(not torch.equal(final[n], start[n]) for n in names), "training did not move the delta"

    ckpt = out / f"checkpoint-{SAVE_EVERY}"
    weights = ckpt / "model.safetensors"
    saved = load_file(str(weights))
    # Only the delta: exactly its tensors, and a file the size of the delta, not of the model.
    assert set(saved) == names
    delta_bytes = sum(p.numel() * p.element_size() for p in delta.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert os.path.getsize(weights) < 2 * delta_bytes + 8192 < model_bytes / 4
    assert set(load_file(str(out / f"checkpoint-{STEPS}" / "model.safetensors"))) == names
    # What the file holds loads back strictly: frozen weights left out are not "missing".
    model.load_state_dict(saved)

    # DeltaCallback's copy is a self-describing checkpoint a fresh backbone loads without the Trainer.
    fresh, _ = tiny_model("llama")
    loaded = AutoDeltaModel.from_finetuned(str(ckpt / "delta"), fresh)
    for name, param in loaded.named_parameters():
        assert torch.equal(param, saved[name]), name

    # Resume on a new backbone whose new delta starts elsewhere (new random init).
    model2, delta2 = _delta_model(method)
    with torch.no_grad():
        for p in delta2.parameters():
            p.add_(0.5)
    at_begin = _AtTrainBegin(delta2)
    warnings = _Warnings()
    transformers.utils.logging.add_handler(warnings)
    try:
        trainer2 = Trainer(model=model2, args=_args(out), train_dataset=TokenRows(), callbacks=[at_begin])
        trainer2.train(resume_from_checkpoint=str(ckpt))
    finally:
        transformers.utils.logging.remove_handler(warnings)
    assert at_begin.values is not None
    for name in names:
        assert torch.equal(at_begin.values[name], saved[name]), f"resume did not restore {name} exactly"
    assert trainer2.state.global_step == STEPS
    assert not [m for m in warnings.messages if "missing keys" in m], warnings.messages
    # Optimizer, scheduler, data order and RNG all came back: the resumed run ends where the
    # uninterrupted one did.
    resumed = _delta_values(delta2)
    for name in names:
        torch.testing.assert_close(resumed[name], final[name], atol=1e-6, rtol=1e-5, msg=name)


def _received_keys(model):
    seen = []
    # num_items_in_batch is the Trainer's own extra for forwards that take **kwargs.
    model.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(sorted(set(kwargs) - {"num_items_in_batch"})), with_kwargs=True)
    return seen


def _bert_rows(n=8):
    g = torch.Generator().manual_seed(5)
    rows = []
    for i in range(n):
        ids = torch.randint(3, VOCAB, (6,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                     "labels": i % 2, "idx": i, "note": "unused"})
    return rows


@pytest.mark.parametrize("method", ["lora", "soft_prompt"])
def test_trainer_keeps_the_columns_the_forward_takes(method, tmp_path):
    """A list of dicts goes through the Trainer's column-removing collator, which reads the
    forward's signature. The soft prompt routes the backbone's own forward, so there the
    signature must be the original one, or the Trainer would drop every input column."""
    model, _ = tiny_model("bert")
    delta = LoraModel(model, lora_r=4) if method == "lora" else SoftPromptModel(model, soft_token_num=3)
    delta.freeze_module(exclude=["deltas", "classifier"])
    seen = _received_keys(model)
    args = _args(tmp_path, max_steps=2, save_strategy="no", remove_unused_columns=True)
    Trainer(model=model, args=args, train_dataset=_bert_rows()).train()
    assert seen and all(keys == ["attention_mask", "input_ids", "labels", "token_type_ids"] for keys in seen), seen


def test_delta_callback_enables_input_grads_for_reentrant_checkpointing(tmp_path):
    """ViT's main input is pixel_values, for which transformers does not turn on input
    gradients; with only LoRA trainable, reentrant checkpointing would have nothing to
    backpropagate into. DeltaCallback turns them on."""
    model, _ = tiny_model("vit")
    delta = LoraModel(model, lora_r=4)
    delta.freeze_module()
    start = _delta_values(delta)
    g = torch.Generator().manual_seed(0)
    rows = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % 3} for i in range(8)]
    args = _args(tmp_path, max_steps=2, save_strategy="no", **_checkpointing_args(use_reentrant=True))
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[DeltaCallback(delta, save=False)]).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    moved = _delta_values(delta)
    assert all(not torch.equal(moved[n], start[n]) for n in start if n.endswith("lora_B")), "the delta did not train"


# ---------------------------------------------------------------------------------------------
# The state_dict contract the Trainer, accelerate and DDP rely on.


def test_filtered_state_dict_loads_back_strictly_and_inside_wrappers():
    model, delta = _delta_model("lora")
    names = {name for name, _ in delta.named_parameters()}
    assert set(model.state_dict()) == names
    model.load_state_dict(model.state_dict())  # strict: frozen weights left out are not missing
    # Missing *delta* tensors are still reported.
    partial = {k: v for k, v in model.state_dict().items() if not k.endswith("lora_B")}
    with pytest.raises(RuntimeError, match="lora_B"):
        model.load_state_dict(partial)
    # As a child (DDP's ``module.``, a user's container) the filter drops only the backbone's
    # frozen keys, never its siblings'.
    head = torch.nn.Linear(2, 2)
    wrapper = torch.nn.ModuleDict({"a_head": head, "backbone": model})
    keys = set(wrapper.state_dict())
    assert keys == {"a_head.weight", "a_head.bias"} | {f"backbone.{n}" for n in names}
    wrapper.load_state_dict(wrapper.state_dict())


def test_accelerate_save_state_and_load_state(tmp_path):
    """accelerate loads the model part of ``save_state`` strictly; the delta comes back."""
    from accelerate import Accelerator

    model, delta = _delta_model("lora")
    accelerator = Accelerator(cpu=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, opt = accelerator.prepare(model, opt)
    saved = _delta_values(delta)
    accelerator.save_state(str(tmp_path / "state"))
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(1.0)
    accelerator.load_state(str(tmp_path / "state"))
    for name, value in _delta_values(delta).items():
        assert torch.equal(value, saved[name]), name
