"""LoRA linear: ``y = x W^T + b + s * (drop(x) A^T) B^T`` as one op, with one autograd for all of
its implementations (eager; Triton's split and fused paths, whose launchers live in
``odelta_fast.kernels.lora``) and one backend decision (``backend_for``).

The eager implementation is the specification every other backend is tested against. It is a
``torch.library`` custom op with its own backward so that

* autograd keeps only ``x`` (already alive in the caller) and the small ``M x r`` product
  ``drop(x) A^T``: the dropout mask is regenerated in backward from a seed instead of being
  stored, and no dropped copy of ``x`` survives the forward (PEFT keeps one per layer);
* scale and add ride inside ``addmm`` instead of two extra passes over the ``M x N`` output;
* ``torch.compile(fullgraph=True)`` sees one opaque node, not a graph break.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import lora_dispatch
from .backend import LORA_PATHS, backend_for, kernel_autograd, kernels, register_op
from .checks import autocast_dtype, check_probability, check_tensor

OP = "lora_linear"


# ----------------------------------------------------------------------------- dropout mask
# The eager mask compares 16-bit lanes of random 64-bit words with a threshold: one generator
# draw yields four mask elements, measured ~3x cheaper on CPU than torch.rand (the mask is drawn
# twice per step, forward and backward). The price: the dropout probability is resolved to 2^-16.
_LANE_LEVELS = 1 << 16


def effective_dropout_p(dropout_p: float) -> float:
    """The probability the eager mask really drops with (``dropout_p`` rounded to 2^-16)."""
    return round(dropout_p * _LANE_LEVELS) / _LANE_LEVELS


def dropout_mask(shape, dropout_p: float, seed: int, device, dtype) -> Tensor:
    """The 0/1 keep mask drawn from ``seed``: the same seed gives the same mask, which is how
    backward regenerates it without storing it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    numel = math.prod(shape)
    words = torch.randint(-(2**63), 2**63 - 1, ((numel + 3) // 4,), dtype=torch.int64, device=device,
                          generator=generator)
    lanes = words.view(torch.int16)[:numel].view(shape)
    threshold = round(dropout_p * _LANE_LEVELS) - _LANE_LEVELS // 2
    return (lanes >= threshold).to(dtype)


def dropout_keep_scale(shape, dropout_p: float, seed: int, device, dtype) -> Tensor:
    """The inverted-dropout multiplier ``mask / (1 - p)`` the op applies for ``seed``."""
    return dropout_mask(shape, dropout_p, seed, device, dtype).mul_(1.0 / (1.0 - effective_dropout_p(dropout_p)))


def new_dropout_seed() -> Tensor:
    # Drawn from torch's default CPU generator so torch.manual_seed makes runs repeatable; kept on
    # the CPU so reading it inside the op never synchronises a GPU stream.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64)


# Passed when dropout is off: the op signature always carries a seed.
_NO_SEED = torch.zeros(1, dtype=torch.int64)


def _masked_x(x: Tensor, dropout_p: float, seed: Tensor) -> Tensor:
    """``x * mask`` without the ``1 / (1 - p)`` factor, which callers fold into a scalar on the
    small ``M x r`` side: one pass over ``M x K`` fewer than materialising ``mask / (1 - p)``."""
    return dropout_mask(x.shape, dropout_p, int(seed.item()), x.device, x.dtype).mul_(x)


# ----------------------------------------------------------------------------- eager reference
def lora_linear_reference(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    keep_scale: Optional[Tensor] = None,
) -> Tensor:
    """Plain autograd-differentiable formula; ``keep_scale`` is an explicit dropout multiplier
    (``mask / (1 - p)``), so kernels with their own RNG can be checked against the same mask."""
    dropped = x if keep_scale is None else x * keep_scale
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scaling * ((dropped @ lora_a.t()) @ lora_b.t())


def _forward_impl(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
    scaling: float, dropout_p: float, seed: Tensor,
) -> tuple[Tensor, Tensor]:
    """Eager forward: ``(y, xs)`` with ``xs = s drop(x) A^T`` (M x r), what every path saves."""
    if dropout_p == 0.0:
        xs = (x @ lora_a.t()).mul_(scaling)
    else:
        xs = (_masked_x(x, dropout_p, seed) @ lora_a.t()).mul_(scaling / (1.0 - effective_dropout_p(dropout_p)))
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(xs, lora_b.t())
    return y, xs


_lora_linear_fwd = torch.library.custom_op("odelta_fast::lora_linear_eager_fwd", mutates_args=())(_forward_impl)


@_lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_a.shape[0])


def _backward_impl(
    grad_y: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, xs: Tensor, seed: Tensor,
    scaling: float, dropout_p: float, need_x: bool, need_bias: bool, need_lora: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Eager backward: ``(grad_x, grad_bias, grad_a, grad_b)``, the mask regenerated from ``seed``."""
    grad_y = grad_y.contiguous()
    # Distinct empty placeholders: custom-op outputs may not alias each other.
    grad_x, grad_bias, grad_a, grad_b = (grad_y.new_empty(0) for _ in range(4))
    # dY B is small (M x r) and shared by dA and the low-rank part of dX.
    gb = grad_y @ lora_b if (need_x or need_lora) else None
    mask = None
    keep_scale = 1.0 / (1.0 - effective_dropout_p(dropout_p))
    if dropout_p > 0.0 and (need_x or need_lora):
        mask = dropout_mask(x.shape, dropout_p, int(seed.item()), x.device, x.dtype)
    if need_x:
        grad_x = grad_y @ weight
        if mask is None:
            grad_x.addmm_(gb, lora_a, alpha=scaling)
        else:
            grad_x.addcmul_(gb @ lora_a, mask, value=scaling * keep_scale)  # one pass: mask and add
    if need_lora:
        # The mask's last use: turn it into x * mask in place instead of allocating a copy.
        dropped = x if mask is None else mask.mul_(x)
        grad_a = (gb.t() @ dropped).mul_(scaling * (keep_scale if mask is not None else 1.0))
        grad_b = grad_y.t() @ xs
    if need_bias:
        grad_bias = grad_y.sum(0)
    return grad_x, grad_bias, grad_a, grad_b


_lora_linear_bwd = torch.library.custom_op("odelta_fast::lora_linear_eager_bwd", mutates_args=())(_backward_impl)


@_lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, xs, seed, scaling, dropout_p, need_x, need_bias, need_lora):
    def maybe(flag, like):
        return like.new_empty(like.shape) if flag else grad_y.new_empty(0)

    return (maybe(need_x, x), grad_y.new_empty(weight.shape[0] if need_bias else 0),
            maybe(need_lora, lora_a), maybe(need_lora, lora_b))


# ----------------------------------------------------------------------------- the autograd
# One autograd for every implementation: each path's forward returns (y, xs[, packed mask]) and
# its backward takes the same saved tensors; these two functions are registered on all of them.
def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed = inputs
    # Saved: x (the caller holds it anyway), xs (M x r) and the dropout mask's state: the packed
    # mask (Triton paths, 1 bit per element) or the seed it is regenerated from (eager).
    mask_state = output[2] if len(output) > 2 else seed
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], mask_state)
    ctx.scaling, ctx.dropout_p = scaling, dropout_p


def _gradients(ctx, grad_y, backward_fn) -> tuple:
    """Gradients for the eight forward inputs from ``backward_fn`` (a path's backward)."""
    x, weight, lora_a, lora_b, xs, mask_state = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_x, grad_bias, grad_a, grad_b = backward_fn(
        grad_y, x, weight, lora_a, lora_b, xs, mask_state, ctx.scaling, ctx.dropout_p,
        need[0], need[2], need[3] or need[4],
    )
    # The base weight is frozen in LoRA; a caller who trains it anyway gets torch's dW.
    grad_weight = (grad_y.t() @ x).contiguous() if need[1] else None  # mm may hand back a transposed layout
    return (
        grad_x if need[0] else None,
        grad_weight,
        grad_bias if need[2] else None,
        grad_a if need[3] else None,
        grad_b if need[4] else None,
        None, None, None,
    )


_lora_linear_fwd.register_autograd(lambda ctx, grad_y, _grad_xs: _gradients(ctx, grad_y, _lora_linear_bwd),
                                   setup_context=_setup_context)


class _LoraLinearEager(torch.autograd.Function):
    """The eager custom op's own forward and backward, called without the custom-op dispatcher.

    Outside ``torch.compile`` the dispatcher is pure overhead: measured ~0.1 ms per layer and
    training step on CPU, which made small layers slower than PEFT's (hidden 64: 1.28x). Under
    ``torch.compile`` the custom op is used, so the graph keeps one opaque node."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed):
        y, xs = _forward_impl(x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed)
        _setup_context(ctx, (x, weight, bias, lora_a, lora_b, scaling, dropout_p, seed), (y, xs))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _gradients(ctx, grad_y, _backward_impl)


# The Triton paths: launchers in odelta_fast.kernels.lora (triton_op, so torch.compile sees the
# kernels), with the autograd above registered on them when that module is first imported.
_PATHS: dict[str, tuple] = {}


def _register_triton_paths(klora) -> None:
    for path, fwd, bwd in (("fused", klora.fused_forward, klora.fused_backward),
                           ("split", klora.split_forward, klora.split_backward),
                           ("persistent", klora.persistent_forward, klora.persistent_backward)):
        fwd.register_autograd(lambda ctx, grad_y, _gxs, _gbits, bwd=bwd: _gradients(ctx, grad_y, bwd),
                              setup_context=_setup_context)
        _PATHS[path] = (fwd, bwd)
    return _PATHS


_triton_paths = kernel_autograd("lora", _register_triton_paths)


def _triton_path(path: str):
    return _triton_paths()[path]


# ----------------------------------------------------------------------------- public op
def check_lora_linear_inputs(x, weight, bias, lora_a, lora_b, dropout_p) -> None:
    check_tensor(OP, "x", x)
    if x.dim() < 1:
        raise ValueError(f"{OP}: argument 'x' must have at least one dimension (..., in_features)")
    in_features = x.shape[-1]
    check_tensor(OP, "weight", weight, (None, in_features), like=x)
    out_features = weight.shape[0]
    check_tensor(OP, "bias", bias, (out_features,), like=x, optional=True)
    check_tensor(OP, "lora_a", lora_a, (None, in_features), like=x)
    check_tensor(OP, "lora_b", lora_b, (out_features, lora_a.shape[0]), like=x)
    check_probability(OP, "dropout_p", dropout_p)


def lora_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: float,
    dropout_p: float = 0.0,
    *,
    training: bool = True,
    backend: str = "auto",
) -> Tensor:
    """``x W^T + b + scaling * (dropout(x) A^T) B^T``.

    Shapes: ``x (..., K)``, ``weight (N, K)`` (pass ``conv1d.weight.t()`` for GPT-2's ``Conv1D``),
    ``bias (N,)`` or None, ``lora_a (r, K)``, ``lora_b (N, r)``. Dropout applies only to the
    low-rank branch and only when ``training``.
    """
    cast_to = autocast_dtype(x.device)
    if cast_to is not None:
        x, weight, lora_a, lora_b = (t.to(cast_to) for t in (x, weight, lora_a, lora_b))
        bias = bias.to(cast_to) if bias is not None else None
    check_lora_linear_inputs(x, weight, bias, lora_a, lora_b, dropout_p)
    p = float(dropout_p) if training else 0.0
    lead_shape = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    chosen = backend_for(OP, [x, weight, bias, lora_a, lora_b], backend, M=x2d.shape[0], K=x2d.shape[1],
                         N=weight.shape[0], r=lora_a.shape[0], dropout=p > 0.0)
    if chosen == "eager":
        seed = new_dropout_seed() if p > 0.0 else _NO_SEED
        if torch.compiler.is_compiling():
            y, _ = _lora_linear_fwd(x2d, weight, bias, lora_a, lora_b, float(scaling), p, seed)
        else:
            y = _LoraLinearEager.apply(x2d, weight, bias, lora_a, lora_b, float(scaling), p, seed)
    else:
        forward, _ = _triton_path(chosen)
        y = forward(x2d, weight, bias, lora_a, lora_b, float(scaling), p, device_dropout_seed(x.device, p))[0]
    return y.reshape(*lead_shape, weight.shape[0])


_NO_SEED_ON: dict = {}


def device_dropout_seed(device: torch.device, dropout_p: float) -> Tensor:
    """Seed for the Triton kernels: an int64 tensor on the tensors' device (the kernels load it, so
    drawing it never synchronises the stream); drawn from the device's default generator so
    ``torch.manual_seed`` makes runs repeatable."""
    if dropout_p == 0.0:
        if device not in _NO_SEED_ON:
            _NO_SEED_ON[device] = torch.zeros(1, dtype=torch.int64, device=device)
        return _NO_SEED_ON[device]
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def lora_backends() -> tuple[str, ...]:
    """Backends besides eager that implement this op: ``triton`` (the dispatch table picks the
    path), or a path forced by name."""
    return ("triton", *LORA_PATHS)


def _lora_path(chosen: str, *, device, dtype, requested: str, M=None, K=None, N=None, r=None, dropout=False,
               **_) -> str:
    """``triton`` (asked for, or picked by ``auto``) becomes the path the dispatch table measured
    faster for this shape on this GPU, ``split`` where no GPU has measured it."""
    if chosen == "persistent" and not kernels("lora").persistent_available(device):
        raise ValueError(
            f"backend='persistent' for {OP!r} needs a GPU with TMA (compute capability 9.0 or later; got "
            f"{lora_dispatch.capability(torch.device(device))}) and Triton with tensor descriptors (3.4 or later); "
            "backend='fused' is the same path with the pointer-based GEMM"
        )
    if chosen in LORA_PATHS:
        return chosen
    if K is None or N is None or r is None:
        return lora_dispatch.DEFAULT_PATH
    path = lora_dispatch.choose(device, dtype, M, K, N, r, dropout)
    if path == "persistent" and not kernels("lora").persistent_available(device):
        return "fused"  # measured with a Triton that had tensor descriptors; this one has not
    return path


register_op(OP, lora_backends, _lora_path)


# ----------------------------------------------------------------------------- grouped shrink
GROUPED_OP = "lora_shrink_grouped"


def grouped_backends() -> tuple[str, ...]:
    return ("triton",)


register_op(GROUPED_OP, grouped_backends)


def lora_shrink_grouped(
    x: Tensor, lora_as: list, dropout_p: float = 0.0, *, training: bool = True, backend: str = "auto",
) -> list:
    """``[drop_g(x) A_g^T for each A_g]`` for projections sharing one input (q, k, v; gate, up):
    the Triton backend reads ``x`` once for all groups in one launch. Each group gets its own
    dropout mask (group g draws from ``seed + g``), like separate LoRA layers would.

    Shapes: ``x (..., K)``, each ``lora_as[g] (r_g, K)``; returns tensors ``(..., r_g)``.
    Differentiable in ``x`` and every ``A_g``.
    """
    check_tensor(GROUPED_OP, "x", x)
    if not isinstance(lora_as, (list, tuple)) or len(lora_as) == 0:
        raise ValueError(f"{GROUPED_OP}: argument 'lora_as' must be a non-empty list of (r, {x.shape[-1]}) tensors")
    for i, a in enumerate(lora_as):
        check_tensor(GROUPED_OP, f"lora_as[{i}]", a, (None, x.shape[-1]), like=x)
    check_probability(GROUPED_OP, "dropout_p", dropout_p)
    p = float(dropout_p) if training else 0.0
    chosen = backend_for(GROUPED_OP, x, backend)
    lead, K = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, K)
    if chosen == "eager":
        outs = []
        for a in lora_as:
            dropped = x2d
            if p > 0.0:
                keep = dropout_keep_scale(x2d.shape, p, int(new_dropout_seed().item()), x.device, x.dtype)
                dropped = x2d * keep
            outs.append(dropped @ a.t())
    else:
        r_max = max(a.shape[0] for a in lora_as)
        stacked = torch.stack([torch.nn.functional.pad(a, (0, 0, 0, r_max - a.shape[0])) for a in lora_as])
        out = _GroupedShrink.apply(x2d, stacked, p, device_dropout_seed(x.device, p))
        outs = [out[g, :, : a.shape[0]] for g, a in enumerate(lora_as)]
    return [o.reshape(*lead, o.shape[-1]) for o in outs]


class _GroupedShrink(torch.autograd.Function):
    """Autograd for the grouped Triton shrink; backward is plain torch on small (M x r) tensors
    plus the regenerated masks (only materialised when dropout is on)."""

    @staticmethod
    def forward(ctx, x, stacked, p, seed):
        ctx.save_for_backward(x, stacked, seed)
        ctx.p = p
        return kernels("lora").lora_shrink_grouped_fwd(x, stacked, p, seed)

    @staticmethod
    def backward(ctx, grad_out):
        x, stacked, seed = ctx.saved_tensors
        kl = kernels("lora")
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[0] else None
        grad_a = torch.empty_like(stacked) if ctx.needs_input_grad[1] else None
        for g in range(stacked.shape[0]):
            keep = None
            if ctx.p > 0.0:
                keep = kl.dropout_keep_scale(seed + g, tuple(x.shape), ctx.p).to(x.dtype)
            if grad_x is not None:
                term = grad_out[g] @ stacked[g]
                grad_x += term if keep is None else term * keep
            if grad_a is not None:
                grad_a[g] = grad_out[g].t() @ (x if keep is None else x * keep)
        return grad_x, grad_a, None, None
