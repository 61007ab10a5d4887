"""Every launch config a GPU can choose, run in Triton's interpreter, against float64.

The interpreter cannot autotune, so by default it runs one config per kernel; a bug in any other
config (a grid sized with the wrong tile side, a mask missing on a partial tile) would pass CI and
reach a GPU, whose autotuner might even prefer the broken config because it does less work. Here
the kernels run with their GPU config lists (``common.gpu_configs()``), each config forced alone
(no pruning: a config the autotuner would prune for one shape is still run), on odd shapes
(M in {1, 33, 130}, K and N not multiples of 16, r in {1, 8, 16, 64}), with outputs poisoned with
NaN so an element no program writes fails, forward and every gradient against the float64
reference (tolerance rule: ``opcheck.py``).

CI runs each config on two shapes (rotating, so every shape runs with several configs) in fp16;
``ODELTA_EVERY_CONFIG_FULL=1`` runs every config on every shape in fp16 and fp32.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from opcheck import DEVICE, LaunchCounter, assert_close_to_ref, needs_triton, noncontiguous, triton_ok

FULL = os.environ.get("ODELTA_EVERY_CONFIG_FULL") == "1"
KERNEL_MODULES = ("lora", "adapter", "bias", "merge", "multi_lora", "experts_lora")

pytestmark = needs_triton


def _tunings() -> dict:
    if not triton_ok():
        return {}
    from odelta_fast.ops.backend import kernels

    for name in KERNEL_MODULES:
        kernels(name)
    return dict(kernels("common").TUNINGS)


TUNINGS = _tunings()
CASES = [(name, i) for name, t in sorted(TUNINGS.items()) for i in range(len(t.gpu))]


def _case_id(case) -> str:
    from odelta_fast.ops.backend import kernels

    name, i = case
    return f"{name}-{kernels('common').config_id(TUNINGS[name].gpu[i])}"


@pytest.fixture
def gpu_lists(poison):
    from odelta_fast.ops.backend import kernels

    with kernels("common").gpu_configs():
        yield


def _pick(shapes, index, count=2):
    """``count`` shapes for config ``index``, rotating through the list (all of them when FULL)."""
    if FULL:
        return list(shapes)
    return [shapes[(index + j) % len(shapes)] for j in range(count)]


DTYPES = (torch.float16, torch.float32) if FULL else (torch.float16,)

# ----------------------------------------------------------------------------- per-op exercises
# (M, K, N, r, dropout p, bias); the shapes of the original dX failure come first.
LORA_SHAPES = [
    (130, 200, 96, 8, 0.0, True),
    (33, 72, 260, 16, 0.2, True),
    (1, 40, 24, 1, 0.2, False),
    (130, 72, 50, 64, 0.1, True),
    (33, 200, 96, 16, 0.0, False),
]


def _exercise_lora(paths):
    def run(index, dtype):
        from test_op_lora import check_lora, make_inputs

        for M, K, N, r, p, bias in _pick(LORA_SHAPES, index):
            for path in paths:
                check_lora(path, make_inputs((M,), K, N, r, dtype, DEVICE, bias=bias, gen_seed=M + K), 1.7, p, dtype)
    return run


exercise_lora = _exercise_lora(("fused", "split"))

# The persistent GEMM: 16-bit rows of 16-byte multiples (TMA-ready), K and N not multiples of 16.
PERSISTENT_SHAPES = [
    (130, 200, 136, 8, 0.1, True),
    (33, 72, 264, 16, 0.0, False),
    (1, 40, 24, 1, 0.2, False),
    (130, 72, 56, 64, 0.1, True),
]


def exercise_lora_persistent(index, dtype):
    from test_op_lora import check_lora, make_inputs

    dtype = torch.float16 if dtype == torch.float32 else dtype  # fp32 runs the pointer-based GEMM
    for M, K, N, r, p, bias in _pick(PERSISTENT_SHAPES, index):
        check_lora("persistent", make_inputs((M,), K, N, r, dtype, DEVICE, bias=bias, gen_seed=M + K), 1.7, p, dtype)


def exercise_lora_grouped(index, dtype):
    from odelta_fast.ops import lora_shrink_grouped

    for M, K, _, r, p, _ in _pick(LORA_SHAPES, index):
        g = torch.Generator().manual_seed(M)
        x = torch.randn(M, K, generator=g).to(dtype).to(DEVICE)
        a_s = [(torch.randn(rr, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE) for rr in (r, max(1, r // 2))]
        outs = lora_shrink_grouped(x, a_s, 0.0, backend="triton")
        for a, out in zip(a_s, outs):
            ref = x.double() @ a.double().t()
            assert_close_to_ref(out, ref, x @ a.t(), dtype, "grouped shrink")


ADAPTER_SHAPES = [  # (M, d, bottleneck, d_out, activation)
    (130, 200, 64, 200, "gelu_new"),
    (33, 72, 16, 90, "silu"),
    (1, 40, 8, 40, "relu"),
    (130, 50, 1, 50, "gelu"),
]


def exercise_adapter(index, dtype):
    from test_op_adapter import check_adapter, make_inputs

    for M, d, b, d_out, act in _pick(ADAPTER_SHAPES, index):
        inputs = make_inputs((M,), d, b, d_out, dtype, DEVICE, residual=d == d_out, seed=M + d)
        check_adapter("triton", inputs, act, 0.8, dtype)


BIAS_SHAPES = [(130, 200), (33, 72), (1, 50), (130, 260)]


def exercise_bias(index, dtype):
    from odelta_fast.ops import bias_add

    for M, N in _pick(BIAS_SHAPES, index):
        g = torch.Generator().manual_seed(M + N)
        y = torch.randn(M, N, generator=g).to(dtype).to(DEVICE).requires_grad_()
        b = torch.randn(N, generator=g).to(dtype).to(DEVICE).requires_grad_()
        gy = torch.randn(M, N, generator=g).to(dtype).to(DEVICE)
        out = bias_add(y, b, backend="triton")
        gyy, gb = torch.autograd.grad(out, [y, b], gy)
        assert_close_to_ref(out, y.double() + b.double(), (y + b).detach(), dtype, "bias_add")
        assert torch.equal(gyy, gy)
        assert_close_to_ref(gb, gy.double().sum(0), gy.sum(0), dtype, "bias grad")


MERGE_SHAPES = [(130, 200, 8), (33, 72, 64), (1, 40, 1), (260, 50, 16)]  # (N, K, r)


def exercise_merge(index, dtype):
    from odelta_fast.ops import lora_merge_

    for N, K, r in _pick(MERGE_SHAPES, index):
        for fan_in_fan_out in (False, True):
            g = torch.Generator().manual_seed(N + K)
            w0 = torch.randn(*((K, N) if fan_in_fan_out else (N, K)), generator=g).to(dtype).to(DEVICE)
            a = (torch.randn(r, K, generator=g) / K ** 0.5).to(dtype).to(DEVICE)
            b = (torch.randn(N, r, generator=g) / r ** 0.5).to(dtype).to(DEVICE)
            delta64 = 1.7 * (b.double() @ a.double())
            delta_same = 1.7 * (b @ a)
            if fan_in_fan_out:
                delta64, delta_same = delta64.t(), delta_same.t()
            w = w0.clone()
            lora_merge_(w, a, b, 1.7, fan_in_fan_out=fan_in_fan_out, backend="triton")
            assert_close_to_ref(w, w0.double() + delta64, w0 + delta_same, dtype, "merge")


MULTI_SHAPES = [(130, 200, 96, 5, 16), (33, 72, 260, 3, 8), (1, 40, 24, 2, 1), (64, 50, 130, 4, 64)]


def _exercise_multi(layout):
    def run(index, dtype):
        from test_multi_lora import run_cases

        for shape in _pick(MULTI_SHAPES, index):
            run_cases("triton", layout, dtype, shape)
    return run


def exercise_experts(index, dtype):
    from test_experts_lora import SHAPES, check_experts

    for j, shape in enumerate(_pick(SHAPES, index)):
        check_experts("triton", dtype, shape, transposed=j % 2 == 1)


EXERCISES = {
    "lora_fwd": [_exercise_lora(("fused",))], "lora_bwd_dx": [_exercise_lora(("fused",))],
    "lora_fwd_persistent": [exercise_lora_persistent], "lora_bwd_dx_persistent": [exercise_lora_persistent],
    "lora_expand": [_exercise_lora(("split",))], "lora_bwd_dy": [exercise_lora],
    "lora_bwd_da": [exercise_lora], "lora_dropout_bits": [exercise_lora],
    "lora_shrink": [exercise_lora, exercise_lora_grouped],
    "adapter_fwd": [exercise_adapter], "adapter_bwd": [exercise_adapter],
    "bias_add": [exercise_bias], "bias_grad": [exercise_bias],
    "lora_merge": [exercise_merge],
    "multi_lora_shrink_rows": [_exercise_multi("rows")], "multi_lora_expand_rows": [_exercise_multi("rows")],
    "multi_lora_shrink_segments": [_exercise_multi("segments"), exercise_experts],
    "multi_lora_expand_segments": [_exercise_multi("segments"), exercise_experts],
    "experts_lora_outer": [exercise_experts],
}


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_gpu_config_matches_reference(gpu_lists, case, dtype):
    from odelta_fast.ops.backend import kernels

    name, index = case
    config = TUNINGS[name].gpu[index]
    with kernels("common").forced(name, config):
        with LaunchCounter(TUNINGS[name]) as launched:
            for exercise in EXERCISES[name]:
                exercise(index, dtype)
        assert launched.count > 0, f"{name} was never launched by its exercise"


def test_every_kernel_has_configs_and_an_exercise():
    """A new ``*_kernel`` without a registered config list, or without an exercise here, fails."""
    from odelta_fast.ops.backend import kernels

    registered = {t.kernel.fn.__name__ if hasattr(t.kernel, "fn") else t.kernel.__name__ for t in TUNINGS.values()}
    for module in KERNEL_MODULES:
        source = Path(kernels(module).__file__).read_text()
        for kernel in re.findall(r"^def (_\w+_kernel)\(", source, flags=re.M):
            assert kernel in registered, f"{module}.{kernel} has no Tuning (no GPU config list)"
    assert set(EXERCISES) == set(TUNINGS), set(EXERCISES) ^ set(TUNINGS)


def test_launches_go_through_tuning():
    """Kernels are launched only by ``Tuning.launch`` (device guard, empty grids, forced configs)."""
    from odelta_fast.ops.backend import kernels

    for module in KERNEL_MODULES:
        source = Path(kernels(module).__file__).read_text()
        assert "wrap_triton" not in source and not re.search(r"\]\[\s*grid\s*\]|_kernel\[", source), module


def test_noncontiguous_inputs_under_gpu_configs(gpu_lists):
    """Strided x, a transposed weight and a sliced lora_b with the first GPU config of each kernel."""
    from test_op_lora import check_lora, make_inputs

    inputs = make_inputs((2, 33), 72, 50, 8, torch.float16, DEVICE)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    inputs["lora_b"] = noncontiguous(inputs["lora_b"].detach()).requires_grad_()
    check_lora("triton", inputs, 0.5, 0.2, torch.float16)
