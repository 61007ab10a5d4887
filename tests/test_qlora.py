"""LoRA (and adapters, BitFit) on bitsandbytes-quantized bases against the real ``peft`` package:
tiny llama, gpt2 (its Conv1D projections become Linear4bit / Linear8bitLt) and bert, quantized by
transformers' own loader on CPU (bitsandbytes >= 0.46 runs nf4 / fp4 / int8 matmuls there)."""
from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes): "
                          "the QLoRA tests need it; the GPU validation runs them too")
peft = pytest.importorskip("peft")

from tiny_models import tiny_model  # noqa: E402

from odelta_fast import AdapterModel, AutoDeltaModel, BitFitModel, LoraModel  # noqa: E402
from odelta_fast.quantized import dequantized_weight, quantization_of  # noqa: E402

TOL = 1e-5
HEADS = ["classifier", "score", "lm_head"]  # left in float: bitsandbytes' CPU kernel wants widths of 32k
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False),
    "int8": dict(load_in_8bit=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny float models written once (hidden 64: bitsandbytes' CPU blocks are 64 wide)."""
    out = {}
    for kind, over in (("llama", dict(hidden_size=64, intermediate_size=128)), ("gpt2", dict(n_embd=64)),
                       ("bert", dict(hidden_size=64, intermediate_size=128))):
        model, batch = tiny_model(kind, **over)
        path = tmp_path_factory.mktemp(kind)
        model.save_pretrained(path)
        out[kind] = (type(model), str(path), batch)
    return out


def load_quantized(saved, kind, quant):
    from transformers import BitsAndBytesConfig

    cls, path, batch = saved[kind]
    config = BitsAndBytesConfig(**QUANT[quant], bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=HEADS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls.from_pretrained(path, quantization_config=config, device_map="cpu").eval()
    return model, batch


def logits(model, batch, keep_mode=False):
    if not keep_mode:
        model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes' int8 "inputs will be cast" notes
        return model(**batch).logits


def randomize(delta, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in delta.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("kind,quant", [("llama", "nf4"), ("gpt2", "fp4"), ("gpt2", "int8"),
                                        ("bert", "nf4")])
def test_qlora_checkpoints_both_ways_equal_peft(saved, kind, quant, tmp_path):
    model, batch = load_quantized(saved, kind, quant)
    base = logits(model, batch)
    delta = LoraModel(model, lora_r=4, lora_alpha=8, modified_modules=["all-linear"] if kind == "llama" else None)
    assert all(quantization_of(s.target) for s in delta.slots)
    assert torch.equal(logits(model, batch), base)  # B = 0
    randomize(delta)
    ours = logits(model, batch)
    assert (ours - base).abs().max() > 1e-4
    delta.save_finetuned(str(tmp_path / "ours"), format="peft")
    in_peft = peft.PeftModel.from_pretrained(load_quantized(saved, kind, quant)[0], str(tmp_path / "ours")).eval()
    assert "bnb" in type(in_peft.base_model.model.get_submodule(delta.slots[0].path)).__module__
    assert (logits(in_peft, batch) - ours).abs().max() <= TOL
    # PEFT's own QLoRA adapter, loaded here
    in_peft.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = load_quantized(saved, kind, quant)
    AutoDeltaModel.from_finetuned(str(tmp_path / "peft"), fresh)
    assert (logits(fresh, batch) - ours).abs().max() <= TOL


def test_qlora_trains_merges_only_when_asked_and_detaches(saved):
    model, batch = load_quantized(saved, "llama", "nf4")
    # Train mode first: on CPUs with AVX512-BF16 bitsandbytes repacks 4-bit weights at the first
    # eval no-grad forward, and its repacked kernel has no backward (the delta warns about it).
    model.train()
    base = logits(model, batch, keep_mode=True)
    delta = LoraModel(model, lora_r=4, lora_alpha=8)
    delta.freeze_module()
    assert all(p.dtype == torch.float32 for p in delta.parameters())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        model(**batch).logits.square().mean().backward()
        optimizer.step()
    assert (logits(model, batch, keep_mode=True) - base).abs().max() > 1e-4
    model.eval()
    trained = logits(model, batch)
    slot = delta.slots[0]
    packed = slot.target.weight.data.clone()
    with pytest.raises(ValueError, match=r"requantiz.*merge\(dequantize=True\)"):
        delta.merge()
    assert not delta.is_merged
    delta.merge(dequantize=True)
    # The merged module computes x (W_deq + s B A)^T + b from a float copy; the packed weight is untouched.
    x = torch.randn(3, slot.target.in_features)
    with torch.no_grad():
        w = dequantized_weight(slot.target) + slot.delta.scaling * (slot.delta.lora_B @ slot.delta.lora_A)
        assert (slot.target(x) - x @ w.t()).abs().max() <= 1e-5
    assert torch.equal(slot.target.weight.data, packed)
    # Against the unmerged model only bitsandbytes' own matmul error remains.
    assert (logits(model, batch) - trained).abs().max() <= 2e-2
    delta.unmerge()
    assert torch.equal(logits(model, batch), trained)  # exactly the unmerged outputs again
    delta.detach()
    base = logits(model, batch)
    delta.attach()
    assert torch.equal(logits(model, batch), trained)
    delta.detach()
    assert torch.equal(logits(model, batch), base)
    delta.attach()
    with pytest.raises(ValueError, match="dequantize=True"):
        delta.merge_and_unload()
    delta.merge(dequantize=True)
    merged = logits(model, batch)
    delta.unmerge()
    plain = delta.merge_and_unload(dequantize=True)
    assert type(plain.get_submodule(slot.path)) is torch.nn.Linear
    assert (logits(plain, batch) - merged).abs().max() <= TOL


def test_adapters_and_bitfit_on_a_quantized_base(saved):
    model, batch = load_quantized(saved, "llama", "int8")
    base = logits(model, batch)
    adapter = AdapterModel(model, bottleneck_dim=8)
    bitfit = BitFitModel(model)
    randomize(adapter, 2)
    randomize(bitfit, 3)
    changed = logits(model, batch)
    assert (changed - base).abs().max() > 1e-3
    model.train()
    model(**batch).logits.square().mean().backward()
    assert all(p.grad is not None for p in [*adapter.parameters(), *bitfit.parameters()])
    bitfit.merge()  # BitFit on a bitsandbytes layer keeps running routed: nothing is folded
    adapter.detach()
    bitfit.detach()
    model.eval()
    assert torch.equal(logits(model, batch), base)
