"""The LoRA traffic model (``bench/roofline.py``'s pass counts) against what each path really
reads and writes: torch ops counted by a dispatch mode (our custom ops opened up so that their
inner ops count), Triton launches by which of their big arguments the launch changed (a write) or
left alone (a read). One pass = one full read or write of an M x K or M x N tensor."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch._library.custom_ops as custom_ops
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from odelta_fast import ops
from opcheck import needs_triton

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Ops that move no data (views, allocation) or only a strided window of it.
NO_TRAFFIC = ("view", "reshape", "t.default", "transpose", "expand", "detach", "alias", "as_strided", "permute",
              "empty", "lift", "slice")
M, K, N, R = 48, 40, 24, 4  # M*K, M*N and every other size distinct, so sizes tell tensors apart


class PassCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.sizes = {M * K: 0, M * N: 1}
        self.passes = [0, 0]

    def big(self, t) -> bool:
        return isinstance(t, torch.Tensor) and t.numel() in self.sizes

    def count(self, seen: set, t: torch.Tensor, what: str) -> None:
        key = (t.untyped_storage().data_ptr(), what)  # a tensor handed to one op twice is one pass
        if self.big(t) and key not in seen:
            seen.add(key)
            self.passes[self.sizes[t.numel()]] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name.startswith("odelta_fast::"):
            with self:
                return custom_ops.OPDEFS[name]._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if any(s in str(func) for s in NO_TRAFFIC):
            return out
        seen: set = set()
        mutated = False
        for arg, info in zip(args, func._schema.arguments):
            if isinstance(arg, torch.Tensor):
                self.count(seen, arg, "read")
                if info.alias_info is not None and info.alias_info.is_write:
                    mutated = True
                    self.count(seen, arg, "write")
        if not mutated:
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor):
                    self.count(seen, o, "write")
        return out


@pytest.fixture
def counted_launches(monkeypatch):
    """Triton launches report their passes to the active counter."""
    counters: list[PassCounter] = []
    try:
        from odelta_fast.kernels import common
    except ImportError:  # no Triton: only the torch paths run, and dispatch counts them
        return counters
    real = common.Tuning.launch

    def launch(self, grid, *args, **kwargs):
        with _disable_current_modes():
            before = [(a, a.clone()) for a in args if counters[-1].big(a)]
            real(self, grid, *args, **kwargs)
            seen: set = set()
            for a, old in before:
                changed = not torch.equal(torch.nan_to_num(a, nan=1.5), torch.nan_to_num(old, nan=1.5))
                counters[-1].count(seen, a, "write" if changed else "read")

    monkeypatch.setattr(common.Tuning, "launch", launch)
    return counters


@pytest.fixture
def roofline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import roofline as module

    yield module
    sys.modules.pop("roofline", None)


def _layer(provider: str, p: float):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    a = torch.randn(R, K, generator=g).requires_grad_()
    b = torch.randn(N, R, generator=g).requires_grad_()
    if provider == "base":
        return lambda x: torch.nn.functional.linear(x, w)
    if provider == "peft":
        peft = pytest.importorskip("peft")
        linear = torch.nn.Linear(K, N, bias=False)
        linear.weight.data.copy_(w)
        model = peft.get_peft_model(torch.nn.Sequential(linear), peft.LoraConfig(
            r=R, lora_alpha=2 * R, lora_dropout=p, target_modules=["0"], init_lora_weights=False))
        return model.train()
    return lambda x: ops.lora_linear(x, w, None, a, b, 2.0, p, backend=provider)


def _measure(provider: str, p: float, counters: list) -> dict:
    layer = _layer(provider, p)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g).requires_grad_()
    dy = torch.randn(M, N, generator=g)
    counter = PassCounter()
    counters.append(counter)
    with counter:
        y = layer(x)
        fwd = tuple(counter.passes)
        y.backward(dy)
    return {"fwd": fwd, "bwd": (counter.passes[0] - fwd[0], counter.passes[1] - fwd[1])}


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("provider", ["base", "eager", pytest.param("split", marks=needs_triton),
                                      pytest.param("fused", marks=needs_triton),
                                      pytest.param("persistent", marks=needs_triton), "peft"])
def test_pass_model_matches_what_each_path_reads_and_writes(provider, p, counted_launches, roofline):
    assert _measure(provider, p, counted_launches) == roofline.LORA_PASSES[provider][p > 0]


def test_fused_makes_the_fewest_extra_passes(roofline):
    extra = {path: roofline.lora_extra_passes(path, 0.0) for path in ("eager", "split", "fused", "peft")}
    assert extra["fused"] < extra["split"] < extra["peft"] and extra["peft"] == 16, extra
