"""Bias delta (BitFit): ``y + bias`` broadcast over the last dimension.

Eager: a plain torch add (traceable, so ``torch.compile`` fuses it into whatever produced ``y``).
Triton: one pass to add; backward passes ``dY`` through untouched and reduces ``db`` in the one
pass that reads it. Inside LoRA the bias already rides in the GEMM epilogue instead.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import backend_for, check_backend_name, kernel_autograd, register_op
from .checks import check_tensor

OP = "bias_add"


def bias_add(y: Tensor, bias: Tensor, *, backend: str = "auto") -> Tensor:
    """``y (..., N) + bias (N,)``; the result has ``y``'s dtype."""
    check_tensor(OP, "y", y)
    if y.dim() < 1:
        raise ValueError(f"{OP}: argument 'y' must have at least one dimension (..., N)")
    check_tensor(OP, "bias", bias, (y.shape[-1],))
    if bias.device != y.device:
        raise ValueError(f"{OP}: argument 'bias' is on {bias.device}; expected {y.device} like 'y'")
    chosen = backend_for(OP, [y, bias], backend, dtype=y.dtype)
    if chosen == "eager":
        return y + bias.to(y.dtype)
    out = _triton_forward()(y.reshape(-1, y.shape[-1]), bias)
    return out.reshape(y.shape)


def bias_backends() -> tuple[str, ...]:
    return ("triton",)


register_op(OP, bias_backends)
def _register_triton(kbias) -> None:
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])  # the bias: only its dtype is needed

    def backward(ctx, grad_out):
        (bias,) = ctx.saved_tensors
        grad_bias = kbias.bias_grad(grad_out, bias) if ctx.needs_input_grad[1] else None
        return (grad_out if ctx.needs_input_grad[0] else None), grad_bias

    kbias.bias_add_fwd.register_autograd(backward, setup_context=setup_context)
    return kbias.bias_add_fwd


_triton_forward = kernel_autograd("bias", _register_triton)


def linear_bias_delta(x: Tensor, weight: Tensor, bias, delta: Tensor, *, backend: str = "auto") -> Tensor:
    """``x W^T + (b + delta)``: a bias delta folded into the GEMM's own bias, so the BLAS / cuBLAS
    epilogue adds it and no separate pass over the output is spent on it. The GEMM is the
    backbone's own computation, so every backend runs it the same way: ``backend`` is accepted
    for a uniform signature and only validated."""
    op = "linear_bias_delta"
    check_tensor(op, "x", x)
    check_tensor(op, "weight", weight, (None, x.shape[-1]))
    check_tensor(op, "delta", delta, (weight.shape[0],))
    check_tensor(op, "bias", bias, (weight.shape[0],), optional=True)
    check_backend_name(backend)
    delta = delta.to(x.dtype)
    return torch.nn.functional.linear(x, weight, delta if bias is None else bias + delta)
