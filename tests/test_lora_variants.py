"""The LoRA variants: DoRA (on Linear, Conv1D, embeddings and convolutions), LoRA on
``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d``. Each op against a float64 reference (forward
and every gradient), each variant through the method checks on tiny models, and PEFT checkpoints
both ways with the real ``peft`` package (outputs within 1e-5)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odelta_fast import AutoDeltaModel, LoraModel, ops
from helpers import check_method_on_architecture, main_output, randomize_
from tiny_models import tiny_model

DTYPE_TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (3e-2, 3e-2)}


def _reference_dora(x, weight, bias, a, b, m, s):
    """PEFT's formula in float64, the norm a constant (detached) as PEFT and the paper treat it."""
    x, weight, a, b, m = (t.double() for t in (x, weight, a, b, m))
    adapted = weight + s * (b @ a)
    norm = adapted.norm(dim=1).detach()
    out = (m / norm) * (x @ weight.t() + s * (x @ a.t()) @ b.t())
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 1), (33, 72, 130, 8), (5, 200, 96, 16)], ids=str)
def test_dora_row_norm_matches_the_materialised_norm(shape, dtype):
    _, k, n, r = shape
    g = torch.Generator().manual_seed(0)
    weight, a, b = (torch.randn(*s, generator=g).to(dtype) for s in ((n, k), (r, k), (n, r)))
    got = ops.dora_row_norm(weight, a, b, 0.7)
    want = (weight.double() + 0.7 * (b.double() @ a.double())).norm(dim=1)
    # fp32 weights: fp32 throughout. 16-bit weights: W A^T is one GEMM in the weight's dtype (no fp32
    # copy of W per step), so the bound is twice torch's own bf16 rounding (the norm of W + s B A
    # computed in bf16, as PEFT does, is off by up to 2^-8 relative).
    rtol = 1e-5 if dtype == torch.float32 else 2 * 2**-8
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(0, 9, 5, 2), (1, 7, 5, 1), (33, 72, 130, 8)], ids=str)
def test_dora_linear_forward_and_every_gradient(shape, with_bias, dtype):
    mrows, k, n, r = shape
    g = torch.Generator().manual_seed(1)

    def leaf(*size):
        return torch.randn(*size, generator=g).to(dtype).requires_grad_()

    x, weight, a, b = leaf(mrows, k), leaf(n, k), leaf(r, k), leaf(n, r)
    m = (torch.rand(n, generator=g) + 0.5).to(dtype).requires_grad_()
    bias = leaf(n) if with_bias else None
    out = ops.dora_linear(x, weight, bias, a, b, m, 0.5)
    ref = _reference_dora(x, weight, bias, a, b, m, 0.5)
    rtol, atol = DTYPE_TOL[dtype]
    peak = ref.abs().max().item() if ref.numel() else 0.0
    torch.testing.assert_close(out.double(), ref, rtol=rtol, atol=atol * max(1.0, peak))
    grad = torch.randn(out.shape, generator=g).to(dtype)
    leaves = [t for t in (x, weight, a, b, m, bias) if t is not None]
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    want = torch.autograd.grad(ref, leaves, grad.double(), allow_unused=True)
    for name, gg, ww in zip("x weight a b m bias".split(), got, want):
        if ww is None:
            continue
        scale = max(1.0, ww.abs().max().item() if ww.numel() else 0.0)
        assert gg is not None, name
        torch.testing.assert_close(gg.double(), ww.double(), rtol=rtol * 4, atol=atol * 4 * scale,
                                   msg=lambda text, name=name: f"{name}: {text}")


def test_embedding_update_is_a_gather_equal_to_the_dense_product():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 11, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 3, 10, 3], [1, 0, 2, 9]])
    out = ops.lora_embedding_update(ids, a, b, 0.25, padding_idx=0)
    dense = (F.one_hot(ids, 11).double() @ a.t()) @ b.t() * 0.25
    dense = dense.masked_fill((ids == 0).unsqueeze(-1), 0.0) + out.detach() * 0  # the padding row: no update
    torch.testing.assert_close(out.masked_fill((ids == 0).unsqueeze(-1), 0.0), dense)
    out.sum().backward()
    assert torch.all(a.grad[:, 0] == 0), "the padding row gets no gradient"


@pytest.mark.parametrize("dims", [1, 2])
def test_conv_update_matches_the_merged_weight(dims):
    g = torch.Generator().manual_seed(3)
    conv = (nn.Conv1d(4, 6, 3, padding=1, stride=2) if dims == 1 else nn.Conv2d(4, 6, 3, padding=1, dilation=2)).double()
    x = torch.randn(2, 4, *([9] * dims), generator=g, dtype=torch.float64)
    a = torch.randn(3, *conv.weight.shape[1:], generator=g, dtype=torch.float64)
    b = torch.randn(6, 3, *([1] * dims), generator=g, dtype=torch.float64)
    update = ops.lora_conv_update(x, a, b, 0.5, stride=conv.stride, padding=conv.padding, dilation=conv.dilation)
    merged = conv.weight + 0.5 * (b.view(6, 3) @ a.view(3, -1)).view(conv.weight.shape)
    fn = F.conv1d if dims == 1 else F.conv2d
    want = fn(x, merged, conv.bias, conv.stride, conv.padding, conv.dilation)
    torch.testing.assert_close(conv(x) + update, want)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_dora_passes_the_method_checks(arch, tmp_path):
    check_method_on_architecture(arch, lambda m: LoraModel(m, lora_r=4, use_dora=True), tmp_path)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_lora_on_the_token_embedding_passes_the_method_checks(arch, dora, tmp_path):
    check_method_on_architecture(
        arch, lambda m: LoraModel(m, lora_r=4, use_dora=dora, modified_modules=["embeddings"]), tmp_path)


class _Convs(nn.Module):
    """A small model with every convolution LoRA targets here, plus a plain Linear."""

    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1d = nn.Conv1d(8, 6, 3, padding="same")
        self.emb = nn.Embedding(10, 6, padding_idx=0)
        self.head = nn.Linear(6, 2)

    def forward(self, x, ids):
        h = self.conv2d(x).mean(-1)
        h = self.conv1d(h).mean(-1) + self.emb(ids).mean(1)
        return self.head(h)


def _conv_inputs():
    g = torch.Generator().manual_seed(4)
    return torch.randn(2, 3, 5, 5, generator=g), torch.randint(0, 10, (2, 4), generator=g)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_convolutions_and_embeddings_train_merge_and_detach(dora):
    torch.manual_seed(0)
    model = _Convs().eval()
    inputs = _conv_inputs()
    base = model(*inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not a transformers model: raw names
        delta = LoraModel(model, lora_r=2, use_dora=dora, modified_modules=["conv2d", "conv1d", "emb"])
    assert torch.allclose(model(*inputs), base, atol=1e-6)  # a fresh delta is a no-op
    randomize_(delta.parameters())
    if dora:
        with torch.no_grad():
            for slot in delta.slots:
                slot.delta.lora_magnitude_vector.mul_(1.2)
    routed = model(*inputs)
    delta.freeze_module()
    model.train()
    model(*inputs).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in delta.parameters())
    model.eval()
    delta.merge()
    torch.testing.assert_close(model(*inputs), routed, rtol=1e-5, atol=1e-5)
    delta.unmerge()
    assert torch.equal(model(*inputs), routed)
    delta.detach()
    assert torch.equal(model(*inputs), base)


def test_all_linear_is_unchanged_and_embeddings_name_the_token_embedding():
    model, _ = tiny_model("bert")
    delta = LoraModel(model, modified_modules=["all-linear"])
    assert all(isinstance(s.target, nn.Linear) for s in delta.slots)
    bert, _ = tiny_model("bert")
    assert [s.path for s in LoraModel(bert, modified_modules=["embeddings"]).slots] == ["bert.embeddings.word_embeddings"]
    llama, _ = tiny_model("llama")
    assert [s.path for s in LoraModel(llama, modified_modules=["embeddings"]).slots] == ["model.embed_tokens"]


def test_dora_must_compute_its_module_output():
    model, _ = tiny_model("llama")
    LoraModel(model, lora_r=2, modified_modules=["attn.q"])
    with pytest.raises(ValueError, match="DoRA must be the first"):
        LoraModel(model, lora_r=2, modified_modules=["attn.q"], use_dora=True)


# ---------------------------------------------------------------------- PEFT, both ways
peft = pytest.importorskip("peft")

PEFT_CASES = {
    "llama": ["q_proj", "v_proj", "embed_tokens"],
    "gpt2": ["c_attn", "wte"],
    "bert": ["query", "value", "word_embeddings"],
}


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("arch", sorted(PEFT_CASES))
def test_peft_variant_checkpoints_load_both_ways(arch, dora, tmp_path):
    model, inputs = tiny_model(arch)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=PEFT_CASES[arch], use_dora=dora,
                             init_lora_weights=False, fan_in_fan_out=arch == "gpt2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(model, config)
        with torch.no_grad():  # move the magnitudes away from their initial norms
            for name, p in peft_model.named_parameters():
                if "magnitude" in name:
                    p.mul_(1.1)
        peft_model.eval()
        expected = main_output(peft_model, inputs)
        peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh, _ = tiny_model(arch)
    ours = AutoDeltaModel.from_finetuned(str(tmp_path / "peft"), fresh)
    assert ours.use_dora == dora
    torch.testing.assert_close(main_output(fresh, inputs), expected, rtol=1e-5, atol=1e-5)
    ours.save_finetuned(str(tmp_path / "ours"), format="peft")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(tiny_model(arch)[0], str(tmp_path / "ours")).eval()
    torch.testing.assert_close(main_output(back, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_peft_convolution_checkpoints_load_both_ways(dora, tmp_path):
    inputs = _conv_inputs()
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(_Convs(), peft.LoraConfig(
            r=2, target_modules=["conv2d", "conv1d", "emb"], init_lora_weights=False, use_dora=dora)).eval()
        expected = peft_model(*inputs)
        peft_model.save_pretrained(str(tmp_path / "peft"))
        torch.manual_seed(1)
        fresh = _Convs().eval()
        ours = LoraModel.from_peft(str(tmp_path / "peft"), fresh)
    torch.testing.assert_close(fresh(*inputs), expected, rtol=1e-5, atol=1e-5)
    ours.save_finetuned(str(tmp_path / "ours"), format="peft")
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = peft.PeftModel.from_pretrained(_Convs(), str(tmp_path / "ours")).eval()
    torch.testing.assert_close(back(*inputs), expected, rtol=1e-5, atol=1e-5)
