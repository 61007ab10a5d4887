"""Name-based addressing: tail matching on whole segments, anchored regexes, exclude, all-linear,
near-miss suggestions; property tests over random dotted paths."""
from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from odelta_fast import LoraModel
from odelta_fast.addressing import Spec, select_modules
from odelta_fast.structure import structure_map
from tiny_models import tiny_model

segment = st.sampled_from(["a", "b", "attn", "dense", "output", "0", "1", "12", "q", "layer"])
paths = st.lists(segment, min_size=1, max_size=6).map(".".join)


@given(path=paths, tail_len=st.integers(1, 6))
def test_plain_spec_matches_exactly_the_whole_segment_tails(path, tail_len):
    segments = path.split(".")
    tail = ".".join(segments[-tail_len:])
    assert Spec.parse(tail).matches_path(path)
    # Cutting the spec inside a segment must never match: "ense" is not "dense".
    if len(tail) > 1 and not path.endswith("." + tail[1:]) and path != tail[1:]:
        assert not Spec.parse(tail[1:]).matches_path(path)


@given(path=paths, spec=paths)
def test_plain_spec_equals_segment_suffix_rule(path, spec):
    expected = path.split(".")[-len(spec.split(".")):] == spec.split(".")
    assert Spec.parse(spec).matches_path(path) == expected


@given(path=paths, spec=paths)
def test_escaped_regex_agrees_with_plain_spec(path, spec):
    assert Spec.parse("[r]" + re.escape(spec)).matches_path(path) == Spec.parse(spec).matches_path(path)


@settings(max_examples=50)
@given(path=paths)
def test_regex_checks_every_suffix_not_only_the_first_hit(path):
    # OpenDelta looked at the first re.search hit only, so [r]attn missed a.attn.b.attn.
    expected = path == "attn" or path.endswith(".attn")
    assert Spec.parse("[r]attn").matches_path(path) == expected


def test_examples_from_the_rules():
    assert Spec.parse("output.dense").matches_path("encoder.layer.3.output.dense")
    assert Spec.parse("output.dense").matches_path("encoder.layer.3.attention.output.dense")
    assert not Spec.parse("attention.output.dense").matches_path("encoder.layer.3.output.dense")
    assert not Spec.parse("ense").matches_path("encoder.layer.3.output.dense")
    assert Spec.parse("[r]attn").matches_path("a.attn.b.attn")
    assert Spec.parse(r"[r](\d)+\.output.dense").matches_path("layer.0.output.dense")
    assert not Spec.parse(r"[r](\d)+\.output.dense").matches_path("layer.0.attention.output.dense")
    assert Spec.parse(r"[r][0-5]\.attention").matches_path("layer.3.attention")
    assert not Spec.parse(r"[r][0-5]\.attention").matches_path("layer.13.attention")
    assert Spec.parse(r"[r]\d+").matches_path("block.1.layer.0")


@given(path=paths, spec=paths)
def test_a_caret_anchors_the_regex_at_the_start_of_the_path(path, spec):
    # OpenDelta searched the pattern in the whole name, so "^" meant the start of the path.
    assert Spec.parse("[r]^" + re.escape(spec)).matches_path(path) == (path == spec)
    below = Spec.parse("[r]^" + re.escape(spec) + r"(\..+)?")
    assert below.matches_path(path) == (path == spec or path.startswith(spec + "."))


def test_anchored_regex_examples():
    assert Spec.parse(r"[r]^encoder\..*\.q").matches_path("encoder.block.0.q")
    assert not Spec.parse(r"[r]^encoder\..*\.q").matches_path("model.encoder.block.0.q")
    assert Spec.parse(r"[r]encoder\..*\.q").matches_path("model.encoder.block.0.q")  # unanchored: any tail


def test_bad_regex_is_a_clear_error():
    with pytest.raises(ValueError, match="invalid regular expression"):
        Spec.parse("[r](unclosed")


def test_exclude_uses_the_same_matcher_and_lora_honours_it():
    model, _ = tiny_model("bert")
    delta = LoraModel(model, modified_modules=["attention.self.query"], exclude_modules=[r"[r]layer\.0\.[a-z.]+"])
    assert [s.path for s in delta.slots] == ["bert.encoder.layer.1.attention.self.query"]


def test_all_linear_skips_the_output_head():
    model, _ = tiny_model("llama")
    smap = structure_map(model)
    chosen = {path for path, _ in select_modules(model, ["all-linear"], structure=smap)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "lm_head" in linears and "lm_head" not in chosen
    assert chosen == linears - {"lm_head"}


def test_common_names_address_the_same_modules_across_architectures():
    for arch, expected_tail in [("bert", "attention.self.query"), ("llama", "self_attn.q_proj"),
                                ("t5", "SelfAttention.q"), ("gpt_neox", "attention.query_key_value")]:
        model, _ = tiny_model(arch)
        spec = "attn.qkv" if arch == "gpt_neox" else "attn.q"
        chosen = select_modules(model, [spec], structure=structure_map(model), common_structure=True)
        assert chosen and all(path.endswith(expected_tail) for path, _ in chosen), (arch, chosen)


def test_block_index_and_regex_over_common_names():
    model, _ = tiny_model("llama")
    chosen = select_modules(model, [r"[r]block\.1\.attn\.[qv]"], structure=structure_map(model))
    assert [p for p, _ in chosen] == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_no_match_error_names_the_spec_and_suggests_the_right_module():
    model, _ = tiny_model("bert")
    with pytest.raises(ValueError) as err:
        LoraModel(model, modified_modules=["q_proj"])
    message = str(err.value)
    assert "'q_proj'" in message
    first_candidate = message.split("closest candidates:")[1].strip().splitlines()[0]
    assert "attention.self.query" in first_candidate


def test_failed_selection_leaves_the_backbone_untouched():
    model, inputs = tiny_model("bert")
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="'no_such_module' matches no"):
        LoraModel(model, modified_modules=["no_such_module", "nor_this"])
    with pytest.raises(ValueError, match="backend"):
        LoraModel(model, modified_modules=["attn.q"], backend="nope")
    assert set(model.state_dict()) == keys
    assert all("_odelta_routes" not in m.__dict__ for m in model.modules())


class Wrapper(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.extra = nn.Linear(4, 4)

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_defaults_work_on_a_model_wrapped_in_a_user_module():
    inner, inputs = tiny_model("llama")
    model = Wrapper(inner)
    delta = LoraModel(model)
    assert [s.path.split(".")[-1] for s in delta.slots] == ["q_proj", "v_proj"] * 2
    assert all(s.path.startswith("inner.model.layers.") for s in delta.slots)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = nn.Linear(8, 16)
        self.proj_out = nn.Linear(16, 8)

    def forward(self, x):
        return self.proj_out(torch.relu(self.proj_in(x)))


def test_unmapped_model_uses_raw_names_and_defaults_need_targets():
    model = Plain()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = LoraModel(model, modified_modules=["proj_in"])
    assert [s.path for s in delta.slots] == ["proj_in"]
    assert sum("unmapped" in str(w.message).lower() or "raw" in str(w.message).lower() for w in caught) >= 1
    with pytest.raises(ValueError, match="modified_modules"):
        LoraModel(Plain())


class TwoBackbones(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = tiny_model("bert")[0]
        self.gen = tiny_model("gpt2")[0]


def test_lora_defaults_fit_each_backbone_of_a_wrapper():
    model = TwoBackbones()
    delta = LoraModel(model)
    tails = sorted({s.path.split(".")[0] + ":" + s.path.split(".")[-1] for s in delta.slots})
    assert tails == ["gen:c_attn", "text:query", "text:value"]
