"""PEFT's own LoRA test cases for Linear and Conv1D targets, run through ``LoraModel.from_peft_config``
with the real ``peft`` package as the oracle.

The cases are PEFT's: the LoRA rows of ``tests/test_custom_models.py``'s ``TEST_CASES`` whose targets
are Linear or transformers Conv1D, on the same tiny custom models (``MLP`` with ``lin0`` / ``lin1``,
``EmbConv1D``), its rank / alpha pattern tests, ``tests/test_tuners_utils.py``'s target matching
cases (``REGEX_TEST_CASES``, targeted and excluded module names, ``all-linear``, layers_to_transform)
and ``tests/test_initialization.py``'s scaling-pattern cases. Each case builds the same config for
PEFT (``get_peft_model`` on a copy of the model) and for us, and checks: the same modules are
selected (or both refuse the config), and where the model has a forward, equal outputs with the
same weights, an equal training step, merge / unmerge, and save / load in both directions.

Not ported (PEFT features outside LoRA and DoRA on Linear / Conv1D / Embedding): KaSA, MiCA, VeLoRA, MonteCLoRA,
lora_bias, trainable_token_indices, Conv / MultiheadAttention targets (tests/test_lora_variants.py
covers Conv1d/2d), target_parameters (tests/test_moe_lora.py), and PEFT's multi-adapter API (add_adapter, set_adapter, delete_adapter).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

peft = pytest.importorskip("peft")

from odelta_fast import LoraModel  # noqa: E402
from odelta_fast.markers import DELTA_PARAM_ATTR  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


# Models this small gain nothing from intra-op threads; on a busy 2-core machine they cost 3x.
pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- PEFT's test models
class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.float())))))


class ModelEmbConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class Block(nn.Module):
    def __init__(self, size=10):
        super().__init__()
        self.lin0 = nn.Linear(size, size)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(size, size)

    def forward(self, X):
        return self.lin1(self.drop(self.relu(self.lin0(X.float()))))


class DeepMLP(nn.Module):
    def __init__(self, num_hidden_layers=12, size=10):
        super().__init__()
        self.layers = nn.ModuleList([Block(size=size) for _ in range(num_hidden_layers)])
        self.out = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.float()
        for layer in self.layers:
            X = layer(X)
        return self.sm(self.out(X))


class _LinearBlock(nn.Module):
    # test_initialization.py's model: one `linear` (its embed / conv2d are not Linear targets)
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, X):
        return self.linear(X.float())


class _Twice(nn.Sequential):
    """``nn.Sequential(layer, layer)``: one module at two places (its second path is not listed)."""

    def __init__(self, layer):
        super().__init__(layer, layer)

    def forward(self, X):
        return super().forward(X)


class NestedNames(nn.Module):
    """A name that is also the dotted tail of another (``lin0`` and ``block.lin0``): where PEFT's
    regex (whole names) and list (tails) rules part ways."""

    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.block = nn.Module()
        self.block.lin0 = nn.Linear(20, 20)
        self.block.lin1 = nn.Linear(20, 2)

    def forward(self, X):
        return self.block.lin1(torch.relu(self.block.lin0(torch.relu(self.lin0(X.float())))))


class ToyMoEModel(nn.Module):
    """test_tuners_utils.py's MoE toy: layer indices and expert indices in one path."""

    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(4):
            block = nn.Module()
            block.self_attn = nn.Module()
            block.self_attn.q_proj = nn.Linear(4, 4, bias=False)
            block.mlp = nn.Module()
            block.mlp.experts = nn.ModuleList([nn.Module() for _ in range(2)])
            for expert in block.mlp.experts:
                expert.up_proj = nn.Linear(4, 4, bias=False)
            self.model.layers.append(block)


def linear_at(key: str) -> nn.Module:
    """A module tree holding one Linear at the dotted path ``key`` (REGEX_TEST_CASES's keys)."""
    root = nn.Module()
    parent = root
    parts = key.split(".")
    for part in parts[:-1]:
        if not hasattr(parent, part):
            parent.add_module(part, nn.Module())
        parent = getattr(parent, part)
    parent.add_module(parts[-1], nn.Linear(4, 4))
    return root


def _tiny(arch, head=None):
    return lambda: tiny_model(arch, head=head)[0]


MODELS = {"MLP": MLP, "EmbConv1D": ModelEmbConv1D, "DeepMLP": DeepMLP, "MoE": ToyMoEModel, "Nested": NestedNames,
          "Sequential2x": lambda: _Twice(_LinearBlock()),
          "llama": _tiny("llama"), "llama-base": _tiny("llama", "LlamaModel"), "gpt2": _tiny("gpt2"),
          "t5": _tiny("t5"), "gpt_neox": _tiny("gpt_neox"), "bloom": _tiny("bloom")}

# ---------------------------------------------------------------------------- the cases
CASES = [
    # test_custom_models.py TEST_CASES: LoRA on Linear / Conv1D
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Vanilla MLP 1 DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 2 DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    # test_custom_models.py TestMultiRankAdapter
    ("multirank", "MLP", {"r": 8, "lora_alpha": 8, "target_modules": ["lin0", "lin1"], "rank_pattern": {"lin0": 4},
                          "alpha_pattern": {"lin0": 4}}),
    ("multirank 2", "DeepMLP", {"r": 4, "lora_alpha": 8, "target_modules": ["lin0", "lin1"],
                                "rank_pattern": {f"layers.{i}.lin{j}": 64 // (i + 1) for i in range(10) for j in range(2)},
                                "alpha_pattern": {f"layers.{i}.lin{j}": 128 // (i + 1) for i in range(10) for j in range(2)}}),
    # test_initialization.py: rsLoRA and scaling patterns, the rank / alpha pattern override (issue 2194)
    ("rslora scaling", "MLP", {"target_modules": ["lin0", "lin1"], "lora_alpha": 3, "r": 16, "use_rslora": True}),
    ("default scaling pattern", "MLP", {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 9},
                                        "alpha_pattern": {"lin0": 11}, "lora_alpha": 17, "r": 25}),
    ("rslora scaling pattern", "MLP", {"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 9},
                                       "alpha_pattern": {"lin0": 11}, "lora_alpha": 17, "r": 25, "use_rslora": True}),
    ("rank alpha pattern override", "Sequential2x", {"target_modules": ["linear"], "lora_alpha": 1, "r": 8,
                                                     "rank_pattern": {"linear": 8}, "alpha_pattern": {"0.linear": 2}}),
    # test_tuners_utils.py TestTargetedModuleNames / TestExcludedModuleNames
    ("one targeted module regex", "MLP", {"target_modules": "lin0"}),
    ("two targeted module regex", "MLP", {"target_modules": "lin.*"}),
    ("two targeted module list", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("two excluded module regex", "MLP", {"target_modules": "lin.*", "exclude_modules": "lin0"}),
    ("two excluded module list", "MLP", {"target_modules": ["lin0", "lin1"], "exclude_modules": "lin0"}),
    ("multiple excluded modules list", "MLP", {"target_modules": ["lin0", "lin1"], "exclude_modules": ["lin0"]}),
    ("all modules excluded", "MLP", {"target_modules": ["lin0", "lin1", "relu", "drop", "sm"],
                                     "exclude_modules": ["lin0", "lin1", "relu", "drop", "sm"]}),
    ("no modules matched", "MLP", {"target_modules": ["non_existent_module"]}),
    ("some modules excluded some unmatched", "MLP", {"target_modules": ["lin0", "non_existent_module"],
                                                     "exclude_modules": ["lin0"]}),
    ("exclude modules not used", "MLP", {"target_modules": ["lin1"], "exclude_modules": ["non_existent_module"]}),
    ("absent names in the list", "MLP", {"target_modules": ["lin0", "lin7", "q_proj"]}),
    ("realistic targeted (bloom defaults)", "bloom", {"task_type": "CAUSAL_LM"}),
    ("realistic excluded (bloom)", "bloom", {"task_type": "CAUSAL_LM",
                                             "exclude_modules": "transformer.h.1.self_attention.query_key_value"}),
    ("modules_to_save never targeted", "MLP", {"target_modules": "lin.*", "modules_to_save": ["lin1"]}),
    # layers_to_transform (test_tuners_utils.py: layer index, not expert index)
    *[(f"layers_to_transform, layers_pattern={pattern!r}", "MoE",
       {"target_modules": ["q_proj", "up_proj"], "layers_pattern": pattern, "layers_to_transform": [1], "r": 2,
        "lora_alpha": 4}) for pattern in (None, "layers", ["h", "layers"])],
    ("layers_to_transform on DeepMLP", "DeepMLP", {"target_modules": ["lin0"], "layers_to_transform": [0, 3],
                                                   "layers_pattern": "layers"}),
    ("layers_to_transform as an int", "DeepMLP", {"target_modules": ["lin1"], "layers_to_transform": 2,
                                                  "layers_pattern": "layers"}),
    # test_tuners_utils.py MAYBE_INCLUDE_ALL_LINEAR_LAYERS_TEST_CASES, on tiny models of the same architectures
    *[(f"all-linear {name}", name, {"target_modules": "all-linear"})
      for name in ("llama", "llama-base", "gpt2", "t5", "gpt_neox")],
    ("all-linear MLP", "MLP", {"target_modules": "ALL-LINEAR"}),
    # PEFT's documented rules on names that nest (not from its test suite): a str is matched against
    # whole names, a list entry against tails; rank_pattern keys against tails
    ("regex on whole names, nested", "Nested", {"target_modules": "lin0"}),
    ("list on tails, nested", "Nested", {"target_modules": ["lin0"], "rank_pattern": {"block.lin0": 2}}),
    ("regex on whole names, deep", "DeepMLP", {"target_modules": "lin0"}),
]

# test_tuners_utils.py REGEX_TEST_CASES: (key, target_modules, layers_to_transform, layers_pattern); the
# key is a Linear in an otherwise empty module tree (the empty key, the root itself, cannot be one).
REGEX_TEST_CASES = [
    ("foo", [], None, None), ("foo", ["foo"], None, None), ("foo", ["bar"], None, None),
    ("foo", ["foo", "bar"], None, None), ("foo", "foo", None, None), ("foo", ".*oo", None, None),
    ("foo", "fo.*", None, None), ("foo", ".*bar.*", None, None), ("foobar", ".*oba.*", None, None),
    ("foo.bar.1.baz", ["baz"], [1], ["bar"]), ("foo.bar.1.baz", ["baz"], [0], ["bar"]),
    ("foo.bar.1.baz", ["baz"], [2], ["bar"]), ("foo.bar.10.baz", ["baz"], [0], ["bar"]),
    ("foo.bar.10.baz", ["baz"], [1], ["bar"]), ("foo.bar.1.baz", ["baz"], [0, 1, 2], ["bar"]),
    ("foo.bar.1.baz", ["baz", "spam"], [1], ["bar"]), ("foo.bar.1.baz", ["baz", "spam"], [0, 1, 2], ["bar"]),
    ("foo.whatever.1.baz", ["baz"], [1], []), ("foo.whatever.1.baz", ["baz"], [0], []),
    ("foo.whatever.1.baz", ["baz"], [1], ""), ("foo.whatever.1.baz", ["baz"], [0], ""),
    ("foo.whatever.1.baz", ["baz"], [1], None), ("foo.whatever.1.baz", ["baz"], [0], None),
    ("transformer.h.1.attn.attention.q_proj.foo", ["q_proj"], None, []),
    ("transformer.h.1.attn.attention.q_proj", [], None, []),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], None, []),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], None, []),
    ("transformer.h.1.attn.attention.resid_dropout", ["q_proj", "v_proj"], None, []),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [1], ["h"]),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0], ["h"]),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [2], ["h"]),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj"], [0, 1, 2], ["h"]),
    ("transformer.h.1.attn.attention.q_proj", ["q_proj", "v_proj"], [0, 1, 2], ["h"]),
    ("foo.bar.q_proj", ["q_proj"], None, []), ("foo.bar.1.baz", ["baz"], [1], ["foo"]),
    ("foo.bar.1.baz", ["baz"], [1], ["baz"]), ("bar.1.baz", ["baz"], [1], ["bar"]),
    ("foo.bar.001.baz", ["baz"], [1], ["bar"]), ("foo.bar.1.spam.2.baz", ["baz"], [1], ["bar"]),
    ("foo.bar.2.spam.1.baz", ["baz"], [1], ["bar"]), ("blocks.1.weight", ["weight"], [1], ["blocks"]),
    ("blocks.1.bias", ["weight"], [1], ["blocks"]), ("mlp.blocks.1.weight", ["weight"], [1], ["blocks"]),
    ("mlp.blocks.1.bias", ["weight"], [1], ["blocks"]),
]
SELECTION_CASES = [(name, model, kwargs) for name, model, kwargs in CASES] + [
    (f"REGEX {key} {targets!r} {layers} {pattern!r}", key,
     {"target_modules": targets, "layers_to_transform": layers, "layers_pattern": pattern})
    for key, targets, layers, pattern in REGEX_TEST_CASES]
# The cases whose model has a forward pass, for outputs, training, merging and checkpoints.
BEHAVIOUR_CASES = [case for case in CASES if case[1] in ("MLP", "EmbConv1D", "DeepMLP", "Sequential2x", "gpt2", "Nested")
                   and "excluded" not in case[0] and "matched" not in case[0] and case[0] != "regex on whole names, deep"]


def build(model_name: str) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MODELS[model_name]() if model_name in MODELS else linear_at(model_name)
        if model_name == "DeepMLP":
            # With PyTorch's default init, 24 stacked layers shrink the signal until every row of the
            # output is the same; this scale keeps it, so that what each adapter does shows.
            for module in model.modules():
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.35)
    return model.eval()


def inputs_for(model_name: str):
    if model_name in MODELS and model_name not in ("llama", "llama-base", "gpt2", "t5", "gpt_neox", "bloom"):
        return {"X": torch.arange(90).view(9, 10)}
    return tiny_model(model_name.split("-")[0])[1]


def peft_config(kwargs: dict, **extra):
    # A fresh config each time: get_peft_model rewrites target_modules in place ("all-linear" -> a set).
    return peft.LoraConfig(**copy.deepcopy(kwargs), **extra)


def peft_lora(model: nn.Module, kwargs: dict, **extra):
    """(PEFT's model on a copy of ``model``, None) or (None, the ValueError PEFT raised)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(copy.deepcopy(model), peft_config(kwargs, **extra)), None
    except ValueError as err:
        return None, err


def ours(model: nn.Module, kwargs: dict, **extra) -> LoraModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoraModel.from_peft_config(model, peft_config(kwargs, **extra))


@pytest.mark.parametrize("name,model_name,kwargs", SELECTION_CASES, ids=[c[0] for c in SELECTION_CASES])
def test_selects_what_peft_selects(name, model_name, kwargs):
    model = build(model_name)
    peft_model, refusal = peft_lora(model, kwargs)
    if refusal is not None:
        with pytest.raises(ValueError):
            ours(model, kwargs)
        return
    delta = ours(model, kwargs)
    assert sorted(slot.path for slot in delta.slots) == sorted(peft_model.base_model.targeted_module_names)
    for slot in delta.slots:
        layer = peft_model.base_model.model.get_submodule(slot.path)
        assert slot.delta.r == layer.r["default"] and slot.delta.scaling == pytest.approx(layer.scaling["default"])


def _peft_factors(layer) -> dict[str, torch.Tensor]:
    """A PEFT LoRA layer's tensors under our delta's attribute names (Embedding layers keep theirs
    in ``lora_embedding_A/B``; DoRA adds the magnitude)."""
    if "default" in getattr(layer, "lora_embedding_A", {}):
        found = {"lora_A": layer.lora_embedding_A["default"], "lora_B": layer.lora_embedding_B["default"]}
    else:
        found = {"lora_A": layer.lora_A["default"].weight, "lora_B": layer.lora_B["default"].weight}
    if "default" in getattr(layer, "lora_magnitude_vector", {}):
        found["lora_magnitude_vector"] = layer.lora_magnitude_vector["default"].weight
    return found


def _copy_peft_weights(delta: LoraModel, peft_model) -> None:
    """Our delta takes the PEFT model's LoRA factors and modules_to_save values."""
    base = peft_model.base_model.model
    with torch.no_grad():
        for slot in delta.slots:
            for ours_, theirs in _peft_factors(base.get_submodule(slot.path)).items():
                getattr(slot.delta, ours_).copy_(theirs.view_as(getattr(slot.delta, ours_)))
        for path, module in base.named_modules():
            if isinstance(module, peft.utils.ModulesToSaveWrapper):
                trained = module.modules_to_save["default"]
                own = delta.backbone_model.get_submodule(path)
                own.load_state_dict(trained.state_dict())


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name,model_name,kwargs", BEHAVIOUR_CASES, ids=[c[0] for c in BEHAVIOUR_CASES])
def test_lora_behaves_as_peft(name, model_name, kwargs, tmp_path):
    model, inputs = build(model_name), inputs_for(model_name)
    with torch.no_grad():
        plain = model(**inputs)
    torch.manual_seed(0)
    peft_model, _ = peft_lora(model, kwargs, init_lora_weights=False)
    for wrapper in [m for m in peft_model.modules() if isinstance(m, peft.utils.ModulesToSaveWrapper)]:
        for p in wrapper.modules_to_save["default"].parameters():
            nn.init.normal_(p, std=0.5)  # trained values, unlike the original's
    delta = ours(model, kwargs)
    delta.freeze_module()
    _copy_peft_weights(delta, peft_model)

    def out(m):
        m.eval()
        with torch.no_grad():
            result = m(**inputs)
        return result.logits if hasattr(result, "logits") else result

    expected = out(peft_model)
    assert not torch.allclose(expected, plain.logits if hasattr(plain, "logits") else plain, atol=1e-4)
    got = out(model)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # merge / unmerge, against PEFT's merged model
    delta.merge()
    peft_model.merge_adapter()
    torch.testing.assert_close(out(model), out(peft_model), rtol=1e-5, atol=1e-5)
    delta.unmerge()
    peft_model.unmerge_adapter()
    assert torch.equal(out(model), got)

    # save in PEFT's layout -> PEFT loads it; PEFT's checkpoint -> we load it
    delta.save_finetuned(str(tmp_path / "ours"), format="peft")
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(build(model_name)), str(tmp_path / "ours"))
    torch.testing.assert_close(out(reloaded), got, rtol=1e-5, atol=1e-5)
    assert sorted(reloaded.base_model.targeted_module_names) == sorted(slot.path for slot in delta.slots)
    peft_model.save_pretrained(str(tmp_path / "peft"))
    fresh = build(model_name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LoraModel.from_peft(str(tmp_path / "peft"), fresh)
    torch.testing.assert_close(out(fresh), expected, rtol=1e-5, atol=1e-5)

    # one training step: only the adapter and modules_to_save move, as PEFT's do, by the same amounts
    if kwargs.get("lora_dropout"):
        return  # dropout masks are drawn differently; outputs and checkpoints above already agree
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for m in (model, peft_model):
        m.train()
        torch.manual_seed(1)  # the backbone's own dropout draws the same mask in both
        out_train = m(**inputs)
        (out_train.logits if hasattr(out_train, "logits") else out_train).float().pow(2).mean().backward()
        torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5).step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved and moved <= trainable
    assert trainable == {n for n, p in model.named_parameters() if hasattr(p, DELTA_PARAM_ATTR)} | {
        f"{m}.{n}" for m in kwargs.get("modules_to_save") or [] for n, _ in model.get_submodule(m).named_parameters()}
    base = peft_model.base_model.model
    for slot in delta.slots:
        for ours_, theirs in _peft_factors(base.get_submodule(slot.path)).items():
            torch.testing.assert_close(getattr(slot.delta, ours_), theirs.view_as(getattr(slot.delta, ours_)),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,error", [
    ({"target_modules": ["lin0"], "lora_bias": True}, "bias terms"),
    ({"target_modules": ["lin0"], "bias": "all"}, "bias='all'"),
    ({"target_modules": ["lin0"], "init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
], ids=["lora_bias", "bias", "pissa"])
def test_what_plain_lora_cannot_reproduce_is_refused_by_name(kwargs, error):
    model = build("MLP")
    with pytest.raises(ValueError, match=error):
        ours(model, kwargs)
    assert not any(hasattr(p, DELTA_PARAM_ATTR) for p in model.parameters()), "a refused config leaves no trace"


def test_peft_only_targets_and_configs_peft_refuses_are_refused():
    model = build("EmbConv1D")
    with pytest.raises(ValueError, match=r"flat \(Flatten\).*modules only"):
        ours(model, {"target_modules": ["flat", "conv1d"]})
    with pytest.raises(ValueError, match="layers_pattern needs layers_to_transform"):
        LoraModel.from_peft_config(build("MLP"), {"target_modules": ["lin0"], "layers_pattern": "layers"})
    with pytest.raises(ValueError, match="not a LoRA config"):
        LoraModel.from_peft_config(build("MLP"), {"peft_type": "IA3", "target_modules": ["lin0"]})
    with pytest.raises(ValueError, match="no default target_modules for MLP"):
        LoraModel.from_peft_config(build("MLP"), {"r": 4})


def test_initialisations_follow_peft():
    gaussian = ours(build("MLP"), {"target_modules": ["lin0"], "r": 4, "init_lora_weights": "gaussian"})
    a, b = gaussian.slots[0].delta.lora_A, gaussian.slots[0].delta.lora_B
    assert torch.count_nonzero(b) == 0 and 0.1 < a.std().item() < 0.5  # PEFT: A ~ N(0, 1/r), B = 0
    random = ours(build("MLP"), {"target_modules": ["lin0"], "init_lora_weights": False})
    assert torch.count_nonzero(random.slots[0].delta.lora_B) == random.slots[0].delta.lora_B.numel()


def test_default_targets_follow_peft_table():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table

    from odelta_fast.peft_format import PEFT_DEFAULT_TARGETS

    assert {k: sorted(v) for k, v in PEFT_DEFAULT_TARGETS.items()} == {
        k: sorted(peft_table[k]) for k in PEFT_DEFAULT_TARGETS}


def test_exclude_modules_that_exclude_nothing_warn_as_in_peft():
    with pytest.warns(UserWarning, match="exclude_modules=\\['non_existent_module'\\] excluded no module"):
        LoraModel.from_peft_config(build("MLP"), {"target_modules": ["lin1"], "exclude_modules": ["non_existent_module"]})
