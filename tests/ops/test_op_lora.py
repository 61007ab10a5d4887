"""LoRA linear (``odelta_fast.ops.lora_linear``): eager and Triton against the float64 reference.

The Triton kernels run compiled when CUDA is present, otherwise through Triton's interpreter
(``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before any kernel module is imported).
fp32 and fp16 run everywhere; bfloat16 runs only on a GPU and is skipped with a visible reason on
CPU, because the interpreter has no bfloat16 (numpy lacks it).

Every comparison follows the tolerance rule in ``opcheck.py``: error against float64 at most twice
torch's own same-dtype error plus a small floor. With dropout, the reference is fed the mask the
backend drew (regenerated from the same seed). Inputs are fresh random values (``lora_b`` too, never
the zero init) and kernel outputs are poisoned with NaN before each run.
"""
from __future__ import annotations

import contextlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from odelta_fast.ops import lora_linear, lora_linear_reference, lora_shrink_grouped
from odelta_fast.ops import lora as lora_mod
from odelta_fast.ops.backend import kernels
from opcheck import CUDA, DEVICE, LaunchCounter, assert_close_to_ref, kernel_dtypes, needs_triton, noncontiguous

# "triton" runs the path the dispatch table picks (split: no GPU measurement ships yet); "fused"
# forces the other one.
BACKENDS = ["eager", pytest.param("triton", marks=needs_triton), pytest.param("fused", marks=needs_triton)]
SEED = 20240611


def make_inputs(lead, K, N, r, dtype, device, *, bias=True, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    return dict(
        x=rnd(*lead, K).requires_grad_(),
        weight=rnd(N, K, scale=K ** -0.5),
        bias=rnd(N).requires_grad_() if bias else None,
        lora_a=rnd(r, K, scale=K ** -0.5).requires_grad_(),
        lora_b=rnd(N, r, scale=r ** -0.5).requires_grad_(),
    )


def drawn_keep(backend, p, shape, device, dtype):
    """The keep multiplier the op drew right after ``torch.manual_seed(SEED)``."""
    if p == 0.0:
        return None
    torch.manual_seed(SEED)
    if backend != "eager":  # triton, split, fused: the kernels' mask
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        return kernels("lora").dropout_keep_scale(seed, shape, p).double()
    seed = lora_mod.new_dropout_seed()
    m = 1
    for s in shape[:-1]:
        m *= s
    # drawn in the op's own dtype (the random stream depends on it), compared in float64
    keep = lora_mod.dropout_keep_scale((m, shape[-1]), p, int(seed.item()), device, dtype)
    return keep.double().reshape(shape)


def grads_of(out, grad, tensors):
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    got = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return got


def check_lora(backend, inputs, scaling, p, dtype, *, grad_weight=False):
    x, weight, bias, a, b = (inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
    torch.manual_seed(SEED)
    y = lora_linear(x, weight, bias, a, b, scaling, p, backend=backend)
    keep = drawn_keep(backend, p, tuple(x.shape), x.device, dtype)
    if keep is not None and keep.numel():
        kept = (keep != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 0.1 + 3.0 / max(1, keep.numel()) ** 0.5, f"keep fraction {kept} for p={p}"
        vals = keep.unique()
        assert torch.all((vals == 0) | ((vals - 1 / (1 - p)).abs() < 1e-3)), vals
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype).to(y.device)
    tensors = [x, weight, bias, a, b]
    got = grads_of(y, gy, tensors)

    def ref(dt, keep_scale):
        ts = [None if t is None else t.detach().to(dt).requires_grad_(t.requires_grad) for t in tensors]
        out = lora_linear_reference(*ts, scaling, keep_scale=None if keep_scale is None else keep_scale.to(dt))
        return out, grads_of(out, gy.to(dt), ts)

    y64, g64 = ref(torch.float64, keep)
    yt, gt = ref(dtype, keep)
    assert_close_to_ref(y, y64, yt, dtype, f"{backend} y")
    names = [n for n, t in zip(("x", "weight", "bias", "lora_a", "lora_b"), tensors) if t is not None and t.requires_grad]
    for name, a_, r_, t_ in zip(names, got, g64, gt):
        assert a_ is not None, f"no gradient for {name}"
        assert_close_to_ref(a_, r_, t_, dtype, f"{backend} grad {name}")
    return y


SHAPES = [  # (lead, K, N, r, bias): M in {1, 37, 300}, K and N not multiples of 16, r in {1, 8, 16, 64}
    ((1,), 20, 33, 1, True),
    ((37,), 50, 70, 8, False),
    ((37,), 90, 45, 16, True),
    ((300,), 70, 50, 64, True),
    ((300,), 33, 130, 8, False),
]


@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"M{s[0][0]}-K{s[1]}-N{s[2]}-r{s[3]}")
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_matches_reference(backend, shape, dtype, p, poison):
    lead, K, N, r, bias = shape
    inputs = make_inputs(lead, K, N, r, dtype, DEVICE, bias=bias)
    check_lora(backend, inputs, 1.7, p, dtype)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_3d_noncontiguous(backend, dtype, p, poison):
    inputs = make_inputs((2, 19), 45, 38, 8, dtype, DEVICE)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    # GPT-2 Conv1D layout: the weight is the transpose of a (K, N) parameter.
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    assert not inputs["weight"].is_contiguous()
    inputs["lora_b"] = noncontiguous(inputs["lora_b"].detach()).requires_grad_()
    y = check_lora(backend, inputs, 0.5, p, dtype)
    assert y.shape == (2, 19, 38)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_only_adapter_grads_and_trained_weight(backend, poison):
    dtype = torch.float32
    inputs = make_inputs((37,), 50, 40, 4, dtype, DEVICE, bias=False)
    inputs["x"] = inputs["x"].detach()  # no grad for x: dX skipped
    check_lora(backend, inputs, 2.0, 0.1, dtype)
    inputs = make_inputs((37,), 50, 40, 4, dtype, DEVICE)
    inputs["weight"].requires_grad_()  # a trained base weight still gets its gradient
    check_lora(backend, inputs, 2.0, 0.1, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_eval_disables_dropout(backend):
    inputs = make_inputs((37,), 50, 40, 4, torch.float32, DEVICE)
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b")]
    y_eval = lora_linear(*args, 2.0, 0.5, training=False, backend=backend)
    y_p0 = lora_linear(*args, 2.0, 0.0, backend=backend)
    torch.testing.assert_close(y_eval, y_p0)
    torch.manual_seed(1)
    y1 = lora_linear(*args, 2.0, 0.5, backend=backend)
    torch.manual_seed(1)
    y2 = lora_linear(*args, 2.0, 0.5, backend=backend)
    y3 = lora_linear(*args, 2.0, 0.5, backend=backend)
    torch.testing.assert_close(y1, y2)  # seeded: repeatable
    assert not torch.equal(y1, y3)  # a new seed each call
    assert not torch.equal(y1, y_p0)


@needs_triton
def test_triton_dropout_mask_is_philox_of_seed_and_offset():
    klora = kernels("lora")
    seed = torch.tensor([123], dtype=torch.int64, device=DEVICE)
    k1 = klora.dropout_keep_scale(seed, (37, 50), 0.25)
    k2 = klora.dropout_keep_scale(123, (37, 50), 0.25, DEVICE)
    k3 = klora.dropout_keep_scale(seed + 1, (37, 50), 0.25)
    torch.testing.assert_close(k1, k2, rtol=0, atol=0)
    assert not torch.equal(k1, k3)
    torch.testing.assert_close(k1.unique().double(), torch.tensor([0.0, 1 / 0.75], dtype=torch.float64, device=DEVICE))
    # A 3-D shape is the 2-D mask of the flattened rows: the op flattens leading dims the same way.
    torch.testing.assert_close(klora.dropout_keep_scale(seed, (37, 1, 50), 0.25).reshape(37, 50), k1)
    big = klora.dropout_keep_scale(seed, (300, 130), 0.25)
    assert abs((big != 0).float().mean().item() - 0.75) < 0.01


# ----------------------------------------------------------------------------- property test
@needs_triton
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    m=st.integers(1, 70), k=st.integers(1, 80), n=st.integers(1, 80), r=st.integers(1, 20),
    dtype=st.sampled_from([torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])),
    lead3d=st.booleans(), x_strided=st.booleans(), w_transposed=st.booleans(), p=st.sampled_from([0.0, 0.15]),
    bias=st.booleans(), scaling=st.floats(0.1, 4.0), path=st.sampled_from(["split", "fused", "persistent"]),
)
def test_lora_property(poison, m, k, n, r, dtype, lead3d, x_strided, w_transposed, p, bias, scaling, path):
    lead = (1, m) if lead3d else (m,)
    inputs = make_inputs(lead, k, n, r, dtype, DEVICE, bias=bias, gen_seed=m * 1000 + k)
    if x_strided:
        inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    if w_transposed:
        inputs["weight"] = inputs["weight"].t().contiguous().t()
    check_lora(path, inputs, scaling, p, dtype)


# ----------------------------------------------------------------------------- grouped shrink
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("backend", BACKENDS[:2])
def test_grouped_shrink(backend, dtype, p, poison):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 37, 50, generator=g).to(dtype).to(DEVICE).requires_grad_()
    ranks = (8, 4, 16)
    a_s = [(torch.randn(r, 50, generator=g) / 7).to(dtype).to(DEVICE).requires_grad_() for r in ranks]
    torch.manual_seed(SEED)
    outs = lora_shrink_grouped(x, a_s, p, backend=backend)
    assert [tuple(o.shape) for o in outs] == [(2, 37, r) for r in ranks]
    keeps = [None] * len(ranks)
    if p > 0:
        torch.manual_seed(SEED)
        if backend == "triton":
            seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
            keeps = [kernels("lora").dropout_keep_scale(seed + i, (2, 37, 50), p).double() for i in range(len(ranks))]
        else:
            seeds = [lora_mod.new_dropout_seed() for _ in ranks]
            keeps = [lora_mod.dropout_keep_scale((74, 50), p, int(s.item()), DEVICE, dtype).double().reshape(2, 37, 50)
                     for s in seeds]
        assert not torch.equal(keeps[0], keeps[1]), "each group needs its own mask"
    grads_out = [torch.randn(o.shape, generator=g).to(dtype).to(DEVICE) for o in outs]
    got = torch.autograd.grad(outs, [x, *a_s], grads_out)

    def ref(dt):
        xr = x.detach().to(dt).requires_grad_()
        ar = [a.detach().to(dt).requires_grad_() for a in a_s]
        o = [(xr if kp is None else xr * kp.to(dt)) @ a.t() for a, kp in zip(ar, keeps)]
        return o, torch.autograd.grad(o, [xr, *ar], [go.to(dt) for go in grads_out])

    o64, g64 = ref(torch.float64)
    ot, gt = ref(dtype)
    for i in range(len(ranks)):
        assert_close_to_ref(outs[i], o64[i], ot[i], dtype, f"group {i} output")
    for i, (a_, r_, t_) in enumerate(zip(got, g64, gt)):
        assert_close_to_ref(a_, r_, t_, dtype, f"grad {i}")


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_bad_inputs(backend):
    inputs = make_inputs((5,), 12, 10, 4, torch.float32, DEVICE)
    x, w, b, a, bb = (inputs[k] for k in ("x", "weight", "bias", "lora_a", "lora_b"))
    cases = [
        (dict(weight=w[:, :11]), "'weight'", "(*, 12)"),
        (dict(bias=b[:9]), "'bias'", "(10)"),
        (dict(lora_a=a[:, :11]), "'lora_a'", "(*, 12)"),
        (dict(lora_b=bb[:, :3]), "'lora_b'", "(10, 4)"),
        (dict(lora_b=bb.half()), "'lora_b'", "dtype"),
        (dict(x=x.long()), "'x'", "dtype"),
    ]
    for override, name, expected in cases:
        kw = dict(x=x, weight=w, bias=b, lora_a=a, lora_b=bb)
        kw.update(override)
        with pytest.raises(ValueError) as err:
            lora_linear(kw["x"], kw["weight"], kw["bias"], kw["lora_a"], kw["lora_b"], 1.0, backend=backend)
        assert name in str(err.value) and expected in str(err.value), str(err.value)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_linear(x, w, b, a, bb, 1.0, 1.0, backend=backend)
    with pytest.raises(ValueError, match=r"lora_as\[1\]"):
        lora_shrink_grouped(x, [a, a[:, :5]], backend=backend)
    if CUDA:
        with pytest.raises(ValueError, match="'weight'.*cuda|'weight'.*cpu"):
            lora_linear(x, w.cpu() if x.is_cuda else w, b, a, bb, 1.0, backend=backend)


@needs_triton
@pytest.mark.parametrize("p", [0.05, 0.5])
def test_triton_dropout_keeps_one_minus_p_within_binomial_error(p):
    """Over 10^6 elements the kept fraction is 1-p within 5 binomial standard deviations (the
    forward, dX and dA kernels all read this one packed mask: ``check_lora`` checks each result
    against the reference built from it)."""
    keep = kernels("lora").dropout_keep_scale(torch.tensor([2024], dtype=torch.int64, device=DEVICE), (1000, 1000), p)
    kept = (keep != 0).double().mean().item()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(kept - (1 - p)) < 5 * sigma, f"kept {kept:.5f} of 10^6, expected {1 - p} +- {5 * sigma:.5f}"


# ----------------------------------------------------------------------------- the persistent path
# (lead, K, N, r, bias, TMA-ready in 16-bit): rows of 16-byte multiples but K and N not multiples of
# 16, so tiles are partial; the last two are not TMA-ready (a 16-bit row of 50 or 45 elements is not
# a multiple of 16 bytes) and run the fused path's pointer-based GEMM instead.
PERSISTENT_SHAPES = [
    ((130,), 200, 136, 8, True, True),
    ((2, 33), 72, 264, 16, False, True),
    ((1,), 40, 24, 1, True, True),
    ((0,), 64, 64, 4, True, True),
    ((37,), 50, 40, 4, True, False),
    ((300,), 70, 45, 64, True, False),
]


@contextlib.contextmanager
def _persistent_launches():
    """Launch counts of the persistent GEMM's two tunings, ``[forward, dX]``, filled on exit."""
    counts = []
    with LaunchCounter(kernels("lora").PERSISTENT_FWD) as fwd, LaunchCounter(kernels("lora").PERSISTENT_DX) as dx:
        yield counts
    counts += [fwd.count, dx.count]


@needs_triton
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("shape", PERSISTENT_SHAPES, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}-r{s[3]}")
def test_persistent_path_matches_reference(shape, dtype, p, poison):
    """The persistent TMA GEMM (forward and dX) against float64, and it is chosen exactly where it
    may run: 16-bit tensors whose rows TMA can copy (M = 0 reaches ``Tuning.launch``, which skips
    the empty grid)."""
    lead, K, N, r, bias, tma_ready = shape
    inputs = make_inputs(lead, K, N, r, dtype, DEVICE, bias=bias, gen_seed=K + N)
    with _persistent_launches() as counts:
        check_lora("persistent", inputs, 1.3, p, dtype)
    runs = tma_ready and dtype != torch.float32
    assert counts == ([1, 1] if runs else [0, 0]), counts


@needs_triton
def test_persistent_path_falls_back_for_layouts_tma_cannot_copy(poison):
    """A strided x or a transposed weight (unit stride on the wrong side) runs the pointer GEMM."""
    inputs = make_inputs((40,), 72, 56, 8, torch.float16, DEVICE, gen_seed=5)
    inputs["weight"] = inputs["weight"].t().contiguous().t()
    with _persistent_launches() as counts:
        check_lora("persistent", inputs, 1.0, 0.1, torch.float16)
    assert counts == [0, 0], counts
    inputs = make_inputs((40,), 72, 56, 8, torch.float16, DEVICE, gen_seed=5)
    inputs["x"] = noncontiguous(inputs["x"].detach()).requires_grad_()
    with _persistent_launches() as counts:
        check_lora("persistent", inputs, 1.0, 0.1, torch.float16)
    assert counts == [0, 1], counts  # dX's operands (dY, W, dX) are still TMA-ready
