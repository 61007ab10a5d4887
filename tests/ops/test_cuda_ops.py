"""The CUDA C++ ops (``csrc/``) against float64 references, on a GPU machine.

Skipped with a visible reason without CUDA (the CPU CI compiles the sources instead:
``tests/test_csrc_compile.py``). On a GPU machine the first test JIT-builds the extension (a
minute or two, cached afterwards); a build failure there fails the tests rather than skipping
them, unless nvcc or ninja is missing (then they skip and say which).
"""
from __future__ import annotations

import pytest
import torch

from odelta_fast.ops import cuda_ext
from odelta_fast.ops.multi_lora import lora_expand, lora_shrink, multi_lora_reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="no CUDA device: the CUDA C++ ops only run on a GPU machine")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Per-dtype floors (about 8 ulp at magnitude 1), as in tests/ops/opcheck.py.
FLOOR = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def ext():
    missing = cuda_ext.missing_prerequisite()
    if missing is not None:
        pytest.skip(f"the CUDA extension cannot be built here: {missing}")
    assert cuda_ext.available(), f"the CUDA extension failed to build: {cuda_ext.unavailable_reason()}"
    return cuda_ext.ops()


def rnd(*shape, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).cuda()


def check(out, ref64, same, dtype, what):
    err = (out.double() - ref64).abs().max().item()
    torch_err = (same.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    bound = 2 * torch_err + FLOOR[dtype] * scale
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    assert err <= bound, f"{what}: error {err:.3g} > 2 x torch {torch_err:.3g} + floor ({bound:.3g})"


# (M, K, N, D, R): decode-sized; K/N/R not multiples of the vector width take the scalar paths.
BGMV_SHAPES = [(64, 4096, 4096, 16, 16), (37, 70, 45, 5, 9), (1, 128, 96, 3, 8), (130, 200, 520, 7, 64)]


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("shape", BGMV_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bgmv_shrink_expand(ext, dtype, shape, id_dtype):
    M, K, N, D, R = shape
    x = rnd(M, K, dtype=dtype)
    a = rnd(D, R, K, dtype=dtype, seed=1, scale=K ** -0.5)
    b = rnd(D, N, R, dtype=dtype, seed=2, scale=R ** -0.5)
    ids = torch.randint(-1, D, (M,), generator=torch.Generator().manual_seed(3))
    if M > 2:
        ids[0], ids[1] = -1, D + 5
    ids = ids.to(id_dtype).cuda()
    scal = (torch.rand(D, generator=torch.Generator().manual_seed(4)) + 0.5).cuda()
    y0 = rnd(M, N, dtype=dtype, seed=5)

    t = ext.bgmv_shrink(x, a, ids)
    t_ref = torch.zeros(M, R, dtype=torch.float64, device="cuda")
    t_same = torch.zeros(M, R, dtype=dtype, device="cuda")
    for d in range(D):
        rows = ids == d
        t_ref[rows] = x[rows].double() @ a[d].double().t()
        t_same[rows] = x[rows] @ a[d].t()
    check(t, t_ref, t_same, dtype, "bgmv_shrink")

    y = y0.clone()
    ext.bgmv_expand_(y, t, b, ids, scal)
    ref = y0.double() + multi_lora_reference(x, a, b, ids.long(), scal)
    same = y0.clone()
    for d in range(D):
        rows = ids == d
        same[rows] = same[rows] + float(scal[d]) * ((x[rows] @ a[d].t()) @ b[d].t())
    check(y, ref, same, dtype, "bgmv_expand_")
    none = (ids < 0) | (ids >= D)
    assert torch.equal(y[none], y0[none])


def test_op_layer_cuda_backend(ext):
    x = rnd(64, 256, dtype=torch.bfloat16)
    a = rnd(4, 16, 256, dtype=torch.bfloat16, seed=1, scale=1 / 16)
    b = rnd(4, 128, 16, dtype=torch.bfloat16, seed=2, scale=0.25)
    ids = torch.randint(-1, 4, (64,), device="cuda")
    scal = torch.full((4,), 2.0, device="cuda")
    y_cuda = torch.zeros(64, 128, dtype=torch.bfloat16, device="cuda")
    y_eager = y_cuda.clone()
    lora_expand(y_cuda, lora_shrink(x, a, ids, backend="cuda"), b, ids, scal, backend="cuda")
    lora_expand(y_eager, lora_shrink(x, a, ids, backend="eager"), b, ids, scal, backend="eager")
    torch.testing.assert_close(y_cuda, y_eager, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("shape", [(4096, 4096, 16), (33, 20, 1), (70, 50, 8), (130, 40, 72)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_lora_merge_unmerge(ext, dtype, shape, fan_in_fan_out):
    n, k, r = shape
    w0 = rnd(*((k, n) if fan_in_fan_out else (n, k)), dtype=dtype)
    a = rnd(r, k, dtype=dtype, seed=1, scale=k ** -0.5)
    b = rnd(n, r, dtype=dtype, seed=2, scale=r ** -0.5)
    s = 1.7
    delta64 = (b.double() @ a.double()) * s
    delta64 = delta64.t() if fan_in_fan_out else delta64
    w = w0.clone()
    ext.lora_merge_(w, a, b, s, fan_in_fan_out)
    ref = w0.double() + delta64
    prod = (b @ a) * s  # torch in the working dtype
    prod = prod.t() if fan_in_fan_out else prod
    same = w0 + prod
    check(w, ref, same, dtype, "merge")
    ext.lora_merge_(w, a, b, -s, fan_in_fan_out)
    # Back to the original within the rounding of two passes (torch: add then subtract in dtype).
    check(w, w0.double(), same - prod, dtype, "unmerge")


def test_bad_inputs_raise_value_errors(ext):
    x = rnd(4, 32, dtype=torch.float16)
    a = rnd(2, 8, 32, dtype=torch.float16)
    ids = torch.zeros(4, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match="'x' must be a CUDA tensor"):
        ext.bgmv_shrink(x.cpu(), a, ids)
    with pytest.raises(ValueError, match="'stacked_a' has dtype"):
        ext.bgmv_shrink(x, a.float(), ids)
    with pytest.raises(ValueError, match=r"'stacked_a' has shape .*expected \(\*, \*, 32\)"):
        ext.bgmv_shrink(x, a[:, :, :31], ids)
    with pytest.raises(ValueError, match="'ids' has dtype"):
        ext.bgmv_shrink(x, a, ids.float())
    with pytest.raises(ValueError, match="'x' must be contiguous"):
        ext.bgmv_shrink(rnd(32, 4, dtype=torch.float16).t(), a, ids)
    w = rnd(16, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="'lora_b' has shape"):
        ext.lora_merge_(w, rnd(4, 32, dtype=torch.float16), rnd(15, 4, dtype=torch.float16), 1.0, False)


def test_meta_shapes_and_opcheck(ext):
    x = torch.empty(5, 64, dtype=torch.bfloat16, device="meta")
    a = torch.empty(3, 16, 64, dtype=torch.bfloat16, device="meta")
    ids = torch.empty(5, dtype=torch.int64, device="meta")
    t = ext.bgmv_shrink(x, a, ids)
    assert t.shape == (5, 16) and t.dtype == torch.float32 and t.device.type == "meta"
    xs = rnd(5, 64, dtype=torch.float16)
    as_ = rnd(3, 16, 64, dtype=torch.float16, seed=1)
    ids = torch.tensor([0, 2, -1, 1, 0], device="cuda")
    torch.library.opcheck(ext.bgmv_shrink.default, (xs, as_, ids), test_utils=("test_schema", "test_faketensor"))
    y = rnd(5, 24, dtype=torch.float16)
    b = rnd(3, 24, 16, dtype=torch.float16, seed=2)
    t = ext.bgmv_shrink(xs, as_, ids)
    scal = torch.ones(3, device="cuda")
    torch.library.opcheck(ext.bgmv_expand_.default, (y, t, b, ids, scal), test_utils=("test_schema", "test_faketensor"))
