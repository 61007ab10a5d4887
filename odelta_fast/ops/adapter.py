"""Bottleneck adapter: ``residual + s * up(act(down(norm(h))))`` as one op.

Sequential adapters (Houlsby/Pfeiffer) pass ``residual=h``; parallel adapters pass the wrapped
module's output. Compacter and low-rank adapters build their down/up weights from their own
factorisations and then call this same op, so every adapter flavour shares one kernel.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backend import backend_for, kernel_autograd, register_op
from .checks import autocast_dtype, check_tensor

OP = "adapter_bottleneck"


def _gelu_tanh(t: Tensor) -> Tensor:
    return F.gelu(t, approximate="tanh")


# Names follow OpenDelta's `Activations` so its configs keep working.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu_new": _gelu_tanh,
    "gelu": F.gelu,
    "gelu_orig": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "leakyrelu": F.leaky_relu,
    "identity": lambda t: t,
}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown non_linearity {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


def adapter_bottleneck(
    h: Tensor,
    down_weight: Tensor,
    down_bias: Optional[Tensor],
    up_weight: Tensor,
    up_bias: Optional[Tensor],
    *,
    residual: Optional[Tensor] = None,
    activation: str = "gelu_new",
    scaling: float = 1.0,
    layer_norm_weight: Optional[Tensor] = None,
    layer_norm_bias: Optional[Tensor] = None,
    layer_norm_eps: float = 1e-5,
    backend: str = "auto",
) -> Tensor:
    """Shapes: ``h (..., d)``, ``down_weight (b, d)``, ``up_weight (d_out, b)``, ``residual (..., d_out)``."""
    cast_to = autocast_dtype(h.device)
    if cast_to is not None:
        h = h.to(cast_to)
    dtype = h.dtype
    # Adapter parameters may be kept in a wider dtype than the activations; compute in the
    # activations' dtype like the backbone does.
    down_weight, up_weight = down_weight.to(dtype), up_weight.to(dtype)
    down_bias = down_bias.to(dtype) if down_bias is not None else None
    up_bias = up_bias.to(dtype) if up_bias is not None else None
    d = h.shape[-1]
    check_tensor(OP, "h", h)
    check_tensor(OP, "down_weight", down_weight, (None, d), like=h)
    bottleneck = down_weight.shape[0]
    check_tensor(OP, "down_bias", down_bias, (bottleneck,), like=h, optional=True)
    check_tensor(OP, "up_weight", up_weight, (None, bottleneck), like=h)
    d_out = up_weight.shape[0]
    check_tensor(OP, "up_bias", up_bias, (d_out,), like=h, optional=True)
    if residual is not None:
        check_tensor(OP, "residual", residual.to(dtype), (*h.shape[:-1], d_out))
    if layer_norm_weight is not None:
        check_tensor(OP, "layer_norm_weight", layer_norm_weight, (d,))
    check_tensor(OP, "layer_norm_bias", layer_norm_bias, (d,), optional=True)
    act = activation_fn(activation)
    chosen = backend_for(OP, [h, down_weight, down_bias, up_weight, up_bias, residual], backend, dtype=dtype)
    z = h
    if layer_norm_weight is not None:
        # The layer norm runs as torch's own kernel before the fused bottleneck (not fused yet).
        z = F.layer_norm(h, (d,), layer_norm_weight.to(dtype),
                         layer_norm_bias.to(dtype) if layer_norm_bias is not None else None, layer_norm_eps)
    if chosen == "triton":
        lead = h.shape[:-1]
        res2d = residual.to(dtype).reshape(-1, d_out) if residual is not None else None
        z2d = z.reshape(-1, d)
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (z2d, down_weight, down_bias, up_weight, up_bias))
        out, _ = _triton_forward()(z2d, down_weight, down_bias, up_weight, up_bias, res2d, activation,
                                   float(scaling), needs_grad)
        return out.reshape(*lead, d_out)
    out = F.linear(act(F.linear(z, down_weight, down_bias)), up_weight, up_bias)
    if scaling != 1.0:
        out = out * scaling
    return out if residual is None else residual.to(dtype) + out


def adapter_backends() -> tuple[str, ...]:
    return ("triton",)


register_op(OP, adapter_backends)


# ----------------------------------------------------------------------------- Triton autograd
# The launchers (odelta_fast.kernels.adapter) save nothing themselves: forward returns the fp32
# M x bottleneck pre-activation beside y when a gradient will be needed, and this autograd keeps it.
def _setup_context(ctx, inputs, output):
    h, down_weight, down_bias, up_weight, up_bias, residual, activation, scaling, save_pre = inputs
    # h (alive in the caller anyway), the M x bottleneck pre-activation, and parameters.
    ctx.save_for_backward(h, output[1], down_weight, up_weight)
    ctx.has_down_bias, ctx.has_up_bias = down_bias is not None, up_bias is not None
    ctx.activation, ctx.scaling = activation, scaling


def _register_triton(kadapter) -> None:
    def backward(ctx, grad_y, _grad_pre):
        h, pre, down_weight, up_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_w = any(need[i] for i in (1, 2, 3, 4))
        dh, dwd, dbd, dwu, dbu = kadapter.adapter_bwd(grad_y, h, pre, down_weight, up_weight, ctx.has_down_bias,
                                                      ctx.has_up_bias, ctx.activation, ctx.scaling, need[0], need_w)
        # The residual's gradient is dY itself (no copy).
        return (dh if need[0] else None, dwd if need[1] else None, dbd if need[2] else None,
                dwu if need[3] else None, dbu if need[4] else None, grad_y if need[5] else None, None, None, None)

    kadapter.adapter_fwd.register_autograd(backward, setup_context=_setup_context)
    return kadapter.adapter_fwd


_triton_forward = kernel_autograd("adapter", _register_triton)
