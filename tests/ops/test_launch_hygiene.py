"""Launch hygiene of the Triton kernels: the device a launch runs on, empty batches, odd strides,
64-bit offsets, atomics' memory semantics and the deterministic mode.

Each test fails on the defect it names (see the docstrings); the GPU-only parts skip with a reason
on a CPU machine.
"""
from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pytest
import torch

from opcheck import CUDA, DEVICE, assert_close_to_ref, needs_triton

pytestmark = needs_triton


def _kernels(name):
    from odelta_fast.ops.backend import kernels

    return kernels(name)


def _lora_case(M, K, N, r, dtype=torch.float32, bias=True):
    from test_op_lora import make_inputs

    return make_inputs((M,), K, N, r, dtype, DEVICE, bias=bias, gen_seed=M + K + N)


def _reference_grads(inputs, scaling, gy, keep=None):
    """float64 output and gradients of every input that requires grad."""
    from odelta_fast.ops import lora_linear_reference

    names = [n for n in ("x", "weight", "bias", "lora_a", "lora_b") if inputs[n] is not None]
    ts = {n: inputs[n].detach().double().requires_grad_(inputs[n].requires_grad) for n in names}
    out = lora_linear_reference(ts["x"], ts["weight"], ts.get("bias"), ts["lora_a"], ts["lora_b"], scaling,
                                keep_scale=keep)
    leaves = [n for n in names if ts[n].requires_grad]
    return out, dict(zip(leaves, torch.autograd.grad(out, [ts[n] for n in leaves], gy.double())))


# ----------------------------------------------------------------------------- device placement
def test_launch_runs_on_the_tensors_device(monkeypatch):
    """Regression: launches ran on the current device, not the tensors' (HF device_map="auto"
    puts layers on cuda:1 while cuda:0 is current). A launch with cuda:1 tensors must happen
    inside torch.cuda.device(cuda:1)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    common = _kernels("common")
    bias = _kernels("bias")
    entered, launched = [], []

    @contextlib.contextmanager
    def fake_device(device):
        entered.append(torch.device(device))
        yield

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launched.append((self.kernel, entered[-1] if entered else None))
            return run

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(common, "wrap_triton", Recorder)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = torch.empty(4, 8, device="cuda:1")
        b = torch.empty(8, device="cuda:1")
        out = torch.empty(4, 8, device="cuda:1")
    bias.ADD.launch(lambda meta: (1, 1), y, b, out, 4, 8, 8, 1, 8, 1, 1)
    assert launched and launched[0][1] == torch.device("cuda:1"), (entered, launched)


@pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_lora_on_second_gpu_while_first_is_current():
    from odelta_fast.ops import lora_linear

    torch.cuda.set_device(0)
    inputs = {k: (v.detach().to("cuda:1").requires_grad_(v.requires_grad) if v is not None else None)
              for k, v in _lora_case(130, 200, 96, 8).items()}
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.5,
                    backend="triton")
    gy = torch.randn_like(y)
    y.backward(gy)
    ref, grads = _reference_grads(inputs, 1.5, gy)
    torch.testing.assert_close(y.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(inputs["x"].grad.double(), grads["x"], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- empty batches
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_with_no_tokens(p, poison):
    """Regression: M = 0 raised ZeroDivisionError in backward (rows per dA split were 0)."""
    from odelta_fast.ops import lora_linear

    inputs = _lora_case(0, 40, 24, 8)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 2.0, p,
                    backend="triton")
    assert y.shape == (0, 24)
    y.sum().backward()
    assert inputs["x"].grad.shape == (0, 40)
    for name in ("lora_a", "lora_b", "bias"):
        assert torch.equal(inputs[name].grad, torch.zeros_like(inputs[name])), name


def test_other_ops_with_no_tokens(poison):
    from odelta_fast.ops import adapter_bottleneck, bias_add, lora_shrink_grouped
    from odelta_fast.ops.multi_lora import lora_expand, lora_shrink

    h = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    wd = torch.randn(8, 40, device=DEVICE, requires_grad=True)
    wu = torch.randn(40, 8, device=DEVICE, requires_grad=True)
    out = adapter_bottleneck(h, wd, None, wu, None, residual=h, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 40) and torch.equal(wd.grad, torch.zeros_like(wd))
    b = torch.randn(40, device=DEVICE, requires_grad=True)
    bias_add(h, b, backend="triton").sum().backward()
    assert torch.equal(b.grad, torch.zeros_like(b))
    outs = lora_shrink_grouped(h, [torch.randn(4, 40, device=DEVICE)], 0.2, backend="triton")
    assert outs[0].shape == (0, 4)
    ids = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    t = lora_shrink(h.detach(), torch.randn(2, 4, 40, device=DEVICE), ids, layout="rows", backend="triton")
    lora_expand(torch.zeros(0, 24, device=DEVICE), t, torch.randn(2, 24, 4, device=DEVICE), ids,
                torch.ones(2, device=DEVICE), layout="rows", backend="triton")


# ----------------------------------------------------------------------------- strides
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_stride_zero_and_noncontiguous_grad_y(p, poison):
    """y.sum() hands backward an expanded grad_y (strides 0, 0); a transposed copy hands it a
    column-major one. Both must give the same gradients as a contiguous grad_y."""
    from odelta_fast.ops import lora_linear

    klora = _kernels("lora")
    results = []
    for kind in ("sum", "column-major", "contiguous"):
        inputs = _lora_case(33, 72, 50, 8)
        torch.manual_seed(3)
        y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.3, p,
                        backend="triton")
        if kind == "sum":
            y.sum().backward()
        elif kind == "column-major":
            y.backward(torch.ones(50, 33, device=DEVICE).t())
        else:
            y.backward(torch.ones(33, 50, device=DEVICE))
        results.append({n: inputs[n].grad for n in ("x", "bias", "lora_a", "lora_b")})
    for kind, res in zip(("sum", "column-major"), results[:2]):
        for name, grad in res.items():
            torch.testing.assert_close(grad, results[2][name], rtol=1e-5, atol=1e-5, msg=f"{kind}: grad {name}")
    # and the contiguous case is right
    inputs = _lora_case(33, 72, 50, 8)
    torch.manual_seed(3)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    keep = klora.dropout_keep_scale(seed, (33, 72), p).double() if p else None
    _, grads = _reference_grads(inputs, 1.3, torch.ones(33, 50, dtype=torch.float64, device=DEVICE), keep)
    for name in ("x", "bias", "lora_a", "lora_b"):
        assert_close_to_ref(results[2][name], grads[name], grads[name].float(), torch.float32, f"grad {name}")


def test_transposed_and_sliced_inputs_and_weights(poison):
    """x as the transpose of a (K, M) buffer (column offsets k * M), a weight sliced out of a wider
    one, a transposed lora_a, a sliced lora_b and a strided bias."""
    from test_op_lora import check_lora

    inputs = _lora_case(33, 72, 50, 8)
    g = torch.Generator().manual_seed(9)
    inputs["x"] = inputs["x"].detach().t().contiguous().t().requires_grad_()
    wide = torch.randn(60, 100, generator=g).to(DEVICE) / 10
    inputs["weight"] = wide[5:55, 3:75]
    inputs["lora_a"] = inputs["lora_a"].detach().t().contiguous().t().requires_grad_()
    inputs["lora_b"] = torch.randn(50, 16, generator=g).to(DEVICE)[:, 4:12].requires_grad_()
    inputs["bias"] = torch.randn(100, generator=g).to(DEVICE)[::2].requires_grad_()
    assert not any(inputs[n].is_contiguous() for n in ("x", "weight", "lora_a", "lora_b", "bias"))
    check_lora("triton", inputs, 0.7, 0.2, torch.float32)


# ----------------------------------------------------------------------------- 64-bit offsets
def test_dropout_offsets_do_not_wrap_at_2_to_the_32():
    """Regression: the dropout counter was int32, so past 2**31 the mask repeated. Element (m, k)
    takes lane k % 4 of the philox call at counter m * cdiv(K, 4) + k // 4 (64 bits): with K = 2**11,
    row 2**23 is counter 2**32, which an int32 counter would wrap to row 0's."""
    from offset_kernels import draw, draw_flat

    K, k0, block_k = 2**11, 2032, 16  # the last 16 columns
    seed = torch.tensor([7], dtype=torch.int64, device=DEVICE)
    rows = torch.tensor([0, 2**23, 2**23 + 1, 2**22], dtype=torch.int32, device=DEVICE)
    out = torch.empty(4, block_k, device=DEVICE)
    draw[(1,)](seed, rows, out, k0, K, N=4, BLOCK_K=block_k)
    groups = torch.arange(k0 // 4, (k0 + block_k) // 4, device=DEVICE)
    counters = (rows.long()[:, None] * (K // 4) + groups[None, :]).reshape(-1)
    flat = torch.empty(counters.numel(), 4, device=DEVICE)
    draw_flat[(1,)](seed, counters, flat, N=counters.numel())
    torch.testing.assert_close(out.reshape(-1), flat.reshape(-1), rtol=0, atol=0)
    assert not torch.equal(out[1], out[0]), "row 2**23 drew row 0's numbers: the counter wrapped"


def test_pointer_offsets_are_64_bit_in_every_kernel():
    """Every offset multiplied by a stride is an int64 value (``r*`` from ``.to(tl.int64)``, or a
    ``step64`` advance): with a transposed input the column offset k * M passes 2**31 once
    M * K does, and an int32 product wraps to a wrong address instead of failing."""
    offenders = []
    for module in ("lora", "adapter", "bias", "merge", "multi_lora"):
        source = Path(_kernels(module).__file__).read_text()
        for line_no, line in enumerate(source.splitlines(), 1):
            for match in re.finditer(r"(\w+)(?:\[[^\]]*\])?\s*\*\s*(stride_\w+)", line):
                operand = match.group(1)
                if operand.startswith(("r", "row", "d", "g", "split", "pid_s")) and not operand.startswith("offs"):
                    continue
                offenders.append(f"{module}.py:{line_no}: {line.strip()}")
    assert not offenders, "int32 offsets times a stride:\n" + "\n".join(offenders)


@pytest.mark.skipif(not CUDA, reason="needs a GPU with > 5 GB free: a transposed input of 2**31 elements")
def test_transposed_input_past_2_to_the_31_elements():
    from odelta_fast.ops import lora_linear

    M, K, N, r = 2**20 + 16, 2**11, 64, 16
    x = torch.randn(K, M, device="cuda", dtype=torch.float16).t()  # column offsets up to K * M > 2**31
    w = torch.randn(N, K, device="cuda", dtype=torch.float16) / K ** 0.5
    a = torch.randn(r, K, device="cuda", dtype=torch.float16) / K ** 0.5
    b = torch.randn(N, r, device="cuda", dtype=torch.float16)
    y = lora_linear(x, w, None, a, b, 1.0, backend="triton")
    rows = torch.tensor([0, M // 2, M - 1], device="cuda")
    ref = x[rows].float() @ w.float().t() + (x[rows].float() @ a.float().t()) @ b.float().t()
    torch.testing.assert_close(y[rows].float(), ref, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------- atomics
class _AtomicRecorder:
    """Records every atomic read-modify-write the interpreter executes: (op, value dtype, semantics)."""

    def __enter__(self):
        from triton.runtime import interpreter

        self.builder = interpreter.InterpreterBuilder
        self.original = self.builder.create_atomic_rmw
        self.calls = []
        recorder = self

        def create_atomic_rmw(builder, rmw_op, ptr, val, mask, sem, scope):
            recorder.calls.append((str(rmw_op), str(val.dtype.scalar if hasattr(val.dtype, "scalar") else val.dtype),
                                   str(sem)))
            return recorder.original(builder, rmw_op, ptr, val, mask, sem, scope)

        self.builder.create_atomic_rmw = create_atomic_rmw
        return self

    def __exit__(self, *exc):
        self.builder.create_atomic_rmw = self.original


def _train_every_op(p=0.2):
    from odelta_fast.ops import adapter_bottleneck, bias_add, lora_linear
    from odelta_fast.ops.multi_lora import lora_shrink

    inputs = _lora_case(130, 72, 50, 8)
    y = lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"], 1.5, p,
                    backend="triton")
    y = adapter_bottleneck(y, torch.randn(8, 50, device=DEVICE, requires_grad=True), None,
                           torch.randn(50, 8, device=DEVICE, requires_grad=True), None, residual=y, backend="triton")
    y = bias_add(y, torch.zeros(50, device=DEVICE, requires_grad=True), backend="triton")
    y.backward(torch.randn_like(y))
    ids = torch.arange(9, device=DEVICE) % 3
    lora_shrink(torch.randn(9, 600, device=DEVICE), torch.randn(3, 8, 600, device=DEVICE), ids, layout="rows",
                split_k=3, backend="triton")
    return {n: inputs[n].grad.clone() for n in ("x", "bias", "lora_a", "lora_b")}


@pytest.mark.skipif(CUDA, reason="records atomics in Triton's interpreter (CPU)")
def test_atomics_are_relaxed():
    """Gradient accumulation needs atomicity, not ordering: every atomic states relaxed semantics
    (Triton's default is acq_rel, a fence per atomic)."""
    with _AtomicRecorder() as rec:
        _train_every_op()
    assert rec.calls, "no atomics recorded: the recorder no longer sees them"
    assert all("RELAXED" in sem for _, _, sem in rec.calls), sorted(set(rec.calls))


@pytest.mark.skipif(CUDA, reason="records atomics in Triton's interpreter (CPU)")
def test_deterministic_mode_uses_no_float_atomics():
    """With torch.use_deterministic_algorithms(True) no floating-point atomic runs (their order,
    hence the rounding, varies run to run on a GPU)."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with _AtomicRecorder() as rec:
            _train_every_op()
    finally:
        torch.use_deterministic_algorithms(old)
    floats = [c for c in rec.calls if "fp" in c[1] or "float" in c[1]]
    assert not floats, sorted(set(floats))


def test_deterministic_mode_gives_the_same_gradients():
    """Same gradients with and without deterministic mode (up to summation order), and bit-identical
    gradients run to run in deterministic mode."""
    old = torch.are_deterministic_algorithms_enabled()
    try:
        torch.manual_seed(0)
        normal = _train_every_op()
        torch.use_deterministic_algorithms(True)
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(_train_every_op())
    finally:
        torch.use_deterministic_algorithms(old)
    for name in normal:
        assert torch.equal(runs[0][name], runs[1][name]), f"grad {name} differs run to run"
        torch.testing.assert_close(runs[0][name], normal[name], rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- unaligned launches
def _pruned_configs(tuning, launcher, *args):
    """The configs ``tuning``'s prune keeps for the launch ``launcher(*args)`` makes (recorded, not run)."""
    seen = []
    tuning.launch = lambda grid, *a, **k: seen.append((a, k))
    try:
        launcher(*args)
    finally:
        del tuning.launch
    (a, k), = seen
    return tuning.prune(tuning.gpu, dict(zip(tuning.kernel.arg_names, a)), **k)


@pytest.mark.parametrize("K, N", [(200, 100), (256, 512)])
def test_unaligned_launches_keep_only_configs_that_do_not_spill(K, N):
    """K or N not a multiple of 16: the GEMMs keep their 32-deep tile, the adapter its 16-row 8-warp
    tile (the configs the `odd` rows of bench/results/kernel-resources.md show spilling least)."""
    common, lora, adapter = _kernels("common"), _kernels("lora"), _kernels("adapter")
    aligned = K % 16 == 0 and N % 16 == 0
    x, w = torch.randn(256, K, dtype=torch.float16), torch.randn(N, K, dtype=torch.float16)
    a, b = torch.randn(8, K, dtype=torch.float16), torch.randn(N, 8, dtype=torch.float16)
    seed = torch.zeros(1, dtype=torch.int64)
    fwd = _pruned_configs(lora.FWD, lora.fused_forward, x, w, None, a, b, 1.0, 0.0, seed)
    dx = _pruned_configs(lora.DX, lora.fused_backward, torch.randn(256, N, dtype=torch.float16), x, w, a, b,
                         torch.randn(256, 8, dtype=torch.float16), torch.empty(0, dtype=torch.uint8), 1.0, 0.0,
                         True, False, False)
    wd, wu = torch.randn(64, K, dtype=torch.float16), torch.randn(K, 64, dtype=torch.float16)
    ad = _pruned_configs(adapter.FWD, adapter.adapter_fwd, x, wd, None, wu, None, x, "gelu_new", 1.0, True)
    if aligned:
        assert len(fwd) > 1 and len(dx) > 1 and len(ad) > 1, (fwd, dx, ad)
    else:
        assert [c.kwargs["BLOCK_K"] for c in fwd] == [32] and [c.kwargs["BLOCK_N"] for c in dx] == [32], (fwd, dx)
        assert [(c.kwargs["BLOCK_M"], c.num_warps) for c in ad] == [(16, 8)], ad
    assert common.launch_aligned({"K": K, "N": N, "stride_xk": 1, "M": 130}) == aligned
