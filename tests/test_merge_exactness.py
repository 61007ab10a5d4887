"""Merge, unmerge, detach, attach and remove in any order, across several deltas that share
modules (two LoRAs on GPT-2's fused ``c_attn``) and parameters of one module (LoRA folds into
``c_attn.weight``, BitFit into ``c_attn.bias``).

At every step the outputs equal those of the backbone with the attached deltas routed and
nothing merged, and whenever nothing is merged the backbone's parameters are bit-identical to
the original. Before the shared merge snapshot, unmerging the first-merged of two LoRAs restored
a copy taken before the second merge: the second was wiped while still counted as merged, and
after both were detached the backbone kept the first delta's update for good.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odelta_fast import BitFitModel, LoraModel
from odelta_fast.markers import DELTA_PARAM_ATTR
from odelta_fast.merging import snapshot_bytes
from helpers import main_output, randomize_
from tiny_models import tiny_model

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 6e-2}
NAMES = ("a", "b", "c")


def _build(dtype):
    model, inputs = tiny_model("gpt2")
    model.to(dtype)
    deltas = [
        LoraModel(model, lora_r=4, name="a"),                                        # c_attn (attn.qkv)
        LoraModel(model, lora_r=2, modified_modules=["attn.qkv", "ff.w1"], name="b"),  # c_attn again, c_fc
        BitFitModel(model, name="c"),                                                # biases, c_attn's too
    ]
    for i, delta in enumerate(deltas):
        randomize_(delta.parameters(), seed=10 + i)
    return model, inputs, deltas


def _references(model, inputs, deltas) -> dict[frozenset, torch.Tensor]:
    """Output of the backbone with exactly these deltas attached, nothing merged (detach of an
    unmerged delta is exact, tested elsewhere)."""
    refs = {}
    for size in range(len(deltas) + 1):
        for subset in itertools.combinations(range(len(deltas)), size):
            for i, delta in enumerate(deltas):
                delta.attach() if i in subset else delta.detach()
            refs[frozenset(subset)] = main_output(model, inputs).float()
    for delta in deltas:
        delta.attach()
    return refs


class _Run:
    def __init__(self, dtype):
        self.dtype = dtype
        self.model, self.inputs, self.deltas = _build(dtype)
        self.original = {n: p.detach().clone() for n, p in self.model.named_parameters()
                         if not hasattr(p, DELTA_PARAM_ATTR)}
        self.refs = _references(self.model, self.inputs, self.deltas)

    def apply(self, op: str, i: int) -> None:
        delta = self.deltas[i]
        if op == "merge" and not delta.attached:
            with pytest.raises(RuntimeError, match="detached"):
                delta.merge()
            return
        getattr(delta, op)()

    def check(self, where: str) -> None:
        attached = frozenset(i for i, d in enumerate(self.deltas) if d.attached)
        got = main_output(self.model, self.inputs).float()
        want = self.refs[attached]
        scale = max(1.0, want.abs().max().item())
        assert (got - want).abs().max().item() <= TOLERANCE[self.dtype] * scale, where
        if not any(d.is_merged for d in self.deltas):
            for name, param in self.model.named_parameters():
                if name in self.original:
                    assert torch.equal(param, self.original[name]), f"{where}: {name} changed"
            assert snapshot_bytes(self.model) == 0, f"{where}: a merge snapshot outlived the merges"


def _interleavings():
    """Every order of "merge each delta once, then take it out once" over three deltas, where
    taking out is an unmerge or a detach: 90 orders x 2 ways out."""
    events = [("merge", i) for i in range(3)] + [("out", i) for i in range(3)]
    seen = set()
    for order in itertools.permutations(events):
        if all(order.index(("merge", i)) < order.index(("out", i)) for i in range(3)) and order not in seen:
            seen.add(order)
            yield order


_RUNS: dict = {}


def _shared_run(dtype) -> _Run:
    """One backbone per dtype, reset between uses to "all attached, nothing merged"."""
    run = _RUNS.get(dtype)
    if run is None:
        run = _RUNS[dtype] = _Run(dtype)
    for delta in run.deltas:
        delta.attach()
        delta.unmerge()
    run.check("reset")
    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_merge_order_is_exact(dtype):
    orders = list(_interleavings())
    assert len(orders) == 90
    run = _shared_run(dtype)
    for n, order in enumerate(orders):
        # Each delta leaves by unmerge or detach, alternating over the orders (and the deltas).
        for op, i in order:
            way_out = ("unmerge", "detach")[(n + i) % 2]
            run.apply(way_out if op == "out" else op, i)
            run.check(f"{order} at {op} {NAMES[i]}")
        for delta in run.deltas:
            delta.attach()


OPS = st.sampled_from(["merge", "unmerge", "detach", "attach"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(OPS, st.integers(0, 2)), min_size=1, max_size=14),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_any_sequence_of_lifecycle_calls_is_exact(steps, dtype):
    run = _shared_run(dtype)
    for op, i in steps:
        run.apply(op, i)
        run.check(f"{steps} at {op} {NAMES[i]}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_removing_every_delta_leaves_the_original_backbone(dtype):
    run = _Run(dtype)
    run.deltas[1].merge()
    run.deltas[2].merge()
    run.deltas[0].merge()
    for delta in run.deltas:
        delta.remove()
    run.check("after remove")
    for name, param in run.model.named_parameters():
        assert torch.equal(param, run.original[name]), name
    keys = set(run.model.state_dict())
    assert keys == set(tiny_model("gpt2")[0].state_dict())
    assert not [n for n, _ in run.model.named_modules() if n.split(".")[-1] in NAMES]


def test_merge_memory_is_one_snapshot_per_parameter_whatever_the_number_of_deltas():
    run = _Run(torch.float32)
    c_attn = run.model.transformer.h[0].attn.c_attn
    run.deltas[0].merge()
    one = snapshot_bytes(run.model)
    run.deltas[1].merge()  # also folds into every c_attn.weight, plus the c_fc weights
    c_fc = run.model.transformer.h[0].mlp.c_fc
    layers = len(run.model.transformer.h)
    assert one == layers * c_attn.weight.numel() * 4
    assert snapshot_bytes(run.model) == one + layers * c_fc.weight.numel() * 4
    run.deltas[0].unmerge()
    run.deltas[1].unmerge()
    assert snapshot_bytes(run.model) == 0


def test_merged_state_does_not_depend_on_merge_order():
    first = _Run(torch.bfloat16)
    first.deltas[0].merge()
    first.deltas[1].merge()
    second = _Run(torch.bfloat16)
    second.deltas[1].merge()
    second.deltas[0].merge()
    for (name, p), (_, q) in zip(first.model.named_parameters(), second.model.named_parameters()):
        assert torch.equal(p, q), name
