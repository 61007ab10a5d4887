"""Name-based addressing: which modules of a backbone a list of name specs selects.

Rules (kept from OpenDelta, with its regex and exclude bugs fixed):

* a plain spec matches a module whose dotted path ends with it on whole segments
  (``"output.dense"`` matches ``encoder.layer.3.output.dense``; ``"ense"`` matches nothing);
* ``"[r]<pattern>"`` is a regular expression that must match a whole trailing run of segments
  (``re.fullmatch`` against every suffix, so ``[r]attn`` matches ``a.attn.b.attn``); a pattern
  starting with ``^`` must match the whole path from its start, as OpenDelta's ``re.search``
  reads it (``[r]^encoder\\..*\\.q`` does not select ``model.encoder.block.0.q``);
* raw names first, as in OpenDelta: a spec is tried against the raw paths; where the structure
  is known, a spec that selects no raw module is tried against the common-structure paths
  (``block.3.attn.q``) if it is dotted or a regex (``"attn.q"`` works on every mapped model), or if
  no spec of the list selects a raw module (``["ff"]`` on BERT: a list written in common names).
  A bare word that is some module's raw name (``"layer_norm"`` on T5) never also means a common
  name, so a config written for OpenDelta selects exactly what OpenDelta selects;
  ``common_structure=True`` matches common names only, ``False`` raw names only;
* OpenDelta's spelling of common names (``"attn@.q@"``, ``"ff@.w1@"``, ``"attn@.proj@"``) matches
  common names only;
* ``exclude_modules`` uses the same matcher and applies after matching: excluding what a spec
  selects does not make the spec unmatched;
* a list in which some specs select nothing warns once, naming them with their closest
  candidates (OpenDelta and PEFT ignore absent names); a list that selects nothing is an error;
* ``"all-linear"`` selects every Linear / Conv1D except the output head and except subclasses whose
  own ``forward`` does not return the projection of their input (MoE routers returning tuples,
  grouped projections reshaping it): those are left out with one warning naming them.
"""
from __future__ import annotations

import difflib
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch
from torch import nn

from .markers import DELTA_MARKER
from .projections import linear_types
from .quantized import is_quantized

REGEX_PREFIX = "[r]"
ALL_LINEAR = "all-linear"


class TargetNotFoundError(ValueError):
    """A module spec selects nothing; the message names the spec and its closest candidates."""


def is_delta_module(module: nn.Module) -> bool:
    return getattr(type(module), DELTA_MARKER, False)


def backbone_modules(model: nn.Module):
    """``named_modules()`` of the backbone, without delta modules and their insides."""
    inside: list[str] = []
    for path, module in model.named_modules():
        if inside and any(path.startswith(p) for p in inside):
            continue
        if is_delta_module(module):
            inside.append(path + ".")
            continue
        yield path, module

# Raw names other architectures use for a common name; lets the "no match" error point a user
# who typed a LLaMA name on a BERT at the right module.
_KNOWN_ALIASES = {
    "attn.q": ("q_proj", "query", "q", "q_lin", "wq"),
    "attn.k": ("k_proj", "key", "k", "k_lin", "wk"),
    "attn.v": ("v_proj", "value", "v", "v_lin", "wv"),
    "attn.o": ("o_proj", "out_proj", "dense", "o", "out_lin", "wo", "c_proj"),
    "attn.qkv": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv"),
    "ff.w1": ("up_proj", "fc1", "c_fc", "lin1", "wi", "dense_h_to_4h", "intermediate"),
    "ff.w2": ("down_proj", "fc2", "lin2", "wo", "dense_4h_to_h"),
    "ff.gate": ("gate_proj", "w1", "wi_0"),
}


PLAIN_LINEAR = "linear"  # the module computes x W^T + b (its class's forward, or an override that does the same)
OWN_FORWARD = "own"  # an overriding forward mapping (..., in) to (..., out) some other way (a scaled head)
NOT_A_PROJECTION = "other"  # an overriding forward returning something else (a tuple, another shape)


def linear_forward_kind(module: nn.Module) -> str:
    """What a Linear / Conv1D's forward computes, for deltas that would replace or wrap it.

    A class that does not override the projection's forward is plain. An override is probed
    once with a small random input through the class's own forward (no hooks, no deltas): the
    same result as the projection is plain (Falcon's Linear), a tensor of the output width is
    ``OWN_FORWARD``, anything else (Llama-4 / Phi-MoE routers return tuples, DeepSeek-V4's grouped
    projection reshapes its input) is ``NOT_A_PROJECTION``."""
    cls = type(module)
    bases = [t for t in linear_types() if isinstance(module, t)]
    if not bases or any(cls.forward is base.forward for base in bases):
        return PLAIN_LINEAR
    if is_quantized(module):
        # bitsandbytes: its forward is the projection through a packed weight, which must not be
        # probed as a matrix (an eval forward may even repack it); deltas add to its output.
        return OWN_FORWARD
    weight = module.weight
    conv1d = not isinstance(module, nn.Linear)
    n_in, n_out = (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, n_in, generator=generator).to(device=weight.device, dtype=weight.dtype)
    try:
        with torch.no_grad():
            out = cls.forward(module, x)
    except Exception:
        return NOT_A_PROJECTION
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, n_out):
        return NOT_A_PROJECTION
    if weight.device.type == "meta":
        return OWN_FORWARD  # shapes fit; values cannot be compared on the meta device
    with torch.no_grad():
        reference = x @ weight if conv1d else x @ weight.t()
        if module.bias is not None:
            reference = reference + module.bias
    same = out.dtype == reference.dtype and torch.allclose(out, reference, rtol=1e-3, atol=1e-5)
    return PLAIN_LINEAR if same else OWN_FORWARD


# OpenDelta's common names that are spelled differently here.
_OPENDELTA_RENAMES = {("attn", "proj"): ("attn", "o"), ("crossattn", "proj"): ("crossattn", "o"),
                      ("lm_head", "proj"): ("lm_head",)}


def _from_opendelta_spelling(text: str) -> str:
    """``"attn@.q@"`` -> ``"attn.q"``; ``"attn@.proj@"`` -> ``"attn.o"``; ``"attn@.q,k,v@"`` -> ``"attn.qkv"``."""
    segments = [seg.rstrip("@").replace("q,k,v", "qkv") for seg in text.split(".")]
    out: list[str] = []
    for seg in segments:
        renamed = _OPENDELTA_RENAMES.get((out[-1], seg)) if out else None
        if renamed:
            out[-1:] = list(renamed)
        else:
            out.append(seg)
    return ".".join(out)


@dataclass(frozen=True)
class Spec:
    text: str                    # as the user wrote it (what messages name)
    regex: Optional[re.Pattern]
    target: str = ""             # what plain specs compare with (OpenDelta's @ spelling translated)
    common_only: bool = False    # written in OpenDelta's common-name spelling

    @classmethod
    def parse(cls, text: str) -> "Spec":
        if not isinstance(text, str) or not text:
            raise ValueError(f"module spec {text!r} must be a non-empty string")
        if text.startswith(REGEX_PREFIX):
            pattern = text[len(REGEX_PREFIX):]
            try:
                return cls(text, re.compile(pattern), pattern)
            except re.error as err:
                raise ValueError(f"module spec {text!r}: invalid regular expression {pattern!r}: {err}") from None
        if "@" in text:
            return cls(text, None, _from_opendelta_spelling(text), common_only=True)
        return cls(text, None, text)

    @property
    def bare_word(self) -> bool:
        """A single plain segment (``"attn"``, ``"layer_norm"``): in OpenDelta always a raw name."""
        return self.regex is None and not self.common_only and "." not in self.target

    def matches_path(self, path: Optional[str]) -> bool:
        if not path:
            return False
        if self.regex is None:
            return path == self.target or path.endswith("." + self.target)
        if self.target.startswith("^"):
            return self.regex.fullmatch(path) is not None
        segments = path.split(".")
        return any(self.regex.fullmatch(".".join(segments[i:])) for i in range(len(segments)))


class NameMatcher:
    """A compiled list of specs; ``match`` is true if any spec matches the raw or common path."""

    def __init__(self, specs: Optional[Iterable[str]]):
        self.specs = [Spec.parse(s) for s in (specs or [])]

    def __bool__(self) -> bool:
        return bool(self.specs)

    def matching_spec(self, path: str, common_path: Optional[str] = None) -> Optional[Spec]:
        for spec in self.specs:
            if spec.matches_path(path) or spec.matches_path(common_path):
                return spec
        return None

    def match(self, path: str, common_path: Optional[str] = None) -> bool:
        return self.matching_spec(path, common_path) is not None


def _common_lookup(structure, use_common: Optional[bool]):
    if structure is None or use_common is False or not getattr(structure, "mapped", False):
        return lambda path: None
    return structure.common_name


class UnmatchedSpecWarning(UserWarning):
    """Some specs of a list select nothing (the others do): they are ignored."""


def match_specs(
    candidates: Sequence[tuple[str, nn.Module]], specs: Sequence["Spec"], *, structure=None,
    common_structure: Optional[bool] = None, unfreezing: bool = False,
) -> list[list[int]]:
    """For each spec, the indices of ``candidates`` (``(path, module)``) it selects, by the rules
    in the module docstring: raw names first, common names where the raw reading selects nothing.

    ``unfreezing`` (``unfrozen_modules``, ``freeze_module(exclude=...)``): raw names always count
    and a bare word never means a common name, as in OpenDelta, whose shipped configs list norms
    (``layer_norm``) that many architectures lack and then unfreeze nothing there."""
    mapped = structure is not None and getattr(structure, "mapped", False)
    raw_allowed = unfreezing or common_structure is not True
    common_allowed = common_structure is not False and mapped
    list_fallback = not unfreezing
    raw_hits = [
        [i for i, (path, _) in enumerate(candidates) if spec.matches_path(path)]
        if raw_allowed and not spec.common_only else []
        for spec in specs
    ]
    any_raw = any(raw_hits)
    commons: Optional[list] = None
    hits: list[list[int]] = []
    for spec, raw in zip(specs, raw_hits):
        use_common = common_allowed and (
            spec.common_only or (common_structure is True and not (unfreezing and spec.bare_word))
            or (not raw and (not spec.bare_word or (list_fallback and not any_raw))))
        if not use_common:
            hits.append(raw)
            continue
        if commons is None:
            common_of = structure.common_name
            parent_of = _virtual_parent_lookup(structure, common_structure)
            commons = [(c, parent_of(c) if c is not None else None)
                       for c in (common_of(path) for path, _ in candidates)]
        # BERT has no single ``ff`` module: ``ff`` stands for ``ff.w1`` and ``ff.w2`` there.
        found = [i for i, (common, parent) in enumerate(commons)
                 if spec.matches_path(common) or (common is not None and spec.matches_path(parent))]
        hits.append(sorted(set(raw) | set(found)))
    return hits


def select_modules(
    model: nn.Module,
    modified_modules: Sequence[str],
    exclude_modules: Optional[Sequence[str]] = None,
    *,
    structure=None,
    common_structure: Optional[bool] = None,
    module_types: Optional[tuple[type, ...]] = None,
) -> list[tuple[str, nn.Module]]:
    """The ``(path, module)`` pairs selected by the specs, in ``named_modules`` order.

    ``module_types`` restricts what a spec may select (LoRA needs a Linear); a spec that matches
    only modules of other types counts as matching nothing. Specs that select nothing warn
    (``UnmatchedSpecWarning``) naming their closest candidates; if the whole list selects
    nothing, ``TargetNotFoundError`` (a ``ValueError``) is raised instead.
    """
    if common_structure and (structure is None or not structure.mapped):
        raise ValueError(
            "common_structure=True but this architecture has no common-structure map; "
            "pass raw module names in modified_modules instead"
        )
    raw_specs = list(modified_modules)
    want_all_linear = ALL_LINEAR in raw_specs
    specs = [Spec.parse(s) for s in raw_specs if s != ALL_LINEAR]
    excluder = NameMatcher(exclude_modules)
    common_of = _common_lookup(structure, common_structure)
    heads = structure.output_head_paths() if structure is not None else set()
    lin_types = linear_types()

    candidates = [(path, module) for path, module in backbone_modules(model) if path]
    typed = [(path, module) for path, module in candidates if module_types is None or isinstance(module, module_types)]
    hits = match_specs(typed, specs, structure=structure, common_structure=common_structure)
    chosen = {id(typed[i][1]) for found in hits for i in found}
    used = {spec.text for spec, found in zip(specs, hits) if found}

    selected: list[tuple[str, nn.Module]] = []
    left_out: list[str] = []
    for path, module in candidates:
        common = common_of(path)
        hit = id(module) in chosen
        if want_all_linear and isinstance(module, lin_types) and path not in heads and not _is_head_name(path, common):
            if linear_forward_kind(module) == NOT_A_PROJECTION:
                left_out.append(f"{path} ({type(module).__name__})")
            else:
                hit = True
                used.add(ALL_LINEAR)
        if hit and not (excluder and excluder.match(path, common)):
            selected.append((path, module))

    if left_out:
        warnings.warn(
            f"all-linear leaves out {len(left_out)} Linear subclass module(s) whose own forward does not return the "
            f"projection of its input (a tuple, or another shape), so a delta replacing it would change what it "
            f"computes: {', '.join(left_out[:5])}{' ...' if len(left_out) > 5 else ''}",
            UserWarning, stacklevel=2,
        )
    unmatched = [s for s in raw_specs if s not in used]
    message = no_match_message(model, unmatched, structure, module_types, common_structure) if unmatched else ""
    if unmatched and len(unmatched) == len(raw_specs):
        raise TargetNotFoundError(message)
    if unmatched:
        warnings.warn(f"ignoring {len(unmatched)} of {len(raw_specs)} module specs, which select nothing "
                      f"(the others do):\n{message}", UnmatchedSpecWarning, stacklevel=3)
    if not selected:
        raise TargetNotFoundError(
            f"the module specs {raw_specs} select only modules that exclude_modules={list(exclude_modules or [])} "
            "excludes; nothing is left to modify")
    return selected


def _virtual_parent_lookup(structure, use_common: Optional[bool]):
    """``common -> the common name of its parent`` when no module carries that parent name
    (``block.0.ff.w1 -> block.0.ff`` on BERT, whose feed-forward has no module of its own). The
    projections stand for the sub-layer, not its norm: ``ff.layer_norm`` is named on its own, and
    on architectures with an ``ff`` module the norm sits outside it."""
    if structure is None or use_common is False or not getattr(structure, "mapped", False):
        return lambda common: None
    present = {common for _, common in structure.items()}

    def parent(common: str) -> Optional[str]:
        if "." not in common or common.endswith(".layer_norm"):
            return None
        up = common.rsplit(".", 1)[0]
        return None if up in present or up.rsplit(".", 1)[-1].isdigit() else up

    return parent


def pattern_value(patterns: dict, path: str, default):
    """The value of the first regex pattern that matches the end of ``path`` on a segment
    boundary (PEFT's ``rank_pattern`` / ``alpha_pattern`` rule)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return default


def _is_head_name(path: str, common: Optional[str]) -> bool:
    last = path.rsplit(".", 1)[-1]
    return common == "lm_head" or last in ("lm_head", "classifier", "score", "qa_outputs")


def candidate_paths(model: nn.Module, structure=None, module_types=None) -> list[tuple[str, Optional[str]]]:
    common_of = _common_lookup(structure, None)
    return [
        (path, common_of(path))
        for path, module in backbone_modules(model)
        if path and (module_types is None or isinstance(module, module_types))
    ]


def closest_candidates(spec: str, candidates: list[tuple[str, Optional[str]]], limit: int = 5) -> list[str]:
    """Module paths most similar to ``spec``, compared on tails of equal segment count and on
    the common names other architectures' raw names stand for."""
    text = spec[len(REGEX_PREFIX):] if spec.startswith(REGEX_PREFIX) else spec
    n_segments = text.count(".") + 1
    alias_of = {alias: common for common, aliases in _KNOWN_ALIASES.items() for alias in aliases}
    implied_common = alias_of.get(text.rsplit(".", 1)[-1])

    def score(item) -> float:
        path, common = item
        tail = ".".join(path.split(".")[-n_segments:])
        best = difflib.SequenceMatcher(None, text, tail).ratio()
        if common:
            best = max(best, difflib.SequenceMatcher(None, text, common.split(".", 2)[-1]).ratio())
            if implied_common and (common == implied_common or common.endswith("." + implied_common)):
                best += 1.0
        return best

    ranked = sorted(candidates, key=score, reverse=True)
    seen_tails: list[str] = []
    out: list[str] = []
    for path, common in ranked:
        # Show each distinct tail once: twelve copies of ``layer.N.attention.self.query`` help nobody.
        tail = re.sub(r"\.\d+\.", ".N.", path)
        if tail in seen_tails:
            continue
        seen_tails.append(tail)
        out.append(f"{path} (common name: {common})" if common else path)
        if len(out) == limit:
            break
    return out


def no_match_message(model, specs, structure=None, module_types=None, common_structure=None) -> str:
    candidates = candidate_paths(model, structure, module_types)
    kind = "/".join(t.__name__ for t in module_types) if module_types else "module"
    lines = []
    for spec in specs:
        lines.append(f"module spec {spec!r} matches no {kind} of {type(model).__name__}.")
        near = closest_candidates(spec, candidates)
        if near:
            lines.append("  closest candidates:")
            lines.extend(f"    {c}" for c in near)
    if common_structure is False:
        lines.append("  (common_structure=False: only raw module names were tried)")
    lines.append("Plain specs match whole trailing name segments; '[r]<regex>' must match a whole trailing run.")
    return "\n".join(lines)
