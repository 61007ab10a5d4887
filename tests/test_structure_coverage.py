"""The coverage sweep of default targets (bench/structure_coverage.py) in CI.

The full sweep builds every transformers model type and takes about half an hour on two cores,
so CI runs the same checks on a fixed sample (each family kind: encoders, decoders,
encoder-decoders, vision transformers, MoE decoders, a vision-language model, the Linear
subclasses all-linear must leave alone), and checks that the committed full table belongs to the
installed transformers and agrees with the README.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import structure_coverage as coverage  # noqa: E402
import tiny_zoo  # noqa: E402

SAMPLE = {
    "encoder": ["bert", "roformer"],
    "decoder": ["llama", "olmo2"],
    "encoder-decoder": ["t5", "pegasus"],
    "vision transformer": ["vit", "dinov2"],
    "mixture of experts": ["mixtral", "deepseek_v3"],
    "vision-language": ["llava"],
    "all-linear around Linear subclasses": ["llama4_text", "phimoe", "deepseek_v4"],
}


@pytest.fixture(scope="module", autouse=True)
def quiet():
    coverage._quiet()


@pytest.mark.parametrize("model_type", [t for types in SAMPLE.values() for t in types])
def test_default_targets_attach_train_and_detach(model_type):
    if model_type not in tiny_zoo.model_types():
        pytest.skip(f"{model_type} is not in this transformers version")
    result = coverage.check_type(model_type)
    if not result.built:
        pytest.skip(f"{model_type} does not build tiny here: {result.reason}")
    assert result.has_attention
    failures = {m: f"{r.stage}: {r.reason}" for m, r in result.methods.items() if not r.ok}
    assert failures == {}
    from odelta_fast.structure import MODEL_TYPES

    if model_type in MODEL_TYPES:  # a table type passed the oracle check and worked before too
        assert result.source == "table"
        assert all(result.passed_before(m) for m in coverage.METHODS)
    else:
        assert "inferred" in result.source
        assert not any(result.passed_before(m) for m in coverage.METHODS) or result.source == "inferred+table"


def test_committed_table_is_fresh_and_meets_the_target():
    results, versions = coverage.load_records()
    installed = coverage.versions()["transformers"]
    assert versions["transformers"] == installed, (
        f"{coverage.RECORDS.name} was made with transformers {versions['transformers']}, this is {installed}: "
        "run python bench/structure_coverage.py (about half an hour) and commit its output")
    assert sorted(r.model_type for r in results) == tiny_zoo.model_types()
    summary = coverage.summarise(results)
    for method in coverage.METHODS:
        assert summary["methods"][method]["after"] >= 0.9 * summary["with_attention"], method
    assert coverage.MARKDOWN.read_text() == coverage.markdown(results, versions)
    assert coverage.readme_section(results, versions) in coverage.README.read_text()
