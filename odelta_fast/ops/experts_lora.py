"""LoRA on fused mixture-of-experts weights: one low-rank pair per expert, applied only to the
tokens routed to that expert.

transformers 5 keeps a layer's experts as 3-D parameters (Mixtral's ``gate_up_proj (E, 2I, H)`` and
``down_proj (E, H, I)``; ``(E, in, out)`` where the class says ``is_transposed``). Expert ``e`` has
``A_e (r, K)`` and ``B_e (N, r)``; its update ``s (x A_e^T) B_e^T`` is computed as a grouped shrink and
expand over the rows routed to it, never as a dense per-expert delta ``s B_e A_e`` (``E x N x K``:
400 MB for 128 experts of 2048 x 768 in bf16, rebuilt every forward by PEFT's ``target_parameters``).

Rows are token-expert pairs sorted by expert (``route_tokens``, the multi-delta segment sort) and
gathered into ``x (S, K)``: expert ``e`` owns rows ``starts[e] : starts[e] + counts[e]``; rows past
the last segment (expert-parallel sentinels) belong to no expert and get zeros.

* ``experts_lora_linear``: ``y = x W_e^T + b_e + s (x A_e^T) B_e^T`` per segment, differentiable in
  ``x``, the factors, and the weight / bias when they require grad.
* ``experts_lora_reference``: the same in float64 with PEFT's formula ``x (W_e + s B_e A_e)^T``: the
  yardstick of every backend.
* ``experts_delta_weight`` / ``experts_lora_merge_``: ``s B_e A_e`` laid out like the parameter
  (fp32 accumulation), for merges.

Backends: ``"eager"`` (a loop over experts with torch matmuls: the CPU path; reads the counts on
the host once) and ``"triton"`` (base GEMMs through torch's ``grouped_mm`` on CUDA bf16, the
per-expert loop otherwise; low-rank shrink / expand / factor gradients in the segment kernels of
``kernels/experts_lora.py``, with a custom backward that computes no weight gradient for a
frozen weight). ``"auto"`` picks Triton for CUDA tensors.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backend import has_dtensor, kernels, resolve_backend
from .checks import check_tensor
from .multi_lora import sort_segments

OP = "experts_lora_linear"


class ExpertRows(NamedTuple):
    """Token-expert pairs grouped by expert, all on the device (no host synchronisation)."""

    order: Tensor   # (S,) pair index (token * top_k + slot) of each sorted row
    token: Tensor   # (S,) token index of each sorted row
    expert: Tensor  # (S,) expert of each sorted row (>= E for rows of no expert)
    starts: Tensor  # (E,) first row of each expert
    counts: Tensor  # (E,) rows of each expert


def route_tokens(top_k_index: Tensor, num_experts: int) -> ExpertRows:
    """Sort the ``(T, top_k)`` routing choices by expert (stable, on the device)."""
    if top_k_index.dim() != 2:
        raise ValueError(f"route_tokens: 'top_k_index' must be (tokens, top_k); got shape {tuple(top_k_index.shape)}")
    ids = top_k_index.reshape(-1).long()
    seg = sort_segments(ids, num_experts)
    return ExpertRows(seg.order, seg.order // top_k_index.shape[1], ids[seg.order], seg.starts, seg.counts)


def gather_rows(hidden_states: Tensor, rows: ExpertRows) -> Tensor:
    """``(S, H)``: each token's hidden state once per expert it is routed to, in row order."""
    return hidden_states[rows.token]


def combine_rows(out: Tensor, top_k_weights: Tensor, rows: ExpertRows, dtype: torch.dtype) -> Tensor:
    """``(T, H)``: each token's expert outputs weighted by its routing weights and summed.

    Deterministic (a gather back to pair order and a sum over ``top_k``, no atomic scatter), in the
    promoted dtype of outputs and weights (fp32 router weights sum bf16 outputs in fp32), then
    rounded once to ``dtype``."""
    weighted = out * top_k_weights.reshape(-1)[rows.order].unsqueeze(-1)
    inverse = torch.empty_like(rows.order)
    inverse[rows.order] = torch.arange(rows.order.numel(), device=rows.order.device)
    T, k = top_k_weights.shape
    return weighted[inverse].view(T, k, out.shape[-1]).sum(dim=1).to(dtype)


# ----------------------------------------------------------------------------- checks
def _check(x, weight, bias, lora_a, lora_b, rows: ExpertRows, transposed: bool) -> tuple[int, int, int]:
    check_tensor(OP, "x", x, (None, None))
    if weight.dim() != 3:
        raise ValueError(f"{OP}: argument 'weight' must be (experts, out, in) or, transposed, (experts, in, out); "
                         f"got shape {tuple(weight.shape)}")
    E = weight.shape[0]
    N, K = (weight.shape[2], weight.shape[1]) if transposed else (weight.shape[1], weight.shape[2])
    check_tensor(OP, "weight", weight, (E, K, N) if transposed else (E, N, K), like=x)
    check_tensor(OP, "bias", bias, (E, N), like=x, optional=True)
    if (lora_a is None) != (lora_b is None):
        raise ValueError(f"{OP}: pass both 'lora_a' and 'lora_b', or neither")
    if lora_a is not None:
        check_tensor(OP, "lora_a", lora_a, (E, None, K), like=x)
        check_tensor(OP, "lora_b", lora_b, (E, N, lora_a.shape[1]), like=x)
    for name, t, n in (("rows.starts", rows.starts, E), ("rows.counts", rows.counts, E)):
        if not isinstance(t, Tensor) or t.dtype != torch.int64 or tuple(t.shape) != (n,) or t.device != x.device:
            raise ValueError(f"{OP}: argument '{name}' must be an int64 tensor of shape ({n},) on {x.device}; "
                             "build it with route_tokens(top_k_index, num_experts)")
    return E, N, K


def _expert_weight(weight: Tensor, e: int, transposed: bool) -> Tensor:
    """Expert ``e``'s weight as ``(N, K)`` (a view)."""
    return weight[e].t() if transposed else weight[e]


# ----------------------------------------------------------------------------- eager
def _eager(x, weight, bias, lora_a, lora_b, scaling, rows, transposed, N) -> Tensor:
    # Plain torch per segment, differentiable by autograd; the counts are read once.
    # Segments are contiguous and in expert order: the outputs are concatenated, not scattered.
    pieces = []
    start = 0
    for e, count in enumerate(rows.counts.tolist()):
        if count == 0:
            continue
        xe = x[start:start + count]
        w = _expert_weight(weight, e, transposed)
        ye = torch.addmm(bias[e], xe, w.t()) if bias is not None else xe @ w.t()
        if lora_a is not None:
            ye = torch.addmm(ye, xe @ lora_a[e].t(), lora_b[e].t(), alpha=scaling)
        pieces.append(ye)
        start += count
    if start < x.shape[0]:  # rows of no expert
        pieces.append(x.new_zeros(x.shape[0] - start, N))
    return torch.cat(pieces) if pieces else x.new_zeros(0, N)


# ----------------------------------------------------------------------------- triton (+ grouped_mm)
def _grouped_mm_usable(a: Tensor, b: Tensor) -> bool:
    """torch's grouped GEMM on CUDA (bf16, 16-byte aligned strides, Hopper-class and newer);
    elsewhere the per-expert loop runs."""
    grouped = getattr(torch.nn.functional, "grouped_mm", None)
    if grouped is None or a.device.type != "cuda" or a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    es = a.element_size()
    return all((s * es) % 16 == 0 for s in (*a.stride()[:-1], *b.stride()[:-1]) if s != 1) and a.data_ptr() % 16 == 0 \
        and b.data_ptr() % 16 == 0


def _grouped_matmul(a: Tensor, b: Tensor, starts: Tensor, counts: Tensor, out_cols: int) -> Tensor:
    """``out[rows of e] = a[rows of e] @ b[e]`` for ``b (E, inner, out_cols)`` (any strides)."""
    if _grouped_mm_usable(a, b):
        offs = torch.cumsum(counts, 0).to(torch.int32)
        out = torch.nn.functional.grouped_mm(a, b, offs=offs)
        total = starts[-1] + counts[-1]
        # grouped_mm leaves rows past the last offset unwritten.
        return out.masked_fill_((torch.arange(a.shape[0], device=a.device) >= total).unsqueeze(-1), 0)
    out = a.new_zeros(a.shape[0], out_cols)
    start = 0
    for e, count in enumerate(counts.tolist()):
        if count:
            torch.mm(a[start:start + count], b[e], out=out[start:start + count])
        start += count
    return out


def _row_expert(expert: Tensor, E: int) -> tuple[Tensor, Tensor]:
    valid = expert < E
    return expert.clamp(max=E - 1), valid


class _ExpertsLoraTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, starts, counts, expert, transposed):
        E, N = weight.shape[0], (weight.shape[2] if transposed else weight.shape[1])
        wt = weight if transposed else weight.transpose(1, 2)  # (E, K, N)
        y = _grouped_matmul(x, wt, starts, counts, N)
        if bias is not None:
            idx, valid = _row_expert(expert, E)
            y.add_(bias[idx] * valid.unsqueeze(-1).to(y.dtype))
        ker = kernels("experts_lora")
        t = ker.shrink(x, lora_a, starts, counts)  # (S, r) fp32
        ker.expand_(y, t, lora_b, starts, counts, float(scaling))
        ctx.save_for_backward(x, weight, lora_a, lora_b, t, starts, counts, expert)
        ctx.scaling, ctx.transposed, ctx.has_bias = float(scaling), transposed, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_a, lora_b, t, starts, counts, expert = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        E, s = weight.shape[0], ctx.scaling
        ker = kernels("experts_lora")
        dy = dy.contiguous()
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        g = None
        if need_x or need_a:
            # dY B_e (S, r): B viewed (E, r, N) through its strides, no copy.
            g = ker.shrink(dy, lora_b.transpose(1, 2), starts, counts)
        if need_x:
            w_kn = weight.transpose(1, 2) if ctx.transposed else weight  # (E, N, K): dX = dY W_e
            grad_x = _grouped_matmul(dy, w_kn, starts, counts, x.shape[1])
            ker.expand_(grad_x, g, lora_a.transpose(1, 2), starts, counts, s)
        if need_a:
            grad_a = ker.segment_outer(g, x, starts, counts).mul_(s).to(lora_a.dtype)  # s (dY B_e)^T X_e
        if need_bb:
            grad_b = ker.segment_outer(dy, t, starts, counts).mul_(s).to(lora_b.dtype)  # s dY_e^T (X_e A_e^T)
        if need_w:
            # A trained expert weight (rare: LoRA freezes it): dW_e = dY_e^T X_e, laid out like W.
            gw = ker.segment_outer(dy, x, starts, counts)  # (E, N, K)
            grad_w = (gw.transpose(1, 2) if ctx.transposed else gw).to(weight.dtype)
        if need_b and ctx.has_bias:
            idx, valid = _row_expert(expert, E)
            grad_bias = torch.zeros(E, dy.shape[1], dtype=torch.float32, device=dy.device).index_add_(
                0, idx, dy.float() * valid.unsqueeze(-1)).to(dy.dtype)
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None, None, None


# ----------------------------------------------------------------------------- public op
def experts_lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Optional[Tensor], lora_b: Optional[Tensor],
    scaling: float, rows: ExpertRows, *, transposed: bool = False, backend: str = "auto",
) -> Tensor:
    """``y[i] = x[i] W_e^T + b_e + scaling (x[i] A_e^T) B_e^T`` for the rows ``i`` of each expert ``e``.

    Shapes: ``x (S, K)`` rows sorted by expert (``gather_rows``), ``weight (E, N, K)`` (``(E, K, N)``
    when ``transposed``), ``bias (E, N)`` or None, ``lora_a (E, r, K)``, ``lora_b (E, N, r)`` (both
    None: the grouped base projection alone), ``rows`` from ``route_tokens``. Returns ``(S, N)``.
    """
    E, N, K = _check(x, weight, bias, lora_a, lora_b, rows, transposed)
    chosen = resolve_backend(OP, backend, x.device, implemented=experts_lora_backends(), dtype=x.dtype)
    if chosen == "eager" or lora_a is None or lora_a.shape[1] == 0 or has_dtensor(x, weight, lora_a, lora_b):
        return _eager(x, weight, bias, lora_a, lora_b, float(scaling), rows, transposed, N)
    return _ExpertsLoraTriton.apply(x, weight, bias, lora_a, lora_b, float(scaling), rows.starts, rows.counts,
                                    rows.expert, transposed)


def experts_lora_backends() -> tuple[str, ...]:
    return ("triton",)


# ----------------------------------------------------------------------------- merge
def experts_delta_weight(lora_a: Tensor, lora_b: Tensor, scaling: float, *, transposed: bool = False) -> Tensor:
    """``s B_e A_e`` for every expert in fp32, laid out like the parameter: ``(E, N, K)``, or
    ``(E, K, N)`` when ``transposed``."""
    delta = torch.bmm(lora_b.float(), lora_a.float()).mul_(scaling)
    return delta.transpose(1, 2) if transposed else delta


@torch.no_grad()
def experts_lora_merge_(param: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float, *,
                        transposed: bool = False, sign: int = 1) -> Tensor:
    """``param += sign * s B_e A_e`` for every expert, in place, fp32 accumulation and one rounding.
    ``param`` is ``(E, N, K)`` (``(E, K, N)`` when ``transposed``) or, for one expert, ``(N, K)``."""
    if sign not in (1, -1):
        raise ValueError(f"experts_lora_merge_: argument 'sign' is {sign}; expected 1 or -1")
    target = param if param.dim() == 3 else param.unsqueeze(0)
    delta = experts_delta_weight(lora_a.to(param.device), lora_b.to(param.device), scaling, transposed=transposed)
    if tuple(delta.shape) != tuple(target.shape):
        raise ValueError(f"experts_lora_merge_: the delta has shape {tuple(delta.shape)}; the parameter "
                         f"{tuple(param.shape)}")
    # Expert by expert: one fp32 copy of a single expert at a time, not of the whole stack.
    for e in range(target.shape[0]):
        target[e].copy_(target[e].float().add_(delta[e], alpha=sign))
    return param


# ----------------------------------------------------------------------------- float64 reference
def experts_lora_reference(x, weight, bias, lora_a, lora_b, scaling, rows: ExpertRows, *, transposed=False) -> Tensor:
    """PEFT's formula in float64: ``x (W_e + s B_e A_e)^T + b_e`` per expert (the dense delta)."""
    E = weight.shape[0]
    w = weight.double()
    if lora_a is not None:
        w = w + experts_delta_weight(lora_a.double(), lora_b.double(), 1.0, transposed=transposed).double() * scaling
    N = w.shape[2] if transposed else w.shape[1]
    out = torch.zeros(x.shape[0], N, dtype=torch.float64, device=x.device)
    start = 0
    for e, count in enumerate(rows.counts.tolist()):
        if count:
            we = w[e] if transposed else w[e].t()
            ye = x[start:start + count].double() @ we
            out[start:start + count] = ye + (bias[e].double() if bias is not None else 0.0)
        start += count
    del E
    return out
