"""Structure inference (odelta_fast/structure/inference.py): the tables are its oracle, and models
that are not from transformers at all get the same names and default targets."""
from __future__ import annotations

import time
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odelta_fast import AdapterModel, BitFitModel, LoraModel
from odelta_fast.addressing import NOT_A_PROJECTION, OWN_FORWARD, PLAIN_LINEAR, linear_forward_kind, select_modules
from odelta_fast.structure import UnmappedArchitectureWarning, describe, structure_map

from helpers import randomize_, routed_modules
from tiny_models import ARCHITECTURES, VARIANTS, tiny_model

# --------------------------------------------------------------------------- the tables as oracle


def _assert_same_map(model):
    table = structure_map(model)
    inferred = structure_map(model, use_tables=False)
    assert set(table.sources.values()) == {"table"} and set(inferred.sources.values()) == {"inferred"}
    assert not table.inferred and inferred.inferred
    order = [p for p, _ in model.named_modules()]
    table_names, inferred_names = dict(table.items()), dict(inferred.items())
    differences = [f"{raw}: table {table_names.get(raw)}, inferred {inferred_names.get(raw)}"
                   for raw in order if table_names.get(raw) != inferred_names.get(raw)]
    assert differences == []
    assert inferred.output_head_paths() == table.output_head_paths()
    assert inferred.fused_names == table.fused_names
    assert list(inferred.roots) == list(table.roots)


@pytest.mark.parametrize("arch", ARCHITECTURES + VARIANTS)
def test_inference_reproduces_the_table(arch):
    _assert_same_map(tiny_model(arch)[0])


@pytest.mark.parametrize("arch, kwargs", [
    ("bert", dict(is_decoder=True, add_cross_attention=True)),  # cross-attention in a single stack
    ("gpt2", dict(add_cross_attention=True)),  # cross-attention with a query plus packed key/value
    ("falcon", dict(new_decoder_architecture=False, parallel_attn=True, num_kv_heads=1)),  # one norm
    ("falcon", dict(new_decoder_architecture=False, parallel_attn=False, num_kv_heads=1)),  # norms named only
    ("albert", dict(num_hidden_groups=2, num_hidden_layers=4)),  # lists of blocks nested in groups
    ("llama", dict(num_hidden_layers=1)),  # a list with one block
    ("llama", dict(intermediate_size=32)),  # feed-forward as wide as the block
    ("bert", dict(head="BertForMaskedLM")),
    ("bert", dict(head="BertModel")),
    ("vit", dict(head="ViTModel")),
])
def test_inference_reproduces_the_table_on_other_layouts(arch, kwargs):
    _assert_same_map(tiny_model(arch, **kwargs)[0])


def test_encoder_only_t5_is_one_unprefixed_stack_when_inferred():
    """The one justified difference: T5's table names ``T5EncoderModel`` with ``encoder.`` as in
    the full model; inference sees a single stack, which carries no prefix."""
    model, _ = tiny_model("t5", head="T5EncoderModel")
    table, inferred = structure_map(model), structure_map(model, use_tables=False)
    assert table.common_name("encoder.block.1.layer.0.SelfAttention.q") == "encoder.block.1.attn.q"
    assert inferred.common_name("encoder.block.1.layer.0.SelfAttention.q") == "block.1.attn.q"
    assert {c.removeprefix("encoder.") for _, c in table.items() if c != "embeddings"} == \
        {c for _, c in inferred.items()}


def test_a_table_is_used_where_there_is_one():
    model, _ = tiny_model("llama")
    smap = structure_map(model)
    assert smap.sources == {"": "table"} and not smap.inferred
    assert "table" in repr(smap) and "llama at the model itself: table" in smap.describe()


# --------------------------------------------------------------------------- models not from transformers


class GPTAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=-1)
        q, k, v = (y.view(b, t, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, c))


class GPTBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = GPTAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A user's own GPT, nanoGPT style: nothing from transformers."""

    def __init__(self, vocab=50, width=32, heads=4, depth=3, positions=16):
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(positions, width)
        self.h = nn.ModuleList([GPTBlock(width, heads) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class ViTAttention(nn.Module):
    """Separate q/k/v under neutral names: only shapes and order tell them apart."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.a, self.b, self.c = (nn.Linear(width, width) for _ in range(3))
        self.d = nn.Linear(width, width)

    def forward(self, x):
        n, t, c = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2) for p in (self.a, self.b, self.c))
        return self.d(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c))


class ViTBlock(nn.Module):
    def __init__(self, width, heads, hidden):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.mixer = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        x = x + self.mixer(self.norm1(x))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyViT(nn.Module):
    def __init__(self, width=32, heads=4, depth=2, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, width, kernel_size=4, stride=4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.blocks = nn.Sequential(*[ViTBlock(width, heads, 3 * width) for _ in range(depth)])
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, pixels):
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.head(self.norm(self.blocks(x))[:, 0])


def _names(smap):
    return {c: r for r, c in smap.items()}


def test_plain_pytorch_gpt_is_inferred():
    model = TinyGPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmappedArchitectureWarning)
        smap = structure_map(model)
    assert smap.mapped and smap.inferred and smap.sources == {"": "inferred"} and smap.model_type == "TinyGPT"
    names = _names(smap)
    assert names["embeddings"] == "wte"
    assert names["lm_head"] == "lm_head" and smap.output_head_paths() == {"lm_head"}
    for i in range(3):
        assert names[f"block.{i}"] == f"h.{i}"
        assert names[f"block.{i}.attn"] == f"h.{i}.attn"
        assert names[f"block.{i}.attn.qkv"] == f"h.{i}.attn.c_attn"
        assert names[f"block.{i}.attn.o"] == f"h.{i}.attn.c_proj"
        assert names[f"block.{i}.ff"] == f"h.{i}.mlp"
        assert names[f"block.{i}.ff.w1"] == f"h.{i}.mlp.0"
        assert names[f"block.{i}.ff.w2"] == f"h.{i}.mlp.2"
        assert names[f"block.{i}.attn.layer_norm"] == f"h.{i}.ln_1"
        assert names[f"block.{i}.ff.layer_norm"] == f"h.{i}.ln_2"
    assert "block.3" not in names and smap.fused_qkv


def test_plain_pytorch_vit_with_neutral_names_is_inferred_by_shapes_and_order():
    model = TinyViT()
    names = _names(structure_map(model))
    assert names["embeddings"] == "patch" and names["lm_head"] == "head"
    assert {k: v for k, v in names.items() if k.startswith("block.1")} == {
        "block.1": "blocks.1", "block.1.attn": "blocks.1.mixer",
        "block.1.attn.q": "blocks.1.mixer.a", "block.1.attn.k": "blocks.1.mixer.b",
        "block.1.attn.v": "blocks.1.mixer.c", "block.1.attn.o": "blocks.1.mixer.d",
        "block.1.ff.w1": "blocks.1.up", "block.1.ff.w2": "blocks.1.down",
        "block.1.attn.layer_norm": "blocks.1.norm1", "block.1.ff.layer_norm": "blocks.1.norm2",
    }


def _train_detach_roundtrip(model, inputs, delta):
    with torch.no_grad():
        original = model(inputs)
    delta.freeze_module(set_state_dict=False)
    randomize_(delta.parameters())
    model(inputs).pow(2).mean().backward()
    delta_ids = {id(p) for p in delta.parameters()}
    for p in model.parameters():
        assert (p.grad is not None) == (id(p) in delta_ids)
        if p.grad is not None:
            assert torch.isfinite(p.grad).all()
    with torch.no_grad():
        assert not torch.equal(model(inputs), original)
    delta.remove()
    assert routed_modules(model) == []
    with torch.no_grad():
        assert torch.equal(model(inputs), original)


@pytest.mark.parametrize("make, inputs", [
    (TinyGPT, torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))),
    (TinyViT, torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))),
])
def test_default_targets_on_plain_pytorch_models(make, inputs):
    torch.manual_seed(0)
    model = make().eval()
    lora = LoraModel(model, lora_r=2)
    expected = "attn.qkv" if make is TinyGPT else ("attn.q", "attn.v")
    smap = lora.structure
    assert {smap.common_name(s.path).split(".", 2)[-1] for s in lora.slots} == (
        {expected} if isinstance(expected, str) else set(expected))
    _train_detach_roundtrip(model, inputs, lora)

    adapter = AdapterModel(model, bottleneck_dim=4)
    assert {smap.common_name(s.path).split(".", 2)[-1] for s in adapter.slots} == {"attn.o", "ff.w2"}
    _train_detach_roundtrip(model, inputs, adapter)

    bitfit = BitFitModel(model)
    head = "lm_head" if make is TinyGPT else "head"
    assert head not in {s.path for s in bitfit.slots} and len(bitfit.slots) > 4
    _train_detach_roundtrip(model, inputs, bitfit)


class Experts(nn.Module):
    """A mixture-of-experts feed-forward: the experts' weights are one 3-D tensor each."""

    def __init__(self, width, hidden, experts):
        super().__init__()
        self.router = nn.Linear(width, experts, bias=False)
        self.up = nn.Parameter(torch.randn(experts, hidden, width) * 0.1)
        self.down = nn.Parameter(torch.randn(experts, width, hidden) * 0.1)

    def forward(self, h):
        gates = torch.softmax(self.router(h), dim=-1)
        expert_out = torch.einsum("btd,ehd->bteh", h, self.up).relu()
        expert_out = torch.einsum("bteh,edh->bted", expert_out, self.down)
        return (gates.unsqueeze(-1) * expert_out).sum(-2)


class MoEBlock(nn.Module):
    def __init__(self, width=16, hidden=24, experts=4):
        super().__init__()
        self.norm_a = nn.LayerNorm(width)
        self.attention = nn.ModuleDict({n: nn.Linear(width, width) for n in ("q", "k", "v", "o")})
        self.norm_b = nn.LayerNorm(width)
        self.moe = Experts(width, hidden, experts)

    def forward(self, x):
        a = self.attention
        h = self.norm_a(x)
        scores = torch.softmax(a["q"](h) @ a["k"](h).transpose(-1, -2) / 4, dim=-1)
        x = x + a["o"](scores @ a["v"](h))
        return x + self.moe(self.norm_b(x))


class TinyMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([MoEBlock() for _ in range(2)])
        # An adapter after a module without a weight of its own (the MoE) reads the width here.
        self.config = SimpleNamespace(hidden_size=16)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_mixture_of_experts_ff_has_no_single_projection_and_adapters_follow_it():
    torch.manual_seed(0)
    model = TinyMoE().eval()
    names = _names(structure_map(model))
    assert names["block.0.ff"] == "layers.0.moe"
    assert names["block.0.attn"] == "layers.0.attention" and names["block.0.attn.v"] == "layers.0.attention.v"
    assert not {"block.0.ff.w1", "block.0.ff.w2", "block.0.ff.gate"} & set(names)
    assert names["block.0.ff.layer_norm"] == "layers.0.norm_b"
    adapter = AdapterModel(model, bottleneck_dim=4)
    assert [s.path for s in adapter.slots] == ["layers.0.attention.o", "layers.0.moe",
                                               "layers.1.attention.o", "layers.1.moe"]
    _train_detach_roundtrip(model, torch.randn(2, 5, 16), adapter)


def test_mixed_dense_and_moe_blocks_get_an_adapter_after_each_ff():
    from odelta_fast.addressing import REGEX_PREFIX

    model, _ = tiny_model("llama")
    dense_mlp = model.model.layers[1].mlp
    moe = nn.Module()
    moe.up = nn.Parameter(torch.zeros(4, 64, 32))
    model.model.layers[1].mlp = moe
    adapter = AdapterModel(model, bottleneck_dim=4)
    assert adapter.modified_modules == ["attn.o", "ff.w2", REGEX_PREFIX + r"block\.1\.ff"]
    assert [s.path for s in adapter.slots if ".mlp" in s.path] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp"]
    model.model.layers[1].mlp = dense_mlp
    adapter.remove()


class MHABlock(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 32), nn.Linear(32, width)


def test_torch_multihead_attention_is_an_attention_with_its_output_projection():
    model = nn.Module()
    model.blocks = nn.ModuleList([MHABlock(), MHABlock()])
    names = _names(structure_map(model))
    assert names["block.1.attn"] == "blocks.1.attn" and names["block.1.attn.o"] == "blocks.1.attn.out_proj"
    assert names["block.1.ff.w1"] == "blocks.1.fc1" and names["block.1.attn.layer_norm"] == "blocks.1.ln"


def test_wrapper_holding_a_table_model_and_a_plain_model():
    wrapper = nn.Module()
    wrapper.text = tiny_model("bert")[0]
    wrapper.mine = TinyGPT()
    smap = structure_map(wrapper)
    assert smap.sources == {"text": "table", "mine": "inferred"}
    assert smap.paths("block.0.attn.q") == ["text.bert.encoder.layer.0.attention.self.query"]
    assert smap.paths("block.0.attn.qkv") == ["mine.h.0.attn.c_attn"]
    text = smap.describe()
    assert "bert at 'text': table" in text and "TinyGPT at 'mine': inferred" in text


def test_describe_folds_repeated_blocks_and_names_the_source():
    text = describe(TinyGPT(depth=5))
    assert text.splitlines()[0] == "TinyGPT at the model itself: inferred"
    assert "block.0.attn.qkv" in text and "h.0.attn.c_attn" in text
    assert "block.1 .. 4: laid out as block.0" in text and "block.3.attn" not in text
    assert "output heads (never selected by all-linear): lm_head" in text
    assert describe(nn.Linear(2, 2)) == "no common-structure map: raw module names only"


def test_models_without_blocks_stay_unmapped_with_one_warning():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        smap = structure_map(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    assert not smap.mapped and not smap.inferred
    assert sum(issubclass(w.category, UnmappedArchitectureWarning) for w in caught) == 1
    with pytest.raises(ValueError, match="structure is known"):
        LoraModel(nn.Sequential(nn.Linear(4, 4)))


class MambaLikeMixer(nn.Module):
    """A state-space mixer: packed input projection, a scan, an output projection. Its shapes
    could pass for a fused-qkv attention; ``x_proj`` reading the mixed width says otherwise."""

    def __init__(self, width=16, inner=32):
        super().__init__()
        self.in_proj = nn.Linear(width, 2 * inner)
        self.x_proj = nn.Linear(inner, 8)
        self.out_proj = nn.Linear(inner, width)


class MLPLayer(nn.Module):
    def __init__(self, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1, self.fc2 = nn.Linear(width, width), nn.Linear(width, width)


def test_no_attention_is_found_in_state_space_or_mlp_only_models():
    ssm = nn.Module()
    ssm.layers = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(16), "mixer": MambaLikeMixer()}) for _ in range(2)])
    mlp_stages = nn.Module()  # projections of different list items never form one attention
    mlp_stages.stages = nn.ModuleList([nn.ModuleDict({"layers": nn.ModuleList([MLPLayer(), MLPLayer()])})
                                       for _ in range(2)])
    for model in (ssm, mlp_stages):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnmappedArchitectureWarning)
            assert not structure_map(model).mapped


def test_inference_is_fast_on_a_deep_model():
    model = TinyGPT(depth=48)
    structure_map(model)  # warm caches of imported modules
    start = time.perf_counter()
    smap = structure_map(model)
    elapsed = time.perf_counter() - start
    assert smap.common_name("h.47.mlp.2") == "block.47.ff.w2"
    assert elapsed < 0.5, elapsed


# --------------------------------------------------------------------------- all-linear and Linear subclasses


class RouterLinear(nn.Linear):
    """A router like Llama-4's / Phi-MoE's: a Linear whose forward returns a tuple."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


class GroupedLinear(nn.Linear):
    """Like DeepSeek-V4's grouped output projection: reshapes its input into groups."""

    def __init__(self, per_group, out_features, groups):
        super().__init__(per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x):
        w = self.weight.view(self.groups, -1, x.shape[-1]).transpose(1, 2)
        y = torch.bmm(x.reshape(-1, self.groups, x.shape[-1]).transpose(0, 1), w).transpose(0, 1)
        return y.reshape(*x.shape[:-2], -1)


class ScaledLinear(nn.Linear):
    """A head with a learned output scale: a tensor of the right width, but not x W^T + b."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.scale = nn.Parameter(torch.full((n_out,), 2.0))

    def forward(self, x):
        return super().forward(x) * self.scale


class ExplicitLinear(nn.Linear):
    """Falcon-style: an override that computes exactly the projection."""

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class WithSubclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.plain = nn.Linear(8, 8)
        self.router = RouterLinear(8, 4)
        self.grouped = GroupedLinear(4, 8, groups=2)
        self.scaled = ScaledLinear(8, 8)
        self.explicit = ExplicitLinear(8, 8)

    def forward(self, x):
        weights, _ = self.router(x)
        y = self.explicit(self.plain(x)) + self.scaled(x) + weights.sum(-1, keepdim=True)
        return y + self.grouped(x.view(*x.shape[:-1], 2, 4)).sum(-1, keepdim=True)


def test_linear_forward_kinds():
    model = WithSubclasses()
    kinds = {name: linear_forward_kind(getattr(model, name)) for name in ("plain", "router", "grouped", "scaled", "explicit")}
    assert kinds == {"plain": PLAIN_LINEAR, "router": NOT_A_PROJECTION, "grouped": NOT_A_PROJECTION,
                     "scaled": OWN_FORWARD, "explicit": PLAIN_LINEAR}
    with torch.device("meta"):
        meta = WithSubclasses()
    assert linear_forward_kind(meta.router) == NOT_A_PROJECTION and linear_forward_kind(meta.scaled) == OWN_FORWARD


def test_all_linear_leaves_out_subclasses_that_are_no_projection_with_one_warning():
    model = WithSubclasses()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        selected = [p for p, _ in select_modules(model, ["all-linear"])]
    assert selected == ["plain", "scaled", "explicit"]
    messages = [str(w.message) for w in caught if "all-linear" in str(w.message)]
    assert len(messages) == 1 and "router (RouterLinear)" in messages[0] and "grouped (GroupedLinear)" in messages[0]


def test_lora_keeps_a_subclass_forward_and_refuses_what_is_no_projection():
    torch.manual_seed(0)
    model = WithSubclasses().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        original = model(x)
    with pytest.warns(UserWarning, match="all-linear leaves out"):
        lora = LoraModel(model, modified_modules=["all-linear"], lora_r=2)
    routes = {s.path: s.delta.route_kind for s in lora.slots}
    assert routes == {"plain": "replace", "scaled": "parallel", "explicit": "replace"}
    randomize_(lora.parameters())
    scaled = next(s for s in lora.slots if s.path == "scaled")
    with torch.no_grad():
        update = scaled.delta.parallel(model.scaled, (x,), {})
        assert torch.allclose(model.scaled(x), ScaledLinear.forward(model.scaled, x) + update)
        with_delta = model(x)
    lora.merge()  # the scaled head keeps routing: folding into its weight would be scaled too
    assert not scaled.delta.merged
    with torch.no_grad():
        assert torch.allclose(model(x), with_delta, atol=1e-6)
    lora.unmerge()
    lora.remove()
    with torch.no_grad():
        assert torch.equal(model(x), original)
    with pytest.raises(ValueError, match=r"router \(RouterLinear\).*does not return the projection"):
        LoraModel(model, modified_modules=["router"])
    assert routed_modules(model) == []


def test_bitfit_adds_to_a_subclass_output_and_skips_routers():
    model = WithSubclasses()
    bitfit = BitFitModel(model, modified_modules=["scaled", "plain"])
    fusable = {s.path: s.delta.can_fuse(s.target) for s in bitfit.slots}
    assert fusable == {"plain": True, "scaled": False}
    assert not next(s for s in bitfit.slots if s.path == "scaled").delta.mergeable
    bitfit.remove()
    from odelta_fast.methods.bitfit import _bias_targets

    assert {p for p, _ in _bias_targets(WithSubclasses())} == {"plain", "scaled", "explicit"}


# --------------------------------------------------------------------------- inspect --structure


def test_inspect_structure_prints_the_inferred_map(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "OlmoConfig"):
        pytest.skip("no OLMo in this transformers version")
    from odelta_fast.cli import main

    config = transformers.OlmoConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, max_position_embeddings=32, pad_token_id=0)
    transformers.OlmoForCausalLM(config).save_pretrained(str(tmp_path / "olmo"))
    assert main(["inspect", str(tmp_path / "olmo"), "--no-tree", "--structure"]) == 0
    out = capsys.readouterr().out
    assert "common-structure map: olmo (inferred)" in out
    assert "olmo at the model itself: inferred" in out
    assert "block.0.attn.q" in out and "model.layers.0.self_attn.q_proj" in out
    assert "block.1 .. 2: laid out as block.0" in out
    assert main(["inspect", str(tmp_path / "olmo"), "--no-tree", "--method", "adapter"]) == 0
    out = capsys.readouterr().out
    assert "select 6 modules" in out and "(common: block.2.ff.w2)" in out
