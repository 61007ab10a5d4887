"""Multi-delta LoRA ops (``lora_shrink`` / ``lora_expand`` / ``multi_lora_update``): eager and Triton
(both layouts) against a float64 loop over deltas.

Triton runs compiled with CUDA, otherwise through Triton's interpreter (``tests/conftest.py``);
fp32 and fp16 run everywhere, bfloat16 only on a GPU (skipped with a reason on CPU: the
interpreter has no bfloat16). The CUDA C++ backend has its own GPU-only tests in
``tests/ops/test_cuda_ops.py``. Tolerance rule: see ``opcheck.py``.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from odelta_fast.ops import cuda_ext
from odelta_fast.ops.multi_lora import (
    lora_expand, lora_shrink, multi_lora_reference, multi_lora_update, sort_segments,
)
from opcheck import CUDA, DEVICE, assert_close_to_ref, kernel_dtypes, needs_triton

TRITON = pytest.param("triton", marks=needs_triton)
# (M rows, K, N, D deltas, R padded rank): odd sizes, one row, more deltas than rows.
SHAPES = [(1, 33, 20, 3, 4), (37, 70, 45, 5, 9), (50, 48, 130, 4, 16)]


def rnd(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def make_case(M, K, N, D, R, dtype, seed=0):
    x = rnd(M, K, dtype=dtype, seed=seed)
    a = rnd(D, R, K, dtype=dtype, seed=seed + 1, scale=K ** -0.5)
    b = rnd(D, N, R, dtype=dtype, seed=seed + 2, scale=R ** -0.5)
    # Different ranks in one bank: delta d keeps only its first r_d ranks, the rest zero padding.
    for d in range(D):
        r_d = max(1, R - 3 * d)
        a[d, r_d:] = 0
        b[d, :, r_d:] = 0
    g = torch.Generator().manual_seed(seed + 3)
    ids = torch.randint(-1, D, (M,), generator=g)
    if M > 3:
        ids[1] = D + 2  # out of range: like -1, no delta
        ids[2] = -1
    scal = (torch.rand(D, generator=g) + 0.5).float()
    y0 = rnd(M, N, dtype=dtype, seed=seed + 4)
    return x, a, b, ids.to(DEVICE), scal.to(DEVICE), y0


def torch_same_dtype(x, a, b, ids, scal, y0):
    """What torch computes in the working dtype, one delta at a time (the error yardstick)."""
    y = y0.clone()
    for d in range(a.shape[0]):
        rows = ids == d
        if rows.any():
            y[rows] = y[rows] + float(scal[d]) * ((x[rows] @ a[d].t()) @ b[d].t())
    return y


def run_cases(backend, layout, dtype, shape, split_k=None):
    M, K, N, D, R = shape
    x, a, b, ids, scal, y0 = make_case(M, K, N, D, R, dtype)
    t = lora_shrink(x, a, ids, layout=layout, split_k=split_k, backend=backend)
    t_ref = torch.zeros(M, R, dtype=torch.float64, device=DEVICE)
    for d in range(D):
        t_ref[ids == d] = x[ids == d].double() @ a[d].double().t()
    t_same = torch.zeros(M, R, dtype=dtype, device=DEVICE)
    for d in range(D):
        t_same[ids == d] = x[ids == d] @ a[d].t()
    assert t.dtype == torch.float32
    assert_close_to_ref(t, t_ref, t_same, dtype, f"{backend}/{layout} shrink")
    y = y0.clone()
    out = lora_expand(y, t, b, ids, scal, layout=layout, backend=backend)
    assert out is y
    ref = y0.double() + multi_lora_reference(x, a, b, ids, scal)
    assert_close_to_ref(y, ref, torch_same_dtype(x, a, b, ids, scal, y0), dtype, f"{backend}/{layout} expand")
    no_delta = (ids < 0) | (ids >= D)
    assert torch.equal(y[no_delta], y0[no_delta]), "rows without a delta must be left untouched"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", kernel_dtypes())
def test_eager_matches_reference(dtype, shape):
    run_cases("eager", "auto", dtype, shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", kernel_dtypes())
@pytest.mark.parametrize("layout", ["rows", "segments"])
@pytest.mark.parametrize("backend", [TRITON])
def test_triton_matches_reference(backend, layout, dtype, shape, poison):
    run_cases(backend, layout, dtype, shape)


@needs_triton
def test_triton_split_k_accumulates(poison):
    # Several programs add partial sums of one row into t (atomics): exercised on CPU too.
    run_cases("triton", "rows", torch.float32, (9, 600, 20, 3, 8), split_k=3)


@needs_triton
@pytest.mark.parametrize("layout", ["rows", "segments"])
def test_three_d_input_shared_segments_and_update(layout, poison):
    """(batch, seq, K) inputs, segments sorted once and passed in, the one-call update, and
    accumulation into an existing output."""
    x, a, b, _, scal, _ = make_case(12, 40, 24, 3, 8, torch.float32)
    x3 = x.reshape(3, 4, 40)
    ids = torch.tensor([0, 0, 0, 0, -1, -1, -1, -1, 2, 2, 2, 2], device=DEVICE)
    seg = sort_segments(ids, 3) if layout == "segments" else None
    base = rnd(3, 4, 24, dtype=torch.float32, seed=9)
    out = multi_lora_update(x3, a, b, ids, scal, out=base.clone(), segments=seg, layout=layout, backend="triton")
    ref = base.reshape(12, 24).double() + multi_lora_reference(x, a, b, ids, scal)
    assert out.shape == (3, 4, 24)
    torch.testing.assert_close(out.reshape(12, 24).double(), ref, rtol=1e-5, atol=1e-5)
    alone = multi_lora_update(x3, a, b, ids, scal, segments=seg, layout=layout, backend="triton")
    torch.testing.assert_close(alone.reshape(12, 24).double(), ref - base.reshape(12, 24).double(),
                               rtol=1e-5, atol=1e-5)


def test_sort_segments_groups_rows_stably():
    ids = torch.tensor([2, -1, 0, 2, 5, 0, 1, 2])
    seg = sort_segments(ids, 3)
    assert seg.counts.tolist() == [2, 1, 3]
    assert seg.starts.tolist() == [0, 2, 3]
    assert seg.order[:6].tolist() == [2, 5, 6, 0, 3, 7]
    assert sorted(seg.order[6:].tolist()) == [1, 4]  # rows without a delta come last


@pytest.mark.parametrize("backend", ["eager", TRITON])
def test_bad_inputs_name_the_argument(backend):
    x, a, b, ids, scal, y0 = make_case(6, 16, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match=r"'stacked_a'.*\(\*, \*, 16\)"):
        lora_shrink(x, a[:, :, :15], ids, backend=backend)
    with pytest.raises(ValueError, match=r"'ids'.*\(6,\)"):
        lora_shrink(x, a, ids[:5], backend=backend)
    with pytest.raises(ValueError, match=r"'ids'.*int32 or torch.int64"):
        lora_shrink(x, a, ids.float(), backend=backend)
    with pytest.raises(ValueError, match=r"'stacked_a'.*dtype"):
        lora_shrink(x, a.double(), ids, backend=backend)
    t = lora_shrink(x, a, ids, backend=backend)
    with pytest.raises(ValueError, match=r"'t'.*float32"):
        lora_expand(y0.clone(), t.double(), b, ids, scal, backend=backend)
    with pytest.raises(ValueError, match=r"'scalings'.*\(2\)"):
        lora_expand(y0.clone(), t, b, ids, scal[:1], backend=backend)
    with pytest.raises(ValueError, match=r"'stacked_b'.*\(\*, 8, \*\)"):
        lora_expand(y0.clone(), t, b[:, :7], ids, scal, backend=backend)
    if backend == "triton":
        with pytest.raises(ValueError, match="layout="):
            lora_shrink(x, a, ids, layout="diagonal", backend=backend)


@pytest.mark.skipif(CUDA, reason="checks the CPU-only behaviour of backend='cuda'")
def test_cuda_backend_without_gpu():
    x, a, _, ids, _, _ = make_case(4, 16, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        lora_shrink(x, a, ids, backend="cuda")
    # auto never picks CUDA on CPU tensors, and asking whether the extension exists warns once.
    cuda_ext._reset_for_tests()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert cuda_ext.available() is False
            assert cuda_ext.available() is False
        reason = cuda_ext.unavailable_reason()
        assert reason
        relevant = [w for w in caught if "CUDA C++ kernels are unavailable" in str(w.message)]
        assert len(relevant) == 1, [str(w.message) for w in caught]
    finally:
        cuda_ext._reset_for_tests()


def test_auto_table_documents_every_cuda_op():
    for op in ("multi_lora_shrink", "multi_lora_expand", "lora_merge_"):
        choice, why = cuda_ext.AUTO_TABLE[op]
        assert choice in ("triton", "cuda") and why


@pytest.mark.skipif(CUDA, reason="checks the message on a machine that cannot build the extension")
def test_build_extension_says_why_it_cannot_build(monkeypatch):
    monkeypatch.setenv(cuda_ext.ENV_DISABLE, "0")
    with pytest.raises(RuntimeError, match=f"cannot build .*{cuda_ext.ENV_DISABLE}=0"):
        cuda_ext.build_extension()
    monkeypatch.delenv(cuda_ext.ENV_DISABLE)
    if cuda_ext.missing_prerequisite() is not None:
        with pytest.raises(RuntimeError, match="cannot build the odelta_fast CUDA extension"):
            cuda_ext.build_extension()


def test_extension_flags_target_the_device_arch_only():
    assert cuda_ext.arch_flags(["8.0", "9.0"]) == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    # No sm_90a: the kernels use no Hopper-specific instruction.
    assert not any("90a" in f for f in cuda_ext.nvcc_flags(["9.0"]))


@needs_triton
def test_segments_launch_one_program_per_real_row_block(monkeypatch, poison):
    """The segments kernels run ``cdiv(M, BLOCK_M) + D`` programs (a device-side block schedule),
    not one per delta per possible block; deltas with no rows, one delta owning every row and rows
    of no delta still come out right."""
    from odelta_fast.ops.backend import kernels

    kml = kernels("multi_lora")
    grids = {}
    for tuning in (kml.SHRINK_SEGMENTS, kml.EXPAND_SEGMENTS):
        real = tuning.launch

        def launch(grid, *args, real=real, name=tuning.name, **kwargs):
            grids[name] = grid({"BLOCK_N": 128})
            return real(grid, *args, **kwargs)

        monkeypatch.setattr(tuning, "launch", launch)
    M, K, N, D, R = 70, 40, 50, 9, 8
    block_m = kml.EXPAND_SEGMENTS.config().kwargs["BLOCK_M"]
    for ids_of in (lambda g: torch.randint(-1, D, (M,), generator=g),   # some deltas empty, some rows none
                   lambda g: torch.full((M,), 4)):                        # one delta owns every row
        x, a, b, _, scal, y0 = make_case(M, K, N, D, R, torch.float32)
        ids = ids_of(torch.Generator().manual_seed(5)).to(DEVICE)
        seg = sort_segments(ids, D)
        got = y0.clone()
        lora_expand(got, lora_shrink(x, a, ids, layout="segments", segments=seg, backend="triton"), b, ids, scal,
                    layout="segments", segments=seg, backend="triton")
        want = y0.double() + multi_lora_reference(x, a, b, ids, scal)
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
        blocks = -(-M // block_m) + D
        assert grids["multi_lora_shrink_segments"] == (blocks,)
        assert grids["multi_lora_expand_segments"] == (blocks, -(-N // 128))
