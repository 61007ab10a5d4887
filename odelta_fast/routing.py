"""Re-routing a module's forward pass through delta modules, and undoing it exactly.

A routed module gets one instance-level ``forward`` (a dispatcher) and a list of the delta
modules attached to it; its class, its source code and its parameters are untouched. Removing
the last delta deletes the instance attribute, so the class's own forward (or whatever instance
forward was there before, e.g. an accelerate hook) is back, bit for bit.

Delta modules declare how they join the computation with ``route_kind`` and implement the
matching hooks of ``RouteHooks`` (below), the protocol this dispatcher speaks:

* ``"replace"``: computes the module's whole output itself (LoRA: base matmul plus the low-rank
  update in one op). It receives the original forward for anything it does not handle. If
  several replace-deltas sit on one module, the first computes the output and the others add
  their ``parallel`` contribution, unless the first ``absorbs`` them (computes their part in its
  own pass: the prefixes of several prefix deltas go into one attention call).
* ``"parallel"``: ``output + delta.parallel(module, args, kwargs)``.
* ``"sequential"``: ``delta.post(module, args, kwargs, output)`` after the module.
* ``"pre"``: ``args, kwargs = delta.pre(module, args, kwargs)`` before the module.
* ``"bias"``: an additive per-feature vector (``delta.bias_vector()``), folded into the bias of
  whatever computes the output, so it costs no pass of its own: a replace-delta with
  ``fuses_bias = True`` receives it as ``extra_bias=``; with no replace-delta, the bias delta
  computes the module itself when it can (``can_fuse``: a Linear / Conv1D, one GEMM whose epilogue
  adds the bias); otherwise it is added to the output (``add_to``).
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, ClassVar

import torch
from torch import nn

ROUTES_ATTR = "_odelta_routes"
SAVED_FORWARD_ATTR = "_odelta_saved_forward"


class _NoInstanceForward:
    """Marks "the module had no instance-level forward"; survives deepcopy and pickle as itself."""

    def __deepcopy__(self, memo):
        return self

    def __copy__(self):
        return self

    def __reduce__(self):
        return "_NO_INSTANCE_FORWARD"


_NO_INSTANCE_FORWARD = _NoInstanceForward()

ROUTE_KINDS = ("replace", "parallel", "sequential", "pre", "bias")


class RouteHooks(nn.Module):
    """The hooks the routed forward calls on a delta module, by its ``route_kind``. A method
    implements the ones its route kind uses; the defaults say what is missing."""

    route_kind: ClassVar[str] = "sequential"
    # "replace" deltas only: accepts ``extra_bias=`` (a bias delta folded into its epilogue).
    fuses_bias: ClassVar[bool] = False

    @property
    def route_active(self) -> bool:
        """Whether the dispatcher routes through this delta now (a merged delta lives in the weights)."""
        return True

    def replace(self, target: nn.Module, original: Callable, args: tuple, kwargs: dict, extra_bias=None) -> Any:
        """"replace": the module's whole output; ``original`` is its own forward."""
        raise NotImplementedError(f"{type(self).__name__} has route_kind 'replace' but no replace()")

    def absorbs(self, other: "RouteHooks") -> bool:
        """"replace": whether this delta, computing the output, also applies ``other`` (another
        replace-delta on the same module), which then adds nothing of its own."""
        return False

    def parallel(self, target: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """"parallel" (and a second "replace" on one module): a tensor added to the hidden states."""
        raise NotImplementedError(f"{type(self).__name__} cannot add its output in parallel (no parallel())")

    def pre(self, target: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """"pre": the arguments the module is called with."""
        raise NotImplementedError(f"{type(self).__name__} has route_kind 'pre' but no pre()")

    def post(self, target: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        """"sequential": the module's output, transformed."""
        raise NotImplementedError(f"{type(self).__name__} has route_kind 'sequential' but no post()")

    def bias_vector(self) -> torch.Tensor:
        """"bias": the per-feature vector added to the module's output."""
        raise NotImplementedError(f"{type(self).__name__} has route_kind 'bias' but no bias_vector()")

    def can_fuse(self, target: nn.Module) -> bool:
        """"bias": whether ``fused_forward`` can compute the module with the bias in its epilogue."""
        return False

    def fused_forward(self, target: nn.Module, args: tuple, kwargs: dict, extra_bias: torch.Tensor) -> Any:
        """"bias": the module's output computed with ``extra_bias`` added by its own GEMM."""
        raise NotImplementedError(f"{type(self).__name__} cannot compute {type(target).__name__} itself")

    def add_to(self, output: Any, extra_bias: torch.Tensor) -> Any:
        """"bias": ``output`` with ``extra_bias`` added to its hidden states."""
        return map_hidden(output, lambda h: h + extra_bias.to(h.dtype))


def map_hidden(output: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to the hidden states of a module output: the tensor itself, the first element
    of a tuple/list (attention blocks return ``(hidden, weights, ...)``), or the first field of a
    ``ModelOutput``."""
    if isinstance(output, torch.Tensor):
        return fn(output)
    if isinstance(output, tuple) and output:
        return (fn(output[0]),) + tuple(output[1:])
    if isinstance(output, list) and output:
        return [fn(output[0])] + output[1:]
    if hasattr(output, "keys") and hasattr(output, "__setitem__"):
        first = next(iter(output.keys()))
        output[first] = fn(output[first])
        return output
    raise TypeError(f"cannot find hidden states in a module output of type {type(output).__name__}")


class RoutedForward:
    """The forward installed on a routed module.

    A small callable object rather than a closure: ``deepcopy`` and ``pickle`` rebuild it around
    the copied module (a closure would keep routing the copy through the original's deltas), and
    ``inspect.signature`` reports the original forward's parameters, so tools that read the
    signature (the HF Trainer drops dataset columns the forward does not name) see no change.
    """

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return _routed_forward(self.module, *args, **kwargs)

    @property
    def __signature__(self):
        return inspect.signature(_original_forward(self.module))

    def __deepcopy__(self, memo):
        return RoutedForward(copy.deepcopy(self.module, memo))

    def __reduce__(self):
        return (RoutedForward, (self.module,))


def _routed_forward(module: nn.Module, *args, **kwargs):
    route_list = module.__dict__[ROUTES_ATTR]
    original = _original_forward(module)
    for delta in route_list:
        if delta.route_kind == "pre" and delta.route_active:
            args, kwargs = delta.pre(module, args, kwargs)
    primary = None
    for delta in route_list:
        if delta.route_kind == "replace" and delta.route_active:
            primary = delta
            break
    bias_deltas = [d for d in route_list if d.route_kind == "bias" and d.route_active]
    extra_bias = None
    for delta in bias_deltas:
        extra_bias = delta.bias_vector() if extra_bias is None else extra_bias + delta.bias_vector()
    if primary is not None and extra_bias is not None and primary.fuses_bias:
        output = primary.replace(module, original, args, kwargs, extra_bias=extra_bias)
        extra_bias = None
    elif primary is not None:
        output = primary.replace(module, original, args, kwargs)
    elif extra_bias is not None and bias_deltas[0].can_fuse(module):
        output = bias_deltas[0].fused_forward(module, args, kwargs, extra_bias)
        extra_bias = None
    else:
        output = original(*args, **kwargs)
    for delta in route_list:
        if not delta.route_active or delta is primary or (primary is not None and primary.absorbs(delta)):
            continue
        if delta.route_kind in ("parallel", "replace"):
            extra = delta.parallel(module, args, kwargs)
            output = map_hidden(output, lambda h, extra=extra: h + extra)
    if extra_bias is not None:
        output = bias_deltas[0].add_to(output, extra_bias)
    for delta in route_list:
        if delta.route_kind == "sequential" and delta.route_active:
            output = delta.post(module, args, kwargs, output)
    return output


def is_routed(module: nn.Module) -> bool:
    return ROUTES_ATTR in module.__dict__


def _original_forward(module: nn.Module) -> Callable:
    saved = module.__dict__.get(SAVED_FORWARD_ATTR, _NO_INSTANCE_FORWARD)
    if saved is _NO_INSTANCE_FORWARD:
        return type(module).forward.__get__(module)
    return saved


def routes(module: nn.Module) -> list:
    return module.__dict__.get(ROUTES_ATTR, [])


def attach(module: nn.Module, child_name: str, delta: nn.Module) -> None:
    """Register ``delta`` as ``module.<child_name>`` and route ``module``'s forward through it."""
    if delta.route_kind not in ROUTE_KINDS:
        raise ValueError(f"delta route_kind {delta.route_kind!r} is not one of {ROUTE_KINDS}")
    if child_name in module._modules or hasattr(type(module), child_name) or child_name in module._parameters:
        raise ValueError(f"{type(module).__name__} already has an attribute named {child_name!r}")
    module.add_module(child_name, delta)
    if ROUTES_ATTR not in module.__dict__:
        module.__dict__[SAVED_FORWARD_ATTR] = module.__dict__.get("forward", _NO_INSTANCE_FORWARD)
        module.__dict__[ROUTES_ATTR] = []
        module.forward = RoutedForward(module)
    module.__dict__[ROUTES_ATTR].append(delta)


def detach(module: nn.Module, child_name: str) -> nn.Module:
    """Undo ``attach``: unregister the child and, with the last delta gone, restore the forward."""
    delta = module._modules.pop(child_name)
    route_list = module.__dict__[ROUTES_ATTR]
    route_list[:] = [d for d in route_list if d is not delta]
    if not route_list:
        saved = module.__dict__.pop(SAVED_FORWARD_ATTR)
        del module.__dict__[ROUTES_ATTR]
        if saved is _NO_INSTANCE_FORWARD:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = saved
    return delta
