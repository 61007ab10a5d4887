"""Many LoRA deltas in one batch: every row of ``x`` picks its own delta by id.

Two ops, the shrink/expand split of Punica, S-LoRA and vLLM:

* ``lora_shrink(x, stacked_a, ids)``: ``t[i] = x[i] A_{ids[i]}^T``, an ``(M, R)`` float32 buffer
  (float32 so the rank-R intermediate is not rounded between the two products);
* ``lora_expand(y, t, stacked_b, ids, scalings)``: ``y[i] += s_{ids[i]} t[i] B_{ids[i]}^T`` in place,
  so the output is read and written once and no ``M x N`` temporary exists.

``multi_lora_update`` chains them. Deltas of different ranks share one bank: ``stacked_a (D, R, K)``
and ``stacked_b (D, N, R)`` hold every delta zero-padded to the largest rank ``R`` (zero rows of A
and zero columns of B add exactly nothing), and the kernels pad ``R`` further to a tile size inside.
An id outside ``[0, D)`` (``-1`` by convention) means "no delta": the row gets no update.

Layouts (``layout=``), a performance choice only, every layout gives the same numbers:

* ``"rows"`` (BGMV style): one program per row, a matrix-vector product per row; for decode, where
  each sequence contributes one token and rows rarely share a tile.
* ``"segments"`` (SGMV style): rows are grouped by delta (a stable sort of the ids, computed on
  the device with no host synchronisation, see ``sort_segments``) and each group runs as dense
  tiles on the tensor cores; for prefill. Pass ``segments=`` to reuse one sort across layers.

Backends: ``"eager"`` (a loop over deltas: the reference and the CPU path), ``"triton"``
(``kernels/multi_lora.py``), ``"cuda"`` (``csrc/bgmv.cu``, the rows layout, decode-oriented; built
on first use, see ``cuda_ext.py``), ``"auto"`` (see ``AUTO_TABLE`` in ``cuda_ext.py``).

These ops serve inference: they carry no autograd (train one delta at a time with ``LoraModel``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from . import cuda_ext
from .backend import backend_for, kernels, register_op, triton_available
from .checks import check_tensor

SHRINK_OP = "multi_lora_shrink"
EXPAND_OP = "multi_lora_expand"
LAYOUTS = ("auto", "rows", "segments")

# layout="auto": the segments layout needs enough rows per delta to fill a 16-row tensor-core
# tile; below this many rows the per-row kernel wastes nothing and needs no sort. Not measured
# on a GPU yet: the value is vLLM's and Punica's decode/prefill split (one token per sequence
# in decode batches of up to a few dozen sequences).
ROWS_LAYOUT_MAX_M = 64


class Segments(NamedTuple):
    """Rows grouped by delta: ``order`` lists row indices sorted by id (rows without a delta at
    the end), delta ``d`` owns ``order[starts[d] : starts[d] + counts[d]]``. All on the device."""

    order: Tensor   # (M,) int64
    starts: Tensor  # (D,) int64
    counts: Tensor  # (D,) int64


def sort_segments(ids: Tensor, num_deltas: int) -> Segments:
    """Group rows by delta with device ops only (no ``.item()``, no host round trip), so a CUDA
    graph or an async stream keeps running; computed once per batch and shared by every layer."""
    ids = ids.long()
    valid = (ids >= 0) & (ids < num_deltas)
    # Rows without a delta sort after every delta's rows and belong to no segment.
    key = torch.where(valid, ids, torch.full_like(ids, num_deltas))
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_deltas + 1)[:num_deltas]
    starts = torch.cumsum(counts, 0) - counts
    return Segments(order, starts, counts)


# ----------------------------------------------------------------------------- checks
def _check_ids(op: str, ids: Tensor, m: int, device: torch.device) -> None:
    if not isinstance(ids, Tensor):
        raise ValueError(f"{op}: argument 'ids' must be a torch.Tensor of row ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: argument 'ids' has dtype {ids.dtype}; expected torch.int32 or torch.int64")
    if tuple(ids.shape) != (m,):
        raise ValueError(f"{op}: argument 'ids' has shape {tuple(ids.shape)}; expected ({m},), one id per row")
    if ids.device != device:
        raise ValueError(f"{op}: argument 'ids' is on {ids.device}; expected {device} like the input")


def _check_segments(op: str, segments: Segments, m: int, d: int, device) -> None:
    if not isinstance(segments, tuple) or len(segments) != 3:
        raise ValueError(f"{op}: argument 'segments' must be the Segments that sort_segments returns")
    for name, t, n in zip(Segments._fields, segments, (m, d, d)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,) or t.device != device:
            raise ValueError(
                f"{op}: argument 'segments.{name}' must be an int64 tensor of shape ({n},) on {device}; "
                "build it with sort_segments(ids, num_deltas)")


def _layout(layout: str, m: int) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r} is not one of {', '.join(map(repr, LAYOUTS))}")
    if layout == "auto":
        return "rows" if m <= ROWS_LAYOUT_MAX_M else "segments"
    return layout


def _refine(chosen: str, *, device: torch.device, dtype, requested: str, op_name: str = "", **_) -> str:
    """``cuda`` falls back (one warning per process) where the extension cannot be built; ``auto``
    consults the measured table (``cuda_ext.AUTO_TABLE``)."""
    if chosen == "cuda":
        if dtype not in cuda_ext.CUDA_DTYPES:
            raise ValueError(f"backend='cuda' for {op_name!r} takes float16, bfloat16 or float32 tensors; got {dtype}")
        if cuda_ext.available():
            return "cuda"
        # The extension could not be built (available() warned once): Triton, else eager.
        return "triton" if triton_available() else "eager"
    if chosen == "triton" and requested == "auto":
        if cuda_ext.auto_prefers_cuda(op_name) and cuda_ext.available():
            return "cuda"
    return chosen


def _choose(op: str, backend: str, x: Tensor) -> str:
    return backend_for(op, x, backend, op_name=op)


def _as_2d(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1])


# ----------------------------------------------------------------------------- eager reference
@torch.library.custom_op("odelta_fast::multi_lora_shrink_eager", mutates_args=())
def _shrink_eager(x: Tensor, stacked_a: Tensor, ids: Tensor) -> Tensor:
    t = torch.zeros(x.shape[0], stacked_a.shape[1], dtype=torch.float32, device=x.device)
    for d in range(stacked_a.shape[0]):
        rows = (ids == d).nonzero().squeeze(1)
        if rows.numel():
            t[rows] = x[rows].float() @ stacked_a[d].float().t()
    return t


@_shrink_eager.register_fake
def _(x, stacked_a, ids):
    return x.new_empty(x.shape[0], stacked_a.shape[1], dtype=torch.float32)


@torch.library.custom_op("odelta_fast::multi_lora_expand_eager", mutates_args={"y"})
def _expand_eager(y: Tensor, t: Tensor, stacked_b: Tensor, ids: Tensor, scalings: Tensor) -> None:
    for d in range(stacked_b.shape[0]):
        rows = (ids == d).nonzero().squeeze(1)
        if rows.numel():
            update = (t[rows] @ stacked_b[d].float().t()).mul_(scalings[d].float())
            # One rounding: the add happens in fp32, like the kernels' epilogue.
            y[rows] = (y[rows].float() + update).to(y.dtype)


@_expand_eager.register_fake
def _(y, t, stacked_b, ids, scalings):
    return None


# ----------------------------------------------------------------------------- public ops
def lora_shrink(
    x: Tensor, stacked_a: Tensor, ids: Tensor, *, segments: Optional[Segments] = None,
    layout: str = "auto", split_k: Optional[int] = None, backend: str = "auto",
) -> Tensor:
    """``t[i] = x[i] @ stacked_a[ids[i]]^T`` (zero for rows without a delta).

    Shapes: ``x (..., K)``, ``stacked_a (D, R, K)`` (same dtype and device as ``x``), ``ids`` one
    int32/int64 per row of ``x`` (the leading dimensions flattened). Returns float32 ``(..., R)``.
    ``split_k`` (Triton rows layout) splits the reduction over programs; None picks one.
    """
    check_tensor(SHRINK_OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{SHRINK_OP}: argument 'x' must have at least one dimension (..., K)")
    K = x.shape[-1]
    check_tensor(SHRINK_OP, "stacked_a", stacked_a, (None, None, K), like=x)
    lead = x.shape[:-1]
    x2d = _as_2d(x)
    M = x2d.shape[0]
    D, R = stacked_a.shape[0], stacked_a.shape[1]
    _check_ids(SHRINK_OP, ids, M, x.device)
    if segments is not None:
        _check_segments(SHRINK_OP, segments, M, D, x.device)
    chosen = _choose(SHRINK_OP, backend, x)
    if chosen == "eager" or M == 0 or R == 0 or D == 0:
        t = _shrink_eager(x2d, stacked_a, ids)
    elif chosen == "cuda":
        t = cuda_ext.ops().bgmv_shrink(x2d.contiguous(), stacked_a.contiguous(), ids)
    elif _layout(layout, M) == "rows" and segments is None:
        t = kernels("multi_lora").shrink_rows(x2d, stacked_a, ids, int(split_k or 0))
    else:
        seg = segments if segments is not None else sort_segments(ids, D)
        t = kernels("multi_lora").shrink_segments(x2d, stacked_a, seg.order, seg.starts, seg.counts)
    return t.reshape(*lead, R)


def lora_expand(
    y: Tensor, t: Tensor, stacked_b: Tensor, ids: Tensor, scalings: Tensor, *,
    segments: Optional[Segments] = None, layout: str = "auto", backend: str = "auto",
) -> Tensor:
    """``y[i] += scalings[ids[i]] * t[i] @ stacked_b[ids[i]]^T`` in place (rows without a delta
    untouched); returns ``y``.

    Shapes: ``y (..., N)``, ``t (..., R)`` float32 (from ``lora_shrink``), ``stacked_b (D, N, R)``
    (same dtype and device as ``y``), ``ids`` one per row, ``scalings (D,)`` float32.
    """
    check_tensor(EXPAND_OP, "y", y)
    if y.dim() < 1:
        raise ValueError(f"{EXPAND_OP}: argument 'y' must have at least one dimension (..., N)")
    N = y.shape[-1]
    check_tensor(EXPAND_OP, "stacked_b", stacked_b, (None, N, None), like=y)
    D, R = stacked_b.shape[0], stacked_b.shape[2]
    check_tensor(EXPAND_OP, "t", t, (*y.shape[:-1], R))
    if t.dtype != torch.float32 or t.device != y.device:
        raise ValueError(f"{EXPAND_OP}: argument 't' must be float32 on {y.device} (lora_shrink's output); "
                         f"got {t.dtype} on {t.device}")
    check_tensor(EXPAND_OP, "scalings", scalings, (D,))
    if scalings.dtype != torch.float32 or scalings.device != y.device:
        raise ValueError(f"{EXPAND_OP}: argument 'scalings' must be float32 on {y.device}; "
                         f"got {scalings.dtype} on {scalings.device}")
    try:
        y2d = y if y.dim() == 2 else y.view(-1, N)
    except RuntimeError:
        raise ValueError(f"{EXPAND_OP}: argument 'y' is updated in place and must be viewable as (-1, {N}); "
                         f"got shape {tuple(y.shape)} with strides {y.stride()}") from None
    M = y2d.shape[0]
    _check_ids(EXPAND_OP, ids, M, y.device)
    if segments is not None:
        _check_segments(EXPAND_OP, segments, M, D, y.device)
    t2d = _as_2d(t)
    chosen = _choose(EXPAND_OP, backend, y)
    if chosen == "eager" or M == 0 or R == 0 or N == 0 or D == 0:
        _expand_eager(y2d, t2d, stacked_b, ids, scalings)
    elif chosen == "cuda":
        if not y2d.is_contiguous():
            raise ValueError(f"{EXPAND_OP}: backend='cuda' updates 'y' in place and needs it contiguous")
        cuda_ext.ops().bgmv_expand_(y2d, t2d.contiguous(), stacked_b.contiguous(), ids, scalings)
    elif _layout(layout, M) == "rows" and segments is None:
        kernels("multi_lora").expand_rows(y2d, t2d, stacked_b, ids, scalings)
    else:
        seg = segments if segments is not None else sort_segments(ids, D)
        kernels("multi_lora").expand_segments(y2d, t2d, stacked_b, seg.order, seg.starts, seg.counts, scalings)
    return y


def multi_lora_update(
    x: Tensor, stacked_a: Tensor, stacked_b: Tensor, ids: Tensor, scalings: Tensor, *,
    out: Optional[Tensor] = None, segments: Optional[Segments] = None, layout: str = "auto",
    backend: str = "auto",
) -> Tensor:
    """``out[i] (+)= s_{ids[i]} (x[i] A_{ids[i]}^T) B_{ids[i]}^T``: accumulates into ``out`` (the
    base layer's output, in place) when given, else returns the update alone."""
    if out is None:
        out = torch.zeros(*x.shape[:-1], stacked_b.shape[1], dtype=x.dtype, device=x.device)
    t = lora_shrink(x, stacked_a, ids, segments=segments, layout=layout, backend=backend)
    return lora_expand(out, t, stacked_b, ids, scalings, segments=segments, layout=layout, backend=backend)


def multi_lora_backends() -> tuple[str, ...]:
    return ("triton", "cuda")


register_op(SHRINK_OP, multi_lora_backends, _refine)
register_op(EXPAND_OP, multi_lora_backends, _refine)


# ----------------------------------------------------------------------------- float64 reference
def multi_lora_reference(x: Tensor, stacked_a: Tensor, stacked_b: Tensor, ids: Tensor, scalings: Tensor) -> Tensor:
    """The update in float64, one delta at a time: the yardstick for every backend in the tests."""
    x64 = _as_2d(x).double()
    out = torch.zeros(x64.shape[0], stacked_b.shape[1], dtype=torch.float64, device=x.device)
    for d in range(stacked_a.shape[0]):
        rows = ids == d
        out[rows] = (x64[rows] @ stacked_a[d].double().t()) @ stacked_b[d].double().t() * float(scalings[d])
    return out.reshape(*x.shape[:-1], stacked_b.shape[1])
