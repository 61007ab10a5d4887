"""Code and configs written for OpenDelta train what OpenDelta trains.

The oracle is OpenDelta's own matching rule (read from its source, see the reference notes):
with explicit ``modified_modules`` and no ``common_structure``, and for ``unfrozen_modules``
always, a plain spec matches a module whose raw dotted path ends with it on whole segments; a
``[r]`` regex counts when its first ``re.search`` hit ends the path on a segment boundary. Its
common names are only reachable through the ``@`` spelling. The cases are the distinct
(method, backbone, modified_modules, unfrozen_modules) combinations of OpenDelta's shipped
``examples_prompt`` configs, on tiny models of the same architectures.
"""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

from odelta_fast import (AdapterModel, AutoDeltaConfig, AutoDeltaModel, BitFitModel, CompacterModel, LoraModel,
                         LowRankAdapterModel, ParallelAdapterModel, PrefixModel, Visualization)
from odelta_fast.markers import DELTA_PARAM_ATTR
from tiny_models import tiny_model

_NORMS = ["deltas", "layer_norm", "final_layer_norm"]


def opendelta_matches(path: str, spec: str) -> bool:
    if spec.startswith("[r]"):
        hit = re.search(spec[3:], path)
        return bool(hit) and hit.end() == len(path) and (hit.start() == 0 or path[hit.start() - 1] == ".")
    return path == spec or path.endswith("." + spec)


def opendelta_unfrozen(model: nn.Module, specs) -> set[str]:
    names = set()
    for path, module in model.named_modules():
        if path and any(opendelta_matches(path, s) for s in specs if s != "deltas"):
            names.update(n for n, p in module.named_parameters(prefix=path) if not hasattr(p, DELTA_PARAM_ATTR))
    return names


def _backbone_trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and not hasattr(p, DELTA_PARAM_ATTR)}


# (method, tiny architecture, modified_modules as shipped, unfrozen_modules as shipped)
SHIPPED = [
    (AdapterModel, "roberta", None, _NORMS + ["classifier"]),
    (ParallelAdapterModel, "roberta", None, _NORMS + ["classifier"]),
    (PrefixModel, "roberta", None, ["deltas", "classifier"]),
    (PrefixModel, "roberta", ["[r][0-5]\\.attention"], ["deltas", "classifier"]),
    (LoraModel, "roberta", None, ["classifier", "deltas"]),
    (LoraModel, "roberta", None, ["classifier", "deltas", "layer_norm"]),
    (LoraModel, "roberta", ["query", "value"], _NORMS),
    (LoraModel, "xlm-roberta", ["query", "value"], _NORMS),
    # (adapter on ViT "output": transformers 5 renamed ViT's modules; no "output" module is left)
    (BitFitModel, "t5", ["attn", "ff", "layer_norm"], _NORMS),
    (CompacterModel, "t5", ["attn", "ff", "layer_norm"], _NORMS),
    (AdapterModel, "opt", ["self_attn"], _NORMS),
    (LowRankAdapterModel, "gpt2", ["attn", "mlp"], _NORMS),
    (LoraModel, "gptj", ["0.attn.q_proj", "1.attn.q_proj"], _NORMS),  # layers 20-27 of the 6B, on 2 layers
    (CompacterModel, "deberta-v2", ["attention"], _NORMS),
    (PrefixModel, "bert", ["attention"], _NORMS),
]
KWARGS = {CompacterModel: {"reduction_factor": 8}, PrefixModel: {"prefix_token_num": 2, "embed_dim": 8, "mid_dim": 8},
          AdapterModel: {"bottleneck_dim": 4}, ParallelAdapterModel: {"bottleneck_dim": 4},
          LowRankAdapterModel: {"reduction_factor": 8}}


@pytest.mark.parametrize("method,arch,modified,unfrozen", SHIPPED,
                         ids=[f"{m.delta_type}-{a}-{i}" for i, (m, a, _, _) in enumerate(SHIPPED)])
def test_shipped_configs_train_what_opendelta_trains(method, arch, modified, unfrozen):
    model, inputs = tiny_model(arch)
    config = {"delta_type": method.delta_type, "modified_modules": modified, "unfrozen_modules": unfrozen,
              **KWARGS.get(method, {})}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = AutoDeltaModel.from_config(AutoDeltaConfig.from_dict(config), model)
    delta.freeze_module()
    assert _backbone_trainable(model) == opendelta_unfrozen(model, unfrozen)
    if modified is not None:  # explicit targets: OpenDelta's raw tail matching picks them
        expected = {path for path, _ in model.named_modules() if path and any(opendelta_matches(path, s) for s in modified)}
        got = {slot.path for slot in delta.slots if slot.path in expected or not isinstance(delta, BitFitModel)}
        if isinstance(delta, BitFitModel):  # BitFit spreads a target to its biasable leaves
            got = {next(p for p in expected if slot.path == p or slot.path.startswith(p + ".")) for slot in delta.slots}
        elif isinstance(delta, PrefixModel):
            got = {slot.path for slot in delta.slots if hasattr(slot.delta, "layout")}
        assert got == expected
        unmatched = [s for s in modified if not any(opendelta_matches(p, s) for p, _ in model.named_modules() if p)]
        warned = " ".join(str(w.message) for w in caught)
        for spec in unmatched:  # dead entries OpenDelta ignored: ignored here too, with a warning
            assert f"module spec {spec!r} matches no" in warned
    model.train()
    out = model(**inputs)
    (out.logits if hasattr(out, "logits") else out[0]).float().pow(2).mean().backward()


def test_opendelta_spelling_of_common_names():
    model, _ = tiny_model("llama")
    spelled = LoraModel(model, modified_modules=["attn@.q@", "attn@.v@"], name="a")
    plain = LoraModel(model, modified_modules=["attn.q", "attn.v"], common_structure=True, name="b")
    assert [s.path for s in spelled.slots] == [s.path for s in plain.slots]
    o_proj = AdapterModel(model, bottleneck_dim=4, modified_modules=["attn@.proj@"])
    assert [s.path for s in o_proj.slots] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    gpt2, _ = tiny_model("gpt2")
    fused = LoraModel(gpt2, modified_modules=["attn@.q,k,v@"])  # OpenDelta's name for GPT-2's c_attn
    assert [s.path for s in fused.slots] == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    # With common_structure=False the @ spelling has nothing to match.
    with pytest.raises(ValueError, match="matches no"):
        LoraModel(tiny_model("llama")[0], modified_modules=["attn@.q@"], common_structure=False)


def test_common_structure_false_makes_unfrozen_and_exclude_raw_only():
    model, _ = tiny_model("bert")
    delta = LoraModel(model, modified_modules=["query"], common_structure=False,
                      unfrozen_modules=["deltas", "attn.layer_norm", "classifier"])
    delta.freeze_module()
    assert _backbone_trainable(model) == {"classifier.weight", "classifier.bias"}
    delta.freeze_module(exclude=["deltas", "ff.layer_norm"])
    assert _backbone_trainable(model) == set()


def test_exclusion_applies_after_matching():
    model = nn.Sequential()
    model.add_module("lin0", nn.Linear(4, 4))
    model.add_module("lin1", nn.Linear(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the unmapped-architecture notice
        delta = LoraModel(model, modified_modules=["lin0", "lin1"], exclude_modules=["lin0"])
    assert [s.path for s in delta.slots] == ["lin1"]


def test_a_list_with_absent_names_warns_and_a_list_of_them_raises():
    model, _ = tiny_model("bert")
    with pytest.warns(UserWarning, match="(?s)ignoring 1 of 2 module specs.*'q_proj' matches no"):
        delta = LoraModel(model, modified_modules=["query", "q_proj"])
    assert len(delta.slots) == 2
    with pytest.raises(ValueError, match="(?s)'q_proj' matches no .*closest candidates"):
        LoraModel(tiny_model("bert")[0], modified_modules=["q_proj", "k_proj"])


def test_opendelta_arguments_are_accepted(tmp_path):
    model, inputs = tiny_model("bert")
    delta = LoraModel(model, backend="hf", interactive_modify=False)  # OpenDelta's defaults, spelled out
    delta.freeze_module()
    with pytest.warns(UserWarning, match="push_to_dc=True"):
        delta.save_finetuned(str(tmp_path / "d"), push_to_dc=True, center_args={"name": "x"}, list_tags=["a"],
                             dict_tags={"k": "v"}, delay_push=False, test_result=None, usage="")
    config = LoraModel.config_class.from_finetuned(finetuned_delta_path=str(tmp_path / "d"))
    assert config.lora_r == 8
    auto = AutoDeltaConfig.from_finetuned(finetuned_delta_path=str(tmp_path / "d"))
    assert auto.to_dict() == config.to_dict()
    runner = {"delta_type": "lora", "lora_r": 4, "backbone_model": "bert", "delay_push": True,
              "model_path_public": "x", "unfrozen_modules": ["deltas"]}
    with pytest.warns(UserWarning, match="does not take 'backbone_model', 'delay_push', 'model_path_public'"):
        assert AutoDeltaConfig.from_dict(runner).lora_r == 4
    with pytest.raises(ValueError, match="interactive_modify=True"):
        LoraModel(tiny_model("bert")[0], interactive_modify=True)
    with pytest.raises(ValueError, match="BMTrain"):
        LoraModel(tiny_model("bert")[0], backend="bmt")


def test_loading_again_through_a_new_wrapper_of_the_same_modules(tmp_path):
    """OpenDelta's user_defined.py: Mymodel(bert_a, bert_b) built again around the same backbones."""
    class Mymodel(nn.Module):
        def __init__(self, a, b):
            super().__init__()
            self.a, self.b = a, b

    bert_a, _ = tiny_model("bert")
    bert_b, _ = tiny_model("bert", seed=1)
    for method in (LoraModel, BitFitModel, AdapterModel):
        first = method(Mymodel(bert_a, bert_b), **KWARGS.get(method, {}))
        first.freeze_module(exclude=["deltas"])
        first.save_finetuned(str(tmp_path / method.delta_type))
        again = AutoDeltaModel.from_finetuned(str(tmp_path / method.delta_type), backbone_model=Mymodel(bert_a, bert_b))
        assert again.name != first.name and len(again.slots) == len(first.slots)


def test_visualization_and_log_options(capsys):
    model, _ = tiny_model("bert")
    delta = LoraModel(model)
    tree = Visualization(model).structure_graph(printTree=False)
    assert tree.label is not None
    delta.log(delta_ratio=True, trainable_ratio=True, visualization=False, cuda_memory=True)
    out = capsys.readouterr().out
    assert "trainable params:" in out and "delta params:" in out
    with pytest.raises(TypeError):
        delta.log(trainable_ratios=True)


def test_inspect_optimizer_statistics():
    from odelta_fast.utils.inspect import inspect_module_statistics, inspect_optimizer_statistics

    model, _ = tiny_model("bert")
    delta = LoraModel(model)
    delta.freeze_module()
    optimizer = torch.optim.AdamW([{"params": list(delta.parameters()), "lr": 1e-3},
                                   {"params": [model.classifier.weight], "lr": 0.0}])
    stats = inspect_optimizer_statistics(optimizer, verbose=False)
    assert stats["param_group_0"]["trainable_parameters"] == sum(p.numel() for p in delta.parameters())
    assert stats["param_group_1"]["trainable_parameters"] == 0 and stats["param_group_1"]["lr"] == 0.0
    module_stats = inspect_module_statistics(model, verbose=False)
    assert module_stats["delta_parameters"] == sum(p.numel() for p in delta.parameters())


def test_parallel_adapter_defaults_span_attention_and_feed_forward():
    model, inputs = tiny_model("bert")
    delta = ParallelAdapterModel(model, bottleneck_dim=4)
    kinds = {(s.path.split("layer.0.", 1)[-1], type(s.delta).__name__) for s in delta.slots if ".layer.0." in s.path}
    assert kinds == {("attention", "AdapterDelta"), ("intermediate.dense", "InputTap"), ("output.dense", "AdapterDelta")}
    layer = model.bert.encoder.layer[0]
    for p in delta.parameters():
        torch.nn.init.normal_(p, std=0.3)
    # The feed-forward adapter reads ff.w1's input and adds to ff.w2's output.
    seen = {}
    layer.intermediate.dense.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    base_out = {}
    hook = layer.output.dense.register_forward_hook(lambda m, a, o: base_out.__setitem__("y", o))
    with torch.no_grad():
        model(**inputs)
    hook.remove()
    adapter = layer.output.dense.parallel_adapter
    expected_extra = adapter._bottleneck(seen["x"], residual=None)
    plain = torch.nn.functional.linear(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(seen["x"])),
                                       layer.output.dense.weight, layer.output.dense.bias)
    torch.testing.assert_close(base_out["y"], plain + expected_extra, rtol=1e-5, atol=1e-5)
