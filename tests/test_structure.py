"""Common structure names (odelta_fast.structure) across architectures."""

from __future__ import annotations

import functools
import time
import warnings

import pytest
import torch
from torch import nn

from odelta_fast.structure import (
    MODEL_TYPES,
    StructureMap,
    UnmappedArchitectureWarning,
    structure_map,
)

try:
    from tiny_models import ARCHITECTURES, HIDDEN, LAYERS, VARIANTS, VOCAB, tiny_model
except ImportError:  # tests/ imported as a package
    from tests.tiny_models import ARCHITECTURES, HIDDEN, LAYERS, VARIANTS, VOCAB, tiny_model

REQUIRED = {
    "bert", "roberta", "distilbert", "electra", "deberta-v2", "gpt2", "gpt_neo", "gptj",
    "gpt_neox", "opt", "bloom", "falcon", "llama", "mistral", "qwen2", "gemma", "phi", "t5",
    "bart", "vit",
}
FUSED_QKV = {"gpt2", "gpt_bigcode", "gpt_neox", "bloom", "falcon", "mpt", "phi3"}
GATED_FF = {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "t5-gated", "mt5"}
# One norm feeds attention and MLP in parallel; it is named attn.layer_norm.
SINGLE_NORM = {"gptj", "phi"}
# Separate MLP container module (BERT-style layers split it into intermediate/output).
NO_FF_MODULE = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "albert",
                "deberta-v2", "opt", "bart", "mbart"}
MAYBE_FF_MODULE = {"vit"}  # transformers 5 has vit...mlp, 4.x splits it like BERT
ENC_DEC = {"t5", "t5-gated", "mt5", "bart", "mbart"}
CLASSIFIERS = {"bert", "roberta", "xlm-roberta", "camembert", "electra", "albert", "distilbert",
               "deberta-v2", "vit"}
PHYSICAL_BLOCKS = {"albert": 1}  # ALBERT shares one layer across depth

ALL = ARCHITECTURES + VARIANTS


@functools.lru_cache(maxsize=None)
def _built(arch: str):
    """(model, inputs, StructureMap) shared by read-only tests."""
    model, inputs = tiny_model(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmappedArchitectureWarning)
        smap = structure_map(model)
    return model, inputs, smap


def _by_name(smap: StructureMap) -> dict[str, str]:
    names = [c for _, c in smap.items()]
    assert len(names) == len(set(names)), "a common name maps to several modules of one model"
    return {c: r for r, c in smap.items()}


def _io(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D":  # GPT-2: weight is (in, out)
        return tuple(module.weight.shape)
    raise AssertionError(f"{type(module).__name__} is not a linear projection")


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + ".")


# --------------------------------------------------------------------------- coverage


def test_required_architectures_are_mapped_and_tested():
    assert REQUIRED <= set(ARCHITECTURES)
    assert len(ARCHITECTURES) >= 20
    assert set(ARCHITECTURES) <= set(MODEL_TYPES)


@pytest.mark.parametrize("arch", ALL)
def test_tiny_model_reports_its_model_type(arch):
    model, _, smap = _built(arch)
    assert smap.mapped
    assert smap.model_type == model.config.model_type
    assert smap.fused_qkv == (arch in FUSED_QKV)


# --------------------------------------------------------------------------- per architecture


@pytest.mark.parametrize("arch", ALL)
def test_common_names_resolve_to_plausible_modules(arch):
    model, _, smap = _built(arch)
    modules = dict(model.named_modules())
    names = _by_name(smap)
    for raw in names.values():
        assert raw in modules
    stacks = ["encoder.", "decoder."] if arch in ENC_DEC else [""]
    if arch not in ENC_DEC:
        assert not any(c.startswith(("encoder.", "decoder.")) for c in names)
    else:
        assert not any(c.startswith("block.") for c in names)

    n_blocks = PHYSICAL_BLOCKS.get(arch, LAYERS)
    for p in stacks:
        leaves0 = {c[len(f"{p}block.0."):] for c in names if c.startswith(f"{p}block.0.")}
        for i in range(n_blocks):
            block = names[f"{p}block.{i}"]
            leaves = {c[len(f"{p}block.{i}."):] for c in names if c.startswith(f"{p}block.{i}.")}
            assert leaves == leaves0
            for leaf in leaves:
                assert _under(names[f"{p}block.{i}.{leaf}"], block)
        assert f"{p}block.{n_blocks}" not in names

        def get(leaf):
            return modules[names[f"{p}block.0.{leaf}"]]

        attn = names[f"{p}block.0.attn"]
        assert not isinstance(modules[attn], nn.Linear)
        if arch in FUSED_QKV:
            assert not {"attn.q", "attn.k", "attn.v"} & leaves0
            hidden_in, qkv_out = _io(get("attn.qkv"))
            assert hidden_in == HIDDEN and qkv_out > HIDDEN  # at least q plus k,v
            assert _under(names[f"{p}block.0.attn.qkv"], attn)
        else:
            assert "attn.qkv" not in leaves0
            qkv = [get(f"attn.{x}") for x in "qkv"]
            assert len({id(m) for m in qkv}) == 3
            for x in "qkv":
                assert _io(get(f"attn.{x}"))[0] == HIDDEN
                assert _under(names[f"{p}block.0.attn.{x}"], attn)
        assert _io(get("attn.o"))[1] == HIDDEN
        assert _under(names[f"{p}block.0.attn.o"], attn)

        w1_in, w1_out = _io(get("ff.w1"))
        w2_in, w2_out = _io(get("ff.w2"))
        assert w1_in == HIDDEN and w2_out == HIDDEN and w1_out > HIDDEN  # up, then down
        assert w1_out == (2 * w2_in if "ff.w1" in smap.fused_names else w2_in)
        if arch in GATED_FF:
            assert _io(get("ff.gate")) == (w1_in, w1_out)
        else:
            assert "ff.gate" not in leaves0
        if arch not in NO_FF_MODULE | MAYBE_FF_MODULE:
            assert "ff" in leaves0
        if "ff" in leaves0:
            for leaf in ("ff.w1", "ff.w2", "ff.gate"):
                if leaf in leaves0:
                    assert _under(names[f"{p}block.0.{leaf}"], names[f"{p}block.0.ff"])

        assert _is_norm(get("attn.layer_norm"))
        if arch in SINGLE_NORM:
            assert "ff.layer_norm" not in leaves0
        else:
            assert _is_norm(get("ff.layer_norm"))
            assert get("ff.layer_norm") is not get("attn.layer_norm")

        if p == "decoder.":
            for x in ("q", "k", "v"):
                assert _io(get(f"crossattn.{x}"))[0] == HIDDEN
            assert _io(get("crossattn.o"))[1] == HIDDEN
            assert get("crossattn") is not get("attn")
            assert _is_norm(get("crossattn.layer_norm"))
        else:
            assert not any(leaf.startswith("crossattn") for leaf in leaves0)

    embeddings = modules[names["embeddings"]]
    if arch != "vit":
        tables = [m for m in embeddings.modules() if isinstance(m, nn.Embedding)]
        assert any(t.num_embeddings == VOCAB for t in tables)

    lm_head = modules[names["lm_head"]]
    expected_out = model.config.num_labels if arch in CLASSIFIERS else VOCAB
    assert _io(lm_head)[1] == expected_out


@pytest.mark.parametrize("arch", ALL)
def test_mapped_projections_run_in_forward(arch):
    """Catches names that point at modules the forward pass never calls."""
    model, inputs, smap = _built(arch)
    modules = dict(model.named_modules())
    watched = {r for r, c in smap.items()
               if c == "lm_head" or (".block.0." in f".{c}" and isinstance(modules[r], nn.Linear))}
    called = set()
    handles = [modules[r].register_forward_hook(lambda m, i, o, r=r: called.add(r)) for r in watched]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    assert watched and called == watched


@pytest.mark.parametrize("arch", sorted(set(ALL) - FUSED_QKV))
def test_attn_v_is_the_value_projection(arch):
    """With v zeroed, the attention mix entering attn.o is zero; with q zeroed it is not.

    (q and k are symmetric in the scores, so only v can be told apart this way.)
    """
    model, inputs = tiny_model(arch)
    names = _by_name(structure_map(model))
    p = "decoder." if arch in ENC_DEC else ""
    modules = dict(model.named_modules())
    o = modules[names[f"{p}block.0.attn.o"]]

    def o_input_after_zeroing(leaf):
        seen = []
        proj = modules[names[f"{p}block.0.attn.{leaf}"]]
        saved = {k: v.clone() for k, v in proj.state_dict().items()}
        handle = o.register_forward_hook(lambda m, i, out: seen.append(i[0]))
        try:
            with torch.no_grad():
                for param in proj.parameters():
                    param.zero_()
                model(**inputs)
        finally:
            handle.remove()
            proj.load_state_dict(saved)
        return seen[0]

    assert torch.count_nonzero(o_input_after_zeroing("v")) == 0
    assert torch.count_nonzero(o_input_after_zeroing("q")) > 0


@pytest.mark.parametrize("arch", sorted(set(ALL) & GATED_FF))
def test_ff_w1_is_the_linear_branch_and_gate_the_activated_one(arch):
    model, _ = tiny_model(arch)
    names = _by_name(structure_map(model))
    p = "encoder." if arch in ENC_DEC else ""
    modules = dict(model.named_modules())
    ff = modules[names[f"{p}block.0.ff"]]
    x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # gate pre-activations of O(1): where the activation is least linear
        x = x / modules[names[f"{p}block.0.ff.gate"]](x).std()

    def relative_error_of_linearity(leaf):
        weight = modules[names[f"{p}block.0.{leaf}"]].weight
        with torch.no_grad():
            y = ff(x)
            weight.mul_(3)
            try:
                y3 = ff(x)
            finally:
                weight.div_(3)
        return ((y3 - 3 * y).norm() / (3 * y).norm()).item()

    assert relative_error_of_linearity("ff.w1") < 1e-5
    assert relative_error_of_linearity("ff.gate") > 1e-2


@pytest.mark.parametrize("arch", ALL)
def test_output_heads_are_outside_the_backbone(arch):
    model, _, smap = _built(arch)
    heads = smap.output_head_paths()
    names = _by_name(smap)
    assert names["lm_head"] in heads
    blocks = [r for c, r in names.items() if c != "lm_head"]
    assert not any(_under(h, b) for h in heads for b in blocks)
    assert heads <= set(dict(model.named_modules()))


def test_items_follow_named_modules_order_and_agree_with_common_name():
    model, _, smap = _built("llama")
    order = [p for p, _ in model.named_modules()]
    raws = [r for r, _ in smap.items()]
    assert raws == [p for p in order if p in set(raws)]
    for raw, common in smap.items():
        assert smap.common_name(raw) == common
    assert smap.common_name("model.layers.1.self_attn.q_proj") == "block.1.attn.q"
    assert smap.common_name("model.rotary_emb") is None
    assert smap.common_name("no.such.path") is None
    assert smap.paths("block.1.ff.w2") == ["model.layers.1.mlp.down_proj"]


# --------------------------------------------------------------------------- specific layouts


EXPLICIT_PATHS = {
    "bert": {"block.1.attn.q": "bert.encoder.layer.1.attention.self.query",
             "block.0.ff.w2": "bert.encoder.layer.0.output.dense",
             "lm_head": "classifier"},
    "gpt2": {"block.0.attn.qkv": "transformer.h.0.attn.c_attn",
             "block.1.ff.w1": "transformer.h.1.mlp.c_fc", "lm_head": "lm_head"},
    "t5": {"decoder.block.1.crossattn.q": "decoder.block.1.layer.1.EncDecAttention.q",
           "decoder.block.0.ff.w1": "decoder.block.0.layer.2.DenseReluDense.wi",
           "encoder.block.0.ff.w1": "encoder.block.0.layer.1.DenseReluDense.wi",
           "embeddings": "shared"},
    "bart": {"decoder.block.0.crossattn.o": "model.decoder.layers.0.encoder_attn.out_proj",
             "encoder.block.1.attn.k": "model.encoder.layers.1.self_attn.k_proj"},
    "roberta": {"lm_head": "classifier.out_proj"},
    "gemma2": {"block.0.ff.layer_norm": "model.layers.0.pre_feedforward_layernorm"},
    "phi3": {"block.0.attn.qkv": "model.layers.0.self_attn.qkv_proj",
             "block.0.ff.w1": "model.layers.0.mlp.gate_up_proj"},
}


@pytest.mark.parametrize("arch", sorted(EXPLICIT_PATHS))
def test_explicit_paths_for_representative_models(arch):
    if arch not in ALL:
        pytest.skip(f"{arch} is not in this transformers version")
    names = _by_name(_built(arch)[2])
    for common, raw in EXPLICIT_PATHS[arch].items():
        assert names.get(common) == raw, common


@pytest.mark.skipif("phi3" not in ALL, reason="no Phi-3 in this transformers version")
def test_phi3_fused_gate_up_is_flagged():
    _, _, smap = _built("phi3")
    assert smap.fused_names == {"attn.qkv", "ff.w1"}
    _, _, llama = _built("llama")
    assert llama.fused_names == frozenset() and not llama.fused_qkv


@pytest.mark.parametrize("overrides, norms", [
    (dict(new_decoder_architecture=False, parallel_attn=True, num_kv_heads=1),
     {"attn.layer_norm": "input_layernorm"}),
    (dict(new_decoder_architecture=False, parallel_attn=False, num_kv_heads=1),
     {"attn.layer_norm": "input_layernorm", "ff.layer_norm": "post_attention_layernorm"}),
])
def test_falcon_layer_norm_layouts(overrides, norms):
    model, _ = tiny_model("falcon", **overrides)
    names = _by_name(structure_map(model))
    got = {k: names[f"block.0.{k}"].rsplit(".", 1)[1] for k in ("attn.layer_norm", "ff.layer_norm")
           if f"block.0.{k}" in names}
    assert got == norms


@pytest.mark.parametrize("arch, raw", [
    ("bert", "bert.encoder.layer.0.crossattention.self.query"),
    ("gpt2", "transformer.h.0.crossattention.q_attn"),
])
def test_decoder_cross_attention_of_single_stack_models(arch, raw):
    model, _ = tiny_model(arch, is_decoder=True, add_cross_attention=True)
    smap = structure_map(model)
    assert smap.common_name(raw) == "block.0.crossattn.q"


def test_base_model_without_head():
    model, _ = tiny_model("bert", head="BertModel")
    smap = structure_map(model)
    assert smap.common_name("encoder.layer.0.attention.self.query") == "block.0.attn.q"
    assert smap.output_head_paths() == set()
    assert "lm_head" not in _by_name(smap)
    assert smap.common_name("pooler.dense") is None


def test_masked_lm_head_is_the_decoder_projection():
    model, _ = tiny_model("bert", head="BertForMaskedLM")
    smap = structure_map(model)
    heads = smap.output_head_paths()
    assert _by_name(smap)["lm_head"] == "cls.predictions.decoder"
    assert {"cls", "cls.predictions.transform.dense", "cls.predictions.decoder"} <= heads
    assert not any(h.startswith("bert.") for h in heads)


# --------------------------------------------------------------------------- wrappers


class _Wrapper(nn.Module):
    def __init__(self, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _no_unmapped_warning(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmappedArchitectureWarning)
        return fn(*args)


def test_wrapped_model_paths_are_relative_to_the_wrapper():
    inner, _ = tiny_model("bert")
    wrapper = _Wrapper(inner=inner, my_head=nn.Linear(2, 2))
    smap = _no_unmapped_warning(structure_map, wrapper)
    assert smap.mapped and smap.model_type == "bert"
    assert smap.common_name("inner.bert.encoder.layer.0.attention.self.query") == "block.0.attn.q"
    assert smap.common_name("inner.bert.encoder.layer.1") == "block.1"
    assert smap.common_name("inner.classifier") == "lm_head"
    assert smap.common_name("bert.encoder.layer.0.attention.self.query") is None
    assert smap.common_name("my_head") is None
    assert "inner.classifier" in smap.output_head_paths()
    assert "my_head" not in smap.output_head_paths()
    direct = structure_map(inner)
    assert [c for _, c in smap.items()] == [c for _, c in direct.items()]


def test_deeply_nested_wrapper():
    llama, _ = tiny_model("llama")
    wrapper = _Wrapper(outer=_Wrapper(blocks=nn.ModuleList([llama])))
    smap = _no_unmapped_warning(structure_map, wrapper)
    assert smap.common_name("outer.blocks.0.model.layers.1.mlp.gate_proj") == "block.1.ff.gate"


def test_two_backbones_are_each_mapped():
    bert, _ = tiny_model("bert")
    gpt2, _ = tiny_model("gpt2")
    llama_a, _ = tiny_model("llama", seed=1)
    llama_b, _ = tiny_model("llama", seed=2)
    smap = _no_unmapped_warning(structure_map, _Wrapper(text=bert, lm=gpt2))
    assert set(smap.model_types) == {"bert", "gpt2"}
    assert smap.paths("block.0.attn.q") == ["text.bert.encoder.layer.0.attention.self.query"]
    assert smap.paths("block.0.attn.qkv") == ["lm.transformer.h.0.attn.c_attn"]
    assert smap.fused_qkv
    assert {"text.classifier", "lm.lm_head"} <= smap.output_head_paths()

    smap = structure_map(_Wrapper(a=llama_a, b=llama_b))
    assert smap.paths("block.1.attn.o") == ["a.model.layers.1.self_attn.o_proj",
                                            "b.model.layers.1.self_attn.o_proj"]
    assert smap.paths("lm_head") == ["a.lm_head", "b.lm_head"]


# --------------------------------------------------------------------------- unmapped fallback


def _toy_hf_model():
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyConfig(PretrainedConfig):
        model_type = "odelta-toy"

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig
        base_model_prefix = "toy"

        def __init__(self, config):
            super().__init__(config)
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
            self.post_init()

    return ToyModel(ToyConfig())


def _collect_warnings(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in caught if issubclass(w.category, UnmappedArchitectureWarning)]


def _assert_unmapped(smap: StructureMap, model: nn.Module):
    assert not smap.mapped and smap.model_type is None and not smap.fused_qkv
    assert list(smap.items()) == [] and smap.output_head_paths() == set()
    assert all(smap.common_name(p) is None for p, _ in model.named_modules())


def test_plain_module_warns_once_and_uses_raw_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

    def run():
        smap = structure_map(model)
        for _ in range(3):  # lookups must not warn again
            _assert_unmapped(smap, model)
        return smap

    _, caught = _collect_warnings(run)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Sequential" in message and "unmapped" in message and "raw module names" in message


def test_unknown_hf_model_type_warns_naming_the_type():
    model = _toy_hf_model()
    smap, caught = _collect_warnings(lambda: structure_map(model))
    _assert_unmapped(smap, model)
    assert len(caught) == 1
    assert "odelta-toy" in str(caught[0].message) and "ToyModel" in str(caught[0].message)


def test_partially_mapped_wrapper_warns_about_the_unmapped_part_only():
    llama, _ = tiny_model("llama")
    wrapper = _Wrapper(lm=llama, extra=_toy_hf_model())
    smap, caught = _collect_warnings(lambda: structure_map(wrapper))
    assert smap.mapped and smap.model_types == ("llama",)
    assert smap.common_name("lm.model.layers.0.self_attn.q_proj") == "block.0.attn.q"
    assert len(caught) == 1
    assert "odelta-toy" in str(caught[0].message) and "llama" not in str(caught[0].message)


def test_known_type_with_unrecognised_layout_is_inferred_instead():
    model, _ = tiny_model("llama")
    expected = {c for _, c in structure_map(model).items()}
    # A layout this version's table does not know (as after an upstream rename).
    model.model.decoder_blocks = model.model.layers
    del model.model.layers
    smap, caught = _collect_warnings(lambda: structure_map(model))
    assert caught == []
    assert smap.mapped and smap.sources == {"": "inferred"} and smap.model_type == "llama"
    assert smap.common_name("model.decoder_blocks.1.self_attn.q_proj") == "block.1.attn.q"
    assert {c for _, c in smap.items()} == expected


# --------------------------------------------------------------------------- misc


def test_structure_map_is_fast_on_a_deep_model():
    model, _ = tiny_model("llama", num_hidden_layers=48)
    start = time.perf_counter()
    smap = structure_map(model)
    elapsed = time.perf_counter() - start
    assert smap.common_name("model.layers.47.mlp.down_proj") == "block.47.ff.w2"
    assert elapsed < 0.5, elapsed


@pytest.mark.parametrize("arch", ["llama", "bert", "t5"])
def test_tiny_model_is_deterministic(arch):
    (a, inputs_a), (b, inputs_b), (c, _) = tiny_model(arch, 3), tiny_model(arch, 3), tiny_model(arch, 4)
    for key in inputs_a:
        assert torch.equal(inputs_a[key], inputs_b[key])
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert all(v.dtype == torch.float32 for v in sa.values() if v.is_floating_point())
    assert not a.training
    if "attention_mask" in inputs_a:
        assert (inputs_a["attention_mask"] == 0).any()
