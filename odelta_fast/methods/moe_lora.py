"""LoRA on parameters targeted by name (PEFT's ``target_parameters``): the fused 3-D expert
weights of transformers 5's mixture-of-experts layers, one ``(A, B)`` pair per expert.

``LoraModel(model, target_parameters=["experts.gate_up_proj", "experts.down_proj"], ...)`` selects
every module holding a parameter whose dotted name ends with a spec (whole segments, or a
``[r]`` regex), and attaches one ``ExpertsLoraDelta`` per such module, with an
``ExpertFactors`` child per targeted parameter (``...experts.lora.gate_up_proj.lora_A`` of shape
``(E, r, in)``, ``lora_B`` ``(E, out, r)``; ``in`` / ``out`` are the expert projection's own, read
from the module's ``is_transposed``).

How it joins the forward ("replace"):

* an experts module of transformers' ``@use_experts_implementation`` kind (``forward(hidden_states,
  top_k_index, top_k_weights)``, ``gate_up_proj`` or ``up_proj`` and ``down_proj``) is computed here:
  tokens sorted by expert, each projection through ``ops.experts_lora_linear`` (grouped base GEMM
  plus the grouped low-rank update over the rows routed to each expert), the module's own
  ``_apply_gate`` / ``act_fn`` and post-expert norm between, routing weights applied and summed;
* anything else (a 2-D parameter such as a router's ``gate.weight``, an experts class of another
  kind, expert parallelism) runs its own forward with ``W + s B A`` in place of the parameter: the
  dense formula PEFT uses for every target.

Merging folds ``s B_e A_e`` into each expert's slice of each targeted parameter through the merge
ledger (``merge_parts``), so unmerge is exact in any order.
"""
from __future__ import annotations

import inspect
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from ..addressing import Spec, TargetNotFoundError, backbone_modules, closest_candidates, pattern_value
from ..checkpoint import CheckpointError
from ..delta import DeltaModule
from ..ops import experts_lora as xl
from ..peft_format import exact_path_pattern, exact_path_spec
from ..routing import routes

_ROUTED_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


# ---------------------------------------------------------------------------------- selection
def select_parameter_targets(model: nn.Module, specs: Sequence[str],
                             exclude_modules: Optional[Sequence[str]] = None) -> list[tuple[str, nn.Module, list[str]]]:
    """``(module path, module, [parameter names])`` for every module with a parameter whose full
    name ``<module path>.<name>`` a spec matches (PEFT's rule: the whole name, or its end on a
    segment boundary; ``[r]`` specs are regular expressions over trailing segments). Parameters
    of the top-level module cannot be targeted (PEFT refuses them too)."""
    parsed = [Spec.parse(s) for s in specs]
    excluded = [Spec.parse(s) for s in (exclude_modules or [])]
    found, used = [], set()
    for path, module in backbone_modules(model):
        if not path or any(e.matches_path(path) for e in excluded):
            continue
        names = []
        for name, param in module.named_parameters(recurse=False):
            hit = [s.text for s in parsed if s.matches_path(f"{path}.{name}")]
            if hit:
                if param.dim() not in (2, 3) or not param.is_floating_point():
                    raise ValueError(f"target_parameters: {path}.{name} has shape {tuple(param.shape)} "
                                     f"({param.dtype}); LoRA targets 2-D weights or 3-D expert stacks")
                names.append(name)
                used.update(hit)
        if names:
            found.append((path, module, names))
    unused = [s.text for s in parsed if s.text not in used]
    if unused:
        candidates = [(f"{p}.{n}", None) for p, m in backbone_modules(model) if p
                      for n, q in m.named_parameters(recurse=False) if q.dim() == 3]
        near = sorted({c for s in unused for c in closest_candidates(s, candidates)})
        message = (f"target_parameters {unused} match no parameter of {type(model).__name__}"
                   + (f"; 3-D parameters there: {near[:6]}" if near else " (it has no 3-D expert parameters)"))
        if len(unused) == len(parsed):
            raise TargetNotFoundError(message)
        warnings.warn(f"ignoring {message}", UserWarning, stacklevel=3)
    return found


# ---------------------------------------------------------------------------------- factors
def parameter_layout(module: nn.Module, param: torch.Tensor) -> tuple[int, int, int, bool]:
    """``(experts, in_features, out_features, transposed)`` of a targeted parameter: a 3-D stack is
    ``(E, out, in)`` unless the module says ``is_transposed`` (``(E, in, out)``, e.g. GPT-OSS); a 2-D
    weight is one ``(out, in)`` projection."""
    if param.dim() == 2:
        return 1, param.shape[1], param.shape[0], False
    transposed = bool(getattr(module, "is_transposed", False))
    E, d1, d2 = param.shape
    return (E, d1, d2, True) if transposed else (E, d2, d1, False)


class ExpertFactors(nn.Module):
    """One targeted parameter's LoRA: ``lora_A (E, r, in)``, ``lora_B (E, out, r)``."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float, *,
                 use_rslora: bool, transposed: bool, param_shape: tuple, device=None, dtype=None):
        super().__init__()
        self.r, self.alpha, self.transposed, self.param_shape = r, alpha, transposed, tuple(param_shape)
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, device=device, dtype=dtype))
        # Kaiming-uniform over each expert's (r, in) matrix (fan-in = in, as PEFT's (E*r, in) Linear
        # gets), zero B: a fresh delta is an exact no-op.
        nn.init.kaiming_uniform_(self.lora_A.data.view(num_experts * r, in_features), a=math.sqrt(5))

    def factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = self.lora_A, self.lora_B
        return (a, b) if a.dtype == dtype else (a.to(dtype), b.to(dtype))

    def dense_delta(self, dtype: torch.dtype) -> torch.Tensor:
        """``s B_e A_e`` laid out like the parameter (differentiable): the fallback forward's term."""
        delta = xl.experts_delta_weight(self.lora_A, self.lora_B, self.scaling, transposed=self.transposed)
        return delta.reshape(self.param_shape).to(dtype)

    def extra_repr(self) -> str:
        E, r, K = self.lora_A.shape
        return f"experts={E}, in={K}, out={self.lora_B.shape[1]}, r={r}, alpha={self.alpha}, scaling={self.scaling:g}"


class _ParamFold:
    """The part of an ``ExpertsLoraDelta`` that folds into one parameter (see ``merging._parts``)."""

    def __init__(self, owner: "ExpertsLoraDelta", name: str):
        self.owner, self.merge_parameter = owner, name

    def fold_(self, target: nn.Module, param: torch.Tensor) -> None:
        f = getattr(self.owner, self.owner.child_names[self.merge_parameter])
        xl.experts_lora_merge_(param, f.lora_A, f.lora_B, f.scaling, transposed=f.transposed)


def _grouped_capable(module: nn.Module, names: Sequence[str]) -> bool:
    """Whether the module is a transformers experts module this file computes itself."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return False
    try:
        params = list(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        return False
    if tuple(params) != _ROUTED_ARGS:
        return False
    has_gate = getattr(module, "has_gate", True)
    up = "gate_up_proj" if has_gate else "up_proj"
    stacks = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    if up not in stacks or "down_proj" not in stacks or not set(names) <= {up, "down_proj"}:
        return False
    return hasattr(module, "_apply_gate") if has_gate else hasattr(module, "act_fn")


class ExpertsLoraDelta(DeltaModule):
    """LoRA on the targeted parameters of one module (usually a MoE layer's experts)."""

    route_kind = "replace"
    mergeable = True

    def __init__(self, target: nn.Module, names: Sequence[str], ranks: dict, alphas: dict, *,
                 use_rslora: bool = False, backend: str = "auto"):
        super().__init__(backend)
        self.param_names = list(names)
        self.child_names: dict[str, str] = {}
        for name in self.param_names:
            param = getattr(target, name)
            E, k_in, n_out, transposed = parameter_layout(target, param)
            child = name if not hasattr(self, name) and name.isidentifier() else f"param_{name}"
            self.child_names[name] = child
            self.add_module(child, ExpertFactors(E, k_in, n_out, ranks[name], alphas[name], use_rslora=use_rslora,
                                                 transposed=transposed, param_shape=param.shape,
                                                 device=param.device, dtype=param.dtype))
        self.grouped = _grouped_capable(target, self.param_names)
        self.refer("_folds", [_ParamFold(self, name) for name in self.param_names])
        self.refer("_signature", inspect.signature(type(target).forward))

    def factors_of(self, name: str) -> ExpertFactors:
        return getattr(self, self.child_names[name])

    def implemented_backends(self):
        return xl.experts_lora_backends()

    def merge_parts(self):
        return self._folds

    # ------------------------------------------------------------------ forward
    def _active(self, target: nn.Module) -> list["ExpertsLoraDelta"]:
        # Two LoRAs on one experts module cannot be summed after the fact (the gate's activation
        # sits between the projections): the first active one computes the layer with all of them.
        return [d for d in routes(target) if isinstance(d, ExpertsLoraDelta) and d.route_active]

    def replace(self, target, original, args, kwargs, extra_bias=None):
        deltas = self._active(target)
        if all(d.grouped for d in deltas) and not getattr(target, "_is_expert_parallel", False):
            bound = self._signature.bind(target, *args, **kwargs)
            values = [bound.arguments[n] for n in _ROUTED_ARGS]
            return grouped_experts_forward(target, deltas, *values, backend=self.backend)
        return _reparametrized_forward(target, original, args, kwargs, deltas)

    def parallel(self, target, args, kwargs):
        # The first active delta on the module computed this one's contribution too (see _active).
        return 0.0

    # ------------------------------------------------------------------ PEFT layout
    def peft_entries(self, target: nn.Module, path: str, peft_version: Optional[str]) -> "PeftEntries":
        """This delta in PEFT's ``target_parameters`` layout, as written by ``peft_version``."""
        entries = PeftEntries()
        order = [n for n, _ in target.named_parameters(recurse=False) if n in self.param_names]
        for name in self.param_names:
            f = self.factors_of(name)
            E, r = f.lora_A.shape[0], f.lora_A.shape[1]
            semantic = peft_semantic_layout(peft_version, f.transposed, len(f.param_shape))
            a, b = f.lora_A.detach(), f.lora_B.detach()
            if not semantic:  # the other factorisation of the same delta: roles swapped, transposed
                a, b = b.transpose(1, 2), a.transpose(1, 2)
            key = path + ".base_layer" * (len(order) - 1 - order.index(name))
            entries.tensors[f"{key}.lora_A.weight"] = a.reshape(E * r, a.shape[2])
            entries.tensors[f"{key}.lora_B.weight"] = b.permute(1, 2, 0).reshape(b.shape[1], r * E)
            entries.parameters.append(f"{path}.{name}")
            entries.ranks[f"{path}.{name}"], entries.alphas[f"{path}.{name}"] = f.r, f.alpha
        return entries

    def extra_repr(self) -> str:
        return f"parameters={self.param_names}, " + ("grouped over routed tokens" if self.grouped else "dense W + s B A")


# ---------------------------------------------------------------------------------- forwards
def grouped_experts_forward(target: nn.Module, deltas: list[ExpertsLoraDelta], hidden_states, top_k_index,
                            top_k_weights, *, backend: str = "auto"):
    """A transformers experts module's forward with LoRA on its projections, over routed rows."""
    rows = xl.route_tokens(top_k_index, target.num_experts)
    x = xl.gather_rows(hidden_states, rows)
    has_gate = getattr(target, "has_gate", True)
    has_bias = getattr(target, "has_bias", False)
    transposed = bool(getattr(target, "is_transposed", False))
    up_name = "gate_up_proj" if has_gate else "up_proj"

    def project(inputs, name):
        weight = getattr(target, name)
        bias = getattr(target, f"{name}_bias", None) if has_bias else None
        a, b, scaling = _stacked_factors(deltas, name, weight.dtype)
        return xl.experts_lora_linear(inputs.to(weight.dtype), weight, bias, a, b, scaling, rows,
                                      transposed=transposed, backend=backend)

    h = project(x, up_name)
    h = target._apply_gate(h) if has_gate else target.act_fn(h)
    out = project(h, "down_proj")
    if getattr(target, "has_post_expert_norm", False):
        out = target.post_expert_norm(out)
    return xl.combine_rows(out, top_k_weights, rows, hidden_states.dtype)


def _stacked_factors(deltas, name, dtype):
    """The factors of every delta targeting ``name``, stacked along the rank (scalings folded into
    B when there are several): one grouped shrink and expand for all of them."""
    own = [d.factors_of(name) for d in deltas if name in d.child_names]
    if not own:
        return None, None, 0.0
    if len(own) == 1:
        a, b = own[0].factors(dtype)
        return a, b, own[0].scaling
    pairs = [f.factors(dtype) for f in own]
    a = torch.cat([p[0] for p in pairs], dim=1)
    b = torch.cat([p[1] * f.scaling for p, f in zip(pairs, own)], dim=2)
    return a, b, 1.0


def _reparametrized_forward(target, original, args, kwargs, deltas):
    """The module's own forward with ``W + sum s B A`` in place of each targeted parameter (the
    parameter object itself is untouched and restored, in order, whatever happens)."""
    values = {}
    for name, param in target._parameters.items():
        terms = [d.factors_of(name).dense_delta(param.dtype) for d in deltas if name in d.child_names]
        if terms:
            values[name] = param + sum(terms[1:], terms[0])
    saved = {name: target._parameters[name] for name in values}
    try:
        for name, value in values.items():
            target._parameters[name] = value
        return original(*args, **kwargs)
    finally:
        for name, param in saved.items():
            target._parameters[name] = param


# ---------------------------------------------------------------------------------- building
def build_experts_delta(path: str, target: nn.Module, names: Sequence[str], *, lora_r: int, lora_alpha: float,
                        rank_pattern: dict, alpha_pattern: dict, use_rslora: bool, backend: str) -> ExpertsLoraDelta:
    # PEFT keys rank / alpha patterns on the parameter's full name (``...experts.gate_up_proj``).
    ranks = {n: pattern_value(rank_pattern, f"{path}.{n}", lora_r) for n in names}
    alphas = {n: pattern_value(alpha_pattern, f"{path}.{n}", lora_alpha) for n in names}
    return ExpertsLoraDelta(target, names, ranks, alphas, use_rslora=use_rslora, backend=backend)


# ---------------------------------------------------------------------------------- PEFT format
@dataclass
class PeftEntries:
    tensors: dict = field(default_factory=dict)       # keys without PEFT's "base_model.model." prefix
    parameters: list = field(default_factory=list)    # full parameter names (target_parameters)
    ranks: dict = field(default_factory=dict)
    alphas: dict = field(default_factory=dict)


def _version_tuple(version: Optional[str]) -> Optional[tuple[int, int, int]]:
    if not version:
        return None
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    return (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None


def peft_semantic_layout(peft_version: Optional[str], transposed: bool, ndim: int) -> bool:
    """Whether PEFT ``peft_version`` stores a 3-D parameter's LoRA with ``lora_A`` on the expert
    projection's input (as here), or the other way round.

    PEFT reads ``(E, d1, d2)`` as ``(E, in=d1, out=d2)`` up to 0.18; 0.19.0 swapped the two when the
    module says ``is_transposed`` (so both kinds ended up the other way round); 0.19.1 swaps when it
    does not (the projection's real input, as here). Unknown versions count as the newest."""
    if ndim != 3:
        return True
    v = _version_tuple(peft_version)
    if v is None or v >= (0, 19, 1):
        return True
    if v >= (0, 19, 0):
        return False
    return transposed


@dataclass
class PeftParameterTargets:
    """A PEFT adapter's ``target_parameters`` part, resolved against a backbone."""

    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> {"<param>.lora_A": (E, r, in), ...}
    parameters: list[str]                          # full parameter names
    raw_paths: list[str]                           # the PEFT module keys they came from


def split_peft_adapter(adapter, backbone: nn.Module):
    """Take the ``target_parameters`` tensors out of a PEFT adapter (``peft_format.PeftAdapter``):
    returns the adapter with only module targets left (and its LoraModel arguments updated to
    target the parameters by full name) and the parameters' factors in this package's layout.

    PEFT nests one wrapper per targeted parameter of a module, the module's first parameter
    innermost: ``experts.base_layer.lora_A`` is ``gate_up_proj``'s, ``experts.lora_A`` ``down_proj``'s.
    Which factor sits on the projection's input is told by the shapes, or, where input and
    output widths are equal, by the ``peft_version`` that wrote it (``peft_semantic_layout``)."""
    config = adapter.config
    specs = list(config.get("target_parameters") or [])
    version = config.get("peft_version")
    try:
        targets = select_parameter_targets(backbone, specs)
    except ValueError as err:
        raise CheckpointError(f"{adapter.source}: {err}") from None
    factors = dict(adapter.factors)
    kwargs = dict(adapter.lora_kwargs)
    r_default, alpha_default = kwargs["lora_r"], kwargs["lora_alpha"]
    rank_pattern, alpha_pattern = dict(kwargs["rank_pattern"]), dict(kwargs["alpha_pattern"])
    out = PeftParameterTargets({}, [], [])
    ambiguous = []
    for path, module, names in targets:
        order = [n for n, _ in module.named_parameters(recurse=False) if n in names]
        for name in names:
            raw = path + ".base_layer" * (len(order) - 1 - order.index(name))
            pair = factors.pop(raw, None)
            if pair is None:
                raise CheckpointError(f"{adapter.source}: no lora_A / lora_B for {path}.{name} (expected under "
                                      f"{raw!r}); the checkpoint holds {sorted(adapter.factors)[:6]}")
            param = getattr(module, name)
            E, k_in, n_out, transposed = parameter_layout(module, param)
            a, b = pair["A"], pair["B"]
            if a.shape[0] % E or b.shape[1] != a.shape[0]:
                raise CheckpointError(f"{adapter.source}: {raw}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                      f"do not split over {E} experts")
            r = a.shape[0] // E
            fits_semantic = (a.shape[1], b.shape[0]) == (k_in, n_out)
            fits_swapped = (a.shape[1], b.shape[0]) == (n_out, k_in)
            if not (fits_semantic or fits_swapped):
                raise CheckpointError(f"{adapter.source}: {raw}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                                      f"fit no LoRA of {path}.{name} {tuple(param.shape)} with {E} experts")
            semantic = fits_semantic if fits_semantic != fits_swapped else \
                peft_semantic_layout(version, transposed, param.dim())
            if fits_semantic and fits_swapped and version is None:
                ambiguous.append(f"{path}.{name}")
            a3 = a.reshape(E, r, a.shape[1])
            b3 = b.reshape(b.shape[0], r, E).permute(2, 0, 1)  # PEFT's B columns run rank-major: j * E + e
            if not semantic:
                a3, b3 = b3.transpose(1, 2), a3.transpose(1, 2)
            out.tensors.setdefault(path, {}).update({f"{name}.lora_A": a3.contiguous(),
                                                     f"{name}.lora_B": b3.contiguous()})
            full = f"{path}.{name}"
            out.parameters.append(full)
            out.raw_paths.append(raw)
            if r != r_default:
                rank_pattern[re.escape(full)] = r
            alpha = pattern_value(config.get("alpha_pattern") or {}, full, alpha_default)
            if alpha != alpha_default:
                alpha_pattern[re.escape(full)] = alpha
    if ambiguous:
        warnings.warn(f"{adapter.source}: square expert projections {ambiguous[:4]} and no peft_version: read as "
                      "written by PEFT >= 0.19.1 (lora_A on the projection's input)", UserWarning, stacklevel=3)
    for raw in out.raw_paths:
        rank_pattern.pop(exact_path_pattern(raw), None)
        alpha_pattern.pop(exact_path_pattern(raw), None)
    kwargs.update(modified_modules=[exact_path_spec(p) for p in sorted(factors)], target_parameters=out.parameters,
                  rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    remaining = type(adapter)(**{**adapter.__dict__, "lora_kwargs": kwargs, "factors": factors})
    return remaining, out


__all__ = ["ExpertFactors", "ExpertsLoraDelta", "build_experts_delta", "grouped_experts_forward",
           "select_parameter_targets", "split_peft_adapter"]
