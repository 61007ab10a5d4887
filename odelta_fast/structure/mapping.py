"""Resolve the tables in ``tables.py`` against a concrete model instance, and infer the
structure (``inference.py``) of every part no table covers."""

from __future__ import annotations

import re
import sys
import warnings
from functools import lru_cache
from typing import Iterator

from torch import nn

from ..projections import linear_types

from . import inference
from .tables import MODEL_TYPES, Arch

TABLE = "table"
INFERRED = "inferred"

# Top-level children of a *ForXxx model that hold the output head, in the order
# preferred when choosing the module named ``lm_head``. Only consulted when the
# model *is* its own base model (T5ForConditionalGeneration keeps encoder,
# decoder and lm_head side by side); otherwise every child outside the base
# model counts as head.
HEAD_NAMES = (
    "lm_head", "embed_out", "cls", "classifier", "classification_head", "score",
    "qa_outputs", "vocab_projector", "generator_lm_head", "lm_loss",
)


class UnmappedArchitectureWarning(UserWarning):
    """A model (or part of one) has neither a structure table nor blocks the inference finds;
    raw module names apply."""


class StructureMap:
    """Raw module path <-> common structure name for one model.

    Paths are those of ``model.named_modules()`` for the model given to
    :func:`structure_map`. Each raw module has at most one common name; a common
    name has one raw module per mapped HF model (several when a wrapper holds
    several backbones).
    """

    def __init__(self, to_common: dict[str, str], heads: set[str],
                 roots: dict[str, str], fused: frozenset[str], sources: dict[str, str] | None = None):
        self._to_common = to_common
        self._by_common: dict[str, list[str]] = {}
        for raw, name in to_common.items():
            self._by_common.setdefault(name, []).append(raw)
        self._heads = frozenset(heads)
        #: path of each mapped model -> its config.model_type (the class name for a model that is
        #: not a transformers model)
        self.roots = dict(roots)
        #: path of each mapped model -> "table" or "inferred": where its names come from
        self.sources = dict(sources) if sources is not None else {path: TABLE for path in roots}
        #: True when any part of the map was inferred rather than read from a table
        self.inferred: bool = INFERRED in self.sources.values()
        self.model_types: tuple[str, ...] = tuple(dict.fromkeys(roots.values()))
        self.model_type: str | None = self.model_types[0] if self.model_types else None
        self.mapped: bool = bool(roots)
        #: block-level common names whose module packs several projections
        #: (``attn.qkv`` always; ``ff.w1`` for Phi-3's gate_up_proj).
        self.fused_names: frozenset[str] = fused
        self.fused_qkv: bool = "attn.qkv" in fused

    def common_name(self, path: str) -> str | None:
        return self._to_common.get(path)

    def output_head_paths(self) -> set[str]:
        """Every module inside an output head (the head roots and all their descendants)."""
        return set(self._heads)

    def items(self) -> Iterator[tuple[str, str]]:
        """(raw path, common name) pairs in ``named_modules()`` order."""
        return iter(self._to_common.items())

    def paths(self, common: str) -> list[str]:
        """Raw paths carrying exactly the common name ``common``."""
        return list(self._by_common.get(common, ()))

    def names_lacking(self, leaf: str, instead: str) -> list[str]:
        """``<block>.<instead>`` for every block that has ``instead`` but no ``leaf`` (a
        mixture-of-experts ``ff`` has no single ``ff.w2``), in named_modules order."""
        have = set(self._by_common)
        out = []
        for name in self._by_common:
            if name.endswith("." + instead) and ".block." in f".{name}":
                block = name[: -len(instead) - 1]
                if block.rsplit(".", 1)[-1].isdigit() and f"{block}.{leaf}" not in have:
                    out.append(name)
        return out

    def __len__(self) -> int:
        return len(self._to_common)

    def __repr__(self) -> str:
        kind = ",".join(f"{self.roots[p]} ({self.sources[p]})" for p in self.roots) if self.mapped else "unmapped"
        return f"StructureMap({kind}, {len(self)} names, fused_qkv={self.fused_qkv})"

    def describe(self) -> str:
        """The mapping in use, per mapped model: where it comes from (table or inferred) and
        every common name with its module; blocks laid out like the previous one are folded."""
        if not self.mapped:
            return "no common-structure map: raw module names only"
        lines = []
        for root, model_type in self.roots.items():
            where = f"'{root}'" if root else "the model itself"
            lines.append(f"{model_type} at {where}: {self.sources[root]}")
            own = [(raw, name) for raw, name in self._to_common.items() if _owner(raw, self.roots) == root]
            lines.extend(_fold_blocks(own))
        outside = [(raw, name) for raw, name in self._to_common.items() if _owner(raw, self.roots) is None]
        if outside:  # the output head of a model whose mapped parts are nested in it (a VLM's lm_head)
            lines.append("outside those:")
            lines.extend(_fold_blocks(outside))
        if self.output_head_paths():
            lines.append(f"output heads (never selected by all-linear): {', '.join(sorted(self._heads_roots()))}")
        return "\n".join(lines)

    def _heads_roots(self) -> set[str]:
        return {h for h in self._heads if not any(h.startswith(o + ".") for o in self._heads)}


def structure_map(model: nn.Module, *, use_tables: bool = True) -> StructureMap:
    """Map every transformer in ``model`` (itself or nested anywhere): a transformers model
    whose ``config.model_type`` has a table is named by the table; everything else (other
    transformers models, a plain PyTorch model) by inference from its modules and shapes.
    ``use_tables=False`` infers everything (how the inference is tested against the tables).

    Issues one :class:`UnmappedArchitectureWarning` per call when a model (or a sub-model
    without mapped parts) gets no names.
    """
    modules = dict(model.named_modules())
    order = {path: i for i, path in enumerate(modules)}
    to_common: dict[str, str] = {}
    heads: set[str] = set()
    roots: dict[str, str] = {}
    sources: dict[str, str] = {}
    fused: set[str] = set()
    failed: list[tuple[str, nn.Module, str]] = []  # (path, module, reason)
    hf_models = list(_hf_models(modules))

    for path, hf in hf_models if use_tables else ():
        if any(_is_under(path, root) for root in roots):
            continue  # the base model / stacks inside an already mapped model
        model_type = getattr(getattr(hf, "config", None), "model_type", None)
        arch = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
        if arch is None:
            continue
        found = _map_one(arch, path, hf, modules)
        if found is None:
            continue  # a layout this table does not know: the inference below takes it
        names, model_heads = found
        roots[path] = model_type
        sources[path] = TABLE
        heads |= model_heads
        fused |= arch.fused
        for raw, name in names.items():
            to_common.setdefault(raw, name)
            if name == "attn.qkv" or name.endswith(".attn.qkv"):
                fused.add("attn.qkv")

    _infer(modules, hf_models, to_common, heads, roots, sources, fused)

    for path, hf in hf_models:
        if any(_is_under(path, root) or _is_under(root, path) for root in roots):
            continue
        model_type = getattr(getattr(hf, "config", None), "model_type", None)
        failed.append((path, hf, f"model type {model_type!r} has no structure table and no transformer "
                                 "blocks (a list of repeated modules holding an attention) were found in it"))
    _warn_unmapped(model, roots, failed)
    ordered = dict(sorted(to_common.items(), key=lambda kv: order[kv[0]]))
    ordered_roots = dict(sorted(roots.items(), key=lambda kv: order[kv[0]]))
    return StructureMap(ordered, heads, ordered_roots, frozenset(fused),
                        {p: sources[p] for p in ordered_roots})


def describe(model: nn.Module) -> str:
    """``structure_map(model).describe()``: the common names of ``model`` and where they come from."""
    return structure_map(model).describe()


def _infer(modules, hf_models, to_common, heads, roots, sources, fused) -> None:
    """Infer the structure of everything the tables left, adding to the maps in place."""
    if "" in roots:
        return  # a table covers the whole model
    tree = inference.ModuleTree(modules)
    taken = list(roots)
    stacks = inference.find_stacks(tree, excluded=taken)
    if not stacks:
        return
    hf_paths = [p for p, _ in hf_models if not any(_is_under(p, t) for t in taken)]
    inferred = inference.group_roots(tree, stacks, boundary=hf_paths, taken=taken)
    named_heads: set[str] = set()
    for root in inferred:
        owner = _outermost_hf(root.path, hf_models, taken)
        config = getattr(owner[1], "config", None) if owner else None
        inference.name_root(tree, root, _vocab_size(config))
        for raw, name in root.names.items():
            to_common.setdefault(raw, name)
        fused |= root.fused
        roots[root.path] = _label(root.path, owner, config, modules)
        sources[root.path] = INFERRED
        if owner is None:
            root_heads, lm_head = inference.plain_heads(tree, root)
            heads |= root_heads
            if lm_head is not None:
                to_common.setdefault(lm_head, "lm_head")
        elif owner[0] not in named_heads:
            named_heads.add(owner[0])
            path, hf = owner
            base_path = _base_model_path(path, hf, modules)
            head_roots = _head_roots(path, hf, base_path, modules)
            for head in head_roots:
                heads.update(p for p, _ in modules[head].named_modules(prefix=head) if p in modules)
            lm_head = _lm_head(head_roots, modules)
            if lm_head is not None:
                to_common.setdefault(lm_head, "lm_head")


def _label(path: str, owner, config, modules) -> str:
    """``model_type`` of the transformers model an inferred root is (``llava:CLIPVisionModel`` for
    a part of one); the class name for a model that is not from transformers."""
    model_type = getattr(config, "model_type", None)
    if owner is None or not isinstance(model_type, str):
        return type(modules[path]).__name__
    return model_type if owner[0] == path else f"{model_type}:{type(modules[path]).__name__}"


def _outermost_hf(path: str, hf_models, taken: list[str]):
    """The outermost transformers model holding ``path`` (or held by it) outside table-mapped parts."""
    for hf_path, hf in hf_models:  # named_modules order: outer models first
        if any(_is_under(hf_path, t) for t in taken):
            continue
        if _is_under(path, hf_path):
            return hf_path, hf
    return None


def _vocab_size(config) -> int | None:
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    value = getattr(text, "vocab_size", None)
    return value if isinstance(value, int) else None


def _owner(raw: str, roots: dict[str, str]) -> str | None:
    """The most deeply nested mapped root holding ``raw``."""
    holding = [r for r in roots if _is_under(raw, r)]
    return max(holding, key=lambda r: (r != "", len(r))) if holding else None


_BLOCK_NAME = re.compile(r"^((?:encoder\.|decoder\.)?block)\.(\d+)(?:\.(.*))?$")


def _fold_blocks(items: list[tuple[str, str]]) -> list[str]:
    """``common  raw`` lines; a run of blocks laid out like the block before it is one line."""
    width = max((len(name) for _, name in items), default=0)
    sections: list[tuple[str | None, list[tuple[str, str]]]] = []  # (block name or None, items)
    for raw, name in items:
        m = _BLOCK_NAME.match(name)
        key = f"{m.group(1)}.{m.group(2)}" if m else None
        if key is None or not sections or sections[-1][0] != key:
            sections.append((key, []))
        sections[-1][1].append((raw, name))

    def layout(section) -> tuple:
        key, entries = section
        block_raw = next((raw for raw, name in entries if name == key), None)
        if key is None or block_raw is None:
            return ()
        return tuple((name[len(key):], raw[len(block_raw):]) for raw, name in entries)

    lines: list[str] = []
    i = 0
    while i < len(sections):
        key, entries = sections[i]
        lines.extend(f"  {name:<{width}}  {raw}" for raw, name in entries)
        j = i + 1
        while j < len(sections) and layout(sections[j]) and layout(sections[j]) == layout(sections[i]):
            j += 1
        if j > i + 1:
            first, last = sections[i + 1][0], sections[j - 1][0]
            span = first if first == last else f"{first} .. {last.rsplit('.', 1)[-1]}"
            lines.append(f"  {span}: laid out as {key}")
        i = j
    return lines


# --------------------------------------------------------------------------- internals


def _hf_models(modules: dict[str, nn.Module]) -> Iterator[tuple[str, nn.Module]]:
    # transformers.modeling_utils is necessarily imported if any HF model exists,
    # so never import it ourselves (that alone costs ~1 s).
    modeling_utils = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling_utils, "PreTrainedModel", None)
    if pretrained is None:
        return
    for path, module in modules.items():
        if isinstance(module, pretrained):
            yield path, module


def _map_one(arch: Arch, path: str, hf: nn.Module, modules: dict[str, nn.Module]
             ) -> tuple[dict[str, str], set[str]] | None:
    base_path = _base_model_path(path, hf, modules)
    names: dict[str, str] = {}

    def put(raw: str, name: str) -> None:
        if raw not in names:
            names[raw] = name

    any_block = False
    for stack_name, stack in arch.stacks.items():
        prefix = f"{stack_name}." if stack_name else ""
        blocks = [b for container in _resolve_containers(base_path, stack.blocks, modules)
                  for b in _children(container, modules)]
        any_block = any_block or bool(blocks)
        for i, block_path in enumerate(blocks):
            block_name = f"{prefix}block.{i}"
            put(block_path, block_name)
            for common, candidates in stack.block.items():
                raw = _first_present(block_path, candidates, modules)
                if raw is not None:
                    put(raw, f"{block_name}.{common}")
        for common, candidates in stack.extra.items():
            raw = _first_present(base_path, candidates, modules)
            if raw is not None:
                put(raw, f"{prefix}{common}")
    if not any_block:
        return None
    for common, candidates in arch.top.items():
        raw = _first_present(base_path, candidates, modules)
        if raw is not None:
            put(raw, common)

    head_roots = _head_roots(path, hf, base_path, modules)
    heads: set[str] = set()
    for root in head_roots:
        heads.update(p for p, _ in modules[root].named_modules(prefix=root) if p in modules)
    lm_head = _lm_head(head_roots, modules)
    if lm_head is not None:
        put(lm_head, "lm_head")
    return names, heads


def _base_model_path(path: str, hf: nn.Module, modules: dict[str, nn.Module]) -> str:
    try:
        base = hf.base_model
    except Exception:
        return path
    if base is hf or not isinstance(base, nn.Module):
        return path
    candidate = _join(path, getattr(hf, "base_model_prefix", "") or "")
    if modules.get(candidate) is base:
        return candidate
    for name, child in hf.named_children():
        if child is base and _join(path, name) in modules:
            return _join(path, name)
    return path


def _head_roots(path: str, hf: nn.Module, base_path: str,
                modules: dict[str, nn.Module]) -> list[str]:
    roots = []
    for name, _ in hf.named_children():
        child = _join(path, name)
        if child not in modules or child == base_path:
            continue
        if base_path != path or name in HEAD_NAMES:
            roots.append(child)
    return roots


def _lm_head(head_roots: list[str], modules: dict[str, nn.Module]) -> str | None:
    """The final output projection: the last linear layer of the preferred head."""
    if not head_roots:
        return None
    by_name = {root.rsplit(".", 1)[-1]: root for root in head_roots}
    preferred = [by_name[n] for n in HEAD_NAMES if n in by_name]
    chosen = preferred[:1] or head_roots
    last = None
    for root in chosen:
        for p, m in modules[root].named_modules(prefix=root):
            if p in modules and isinstance(m, linear_types()):
                last = p
    return last if last is not None else chosen[0]


def _resolve_containers(base_path: str, spec: str, modules: dict[str, nn.Module]) -> list[str]:
    for alternative in _alternatives(spec):
        current = [base_path]
        for segment in alternative.split("."):
            if segment == "*":
                current = [c for p in current for c in _children(p, modules)]
            else:
                current = [c for c in (_join(p, segment) for p in current) if c in modules]
        if current:
            return current
    return []


def _children(path: str, modules: dict[str, nn.Module]) -> list[str]:
    return [c for c in (_join(path, name) for name, _ in modules[path].named_children())
            if c in modules]


def _first_present(base: str, candidates: str, modules: dict[str, nn.Module]) -> str | None:
    for alternative in _alternatives(candidates):
        raw = _join(base, alternative)
        if raw in modules:
            return raw
    return None


@lru_cache(maxsize=None)
def _alternatives(spec: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in spec.split("|"))


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _is_under(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")


def _warn_unmapped(model: nn.Module, roots: dict[str, str],
                   failed: list[tuple[str, nn.Module, str]]) -> None:
    # A failed model that contains a mapped one (e.g. a multimodal wrapper around
    # a llama) is covered by its mapped part; only report leaves, outermost first.
    reported: list[str] = []
    details = []
    for path, module, reason in failed:
        if any(_is_under(root, path) for root in roots):
            continue
        if any(_is_under(path, r) for r in reported):
            continue
        reported.append(path)
        where = f" at '{path}'" if path else ""
        details.append(f"{type(module).__name__}{where}: {reason}")
    if not roots and not details:
        details.append(f"{type(model).__name__}: not a transformers model (no HF config found)")
    if not details:
        return
    scope = "Parts of this model have" if roots else "This model has"
    warnings.warn(
        f"odelta_fast: {scope} an unmapped architecture ({'; '.join(details)}). "
        "Common structure names (block.N.attn.q, ff.w1, ...) are not available there; "
        "raw module names from named_modules() are used instead.",
        UnmappedArchitectureWarning,
        stacklevel=3,
    )
