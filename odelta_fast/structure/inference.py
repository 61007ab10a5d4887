"""Common structure names inferred from what a model's modules are, for models no table covers.

No forward pass and no list of class names: the inference reads the module tree, the layer
types and the weight shapes.

* **Blocks.** A transformer's blocks are the children of a ``ModuleList`` / ``Sequential`` whose
  children hold an attention, where blocks with an attention repeat a class, or two hold an
  attention and a feed-forward (hybrids of attention and linear-attention blocks), or the list has
  one child; not T5's list of sub-layers. The innermost such list wins (ALBERT's groups of
  layers, Swin's stages of blocks are flattened into one numbering). A list of bare attentions
  with sibling lists of feed-forwards and norms of its length is one list of blocks spread over
  them (XLM). A list whose blocks have cross-attention is a decoder and pairs with the nearest
  list without it, the encoder (``encoder.`` / ``decoder.`` prefixes).
* **Attention** inside a block: a projection back to the block width ``H`` (``o``) fed by either
  three projections from ``H`` (``q``, ``k``, ``v``: ``k`` and ``v`` of one width, dividing ``q``'s
  and ``o``'s input), one fused projection (``qkv``: ``o``'s input plus twice the key/value
  width), or a query plus a fused key/value (cross-attention). The attention module is the
  smallest module holding them, widened over wrappers that hold nothing else.
* **Feed-forward**: what is left. ``H -> I`` projections (two: gate and up; one of width ``2I``:
  fused gate/up) feeding one ``I -> H`` projection (down). A module holding expert weights
  (a ``>= 3``-D parameter or a list of expert MLPs) is a mixture of experts: it is the ``ff``,
  with no single up or down projection to name.
* **Norms**: leaf modules with one width-``H`` vector (LayerNorm, RMSNorm, ...; not the
  channel-first BatchNorm / GroupNorm). One inside an attention or sharing a wrapper with it
  (post-norm BERT, T5's ``layer.N``) belongs to it; the block-level rest go to attention, then
  feed-forward, in definition order unless their names tell (``input_layernorm`` /
  ``post_attention_layernorm``); of four (Gemma's sandwich) the first and the third.

Names decide only between candidates the shapes leave equal: which of three same-width
projections is ``q``, ``k`` or ``v``, which of two gated branches is the gate, whether a norm
whose name says ``cross`` belongs to the cross-attention, which of two lists is the encoder.
"""
from __future__ import annotations

import bisect
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Optional

from torch import nn

from ..projections import projection_shape

# --------------------------------------------------------------------------- module tree


class ModuleTree:
    """``named_modules()`` in pre-order with O(1) subtree ranges."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.modules = modules
        self.paths = list(modules)
        self.index = {p: i for i, p in enumerate(self.paths)}
        self.end = [0] * len(self.paths)
        open_paths: list[int] = []
        for i, path in enumerate(self.paths):
            while open_paths and not _is_under(path, self.paths[open_paths[-1]]):
                self.end[open_paths.pop()] = i
            open_paths.append(i)
        for j in open_paths:
            self.end[j] = len(self.paths)
        self.projections = [i for i, p in enumerate(self.paths) if projection_shape(modules[p]) is not None]
        self.norms = [i for i, p in enumerate(self.paths) if norm_width(modules[p]) is not False]
        self._children: dict[str, list[str]] = {}

    def span(self, path: str) -> range:
        i = self.index[path]
        return range(i, self.end[i])

    def children(self, path: str) -> list[str]:
        found = self._children.get(path)
        if found is None:
            module = self.modules[path]
            found = [c for c in (_join(path, name) for name, _ in module.named_children()) if c in self.index]
            self._children[path] = found
        return found

    def in_span(self, indices: list[int], path: str) -> list[int]:
        span = self.span(path)
        return indices[bisect.bisect_left(indices, span.start):bisect.bisect_left(indices, span.stop)]

    def has_parameters(self, path: str) -> bool:
        return next(self.modules[path].parameters(), None) is not None


# --------------------------------------------------------------------------- what modules are


_TORCH_NORMS = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# Norms over the channel axis of (batch, channels, ...) maps: not a norm of a block's hidden states.
_CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def norm_width(module: nn.Module):
    """The normalised width of a norm over the last axis (``None`` when it has no weight to tell
    it), or ``False`` for anything else. Such a norm is a leaf whose only parameters are vectors."""
    if next(module.children(), None) is not None or isinstance(module, (nn.Embedding, nn.Linear) + _CHANNEL_NORMS):
        return False
    params = list(module.parameters(recurse=False))
    if isinstance(module, _TORCH_NORMS):
        shape = getattr(module, "normalized_shape", None)
        return int(shape[-1]) if shape else None
    if any(p.dim() != 1 for p in params):
        return False
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1:
        return int(weight.shape[0])
    # Parameter-free norms (OLMo's LayerNorm without affine): only the class says what it is.
    if not params and type(module).__name__.lower().endswith("norm"):
        return None
    return False


def _is_expert_weight(module: nn.Module, hidden: int) -> bool:
    """Weights of several experts in one tensor: ``(experts, ..., hidden, ...)``; not a convolution."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    return any(p.dim() == 3 and hidden in p.shape[1:] and p.shape[0] > 1 for p in module.parameters(recurse=False))


# --------------------------------------------------------------------------- names as tie-breakers

_ROLE_HINTS = {
    "qkv": re.compile(r"(.*qkv.*|query_key_value|c_attn|in_proj|wqkv)"),
    "q": re.compile(r"(q|query|wq|to_q)(_(b_)?(proj|lin|linear|attn))?"),
    "k": re.compile(r"(k|key|wk|to_k)(_(proj|lin|linear))?"),
    "v": re.compile(r"(v|value|wv|to_v)(_(proj|lin|linear))?"),
    "kv": re.compile(r"(kv|to_kv|wkv|kv_b_proj|kv_proj|c_attn)"),
    "o": re.compile(r"(o|out|wo|to_out|proj|c_proj|dense|out_proj|o_proj|o_b_proj|out_lin|output|attn_out|dense_out)"),
    "gate": re.compile(r"(.*gate.*|wi_0|w1|w_gate)"),
    "up": re.compile(r"(up|up_proj|wi|wi_1|w3|fc1|fc_in|c_fc|lin1|dense_h_to_4h|intermediate|fc_1|w_in|linear_1)"),
    "down": re.compile(r"(down|down_proj|wo|w2|fc2|fc_out|c_proj|lin2|dense_4h_to_h|output|fc_2|w_out|linear_2)"),
}
_CROSS_HINT = re.compile(r"(cross|encoder_attn|enc_dec|encdec|src_attn)", re.IGNORECASE)
_QK_NORM_HINT = re.compile(r"^(q|k|qk|query|key|kv|q_a|kv_a)(_|$)", re.IGNORECASE)
_ATTN_NORM_HINT = re.compile(r"(input|ln_1|norm_?1|ln_attn|attn|att|attention|pre_attn|before|sa_layer_norm)",
                             re.IGNORECASE)
_FF_NORM_HINT = re.compile(r"(post_attention|ln_2|norm_?2|ln_mlp|mlp|ffn|ff_norm|feed_?forward|pre_mlp|after|"
                           r"final_layer_norm|output_layer_norm)", re.IGNORECASE)
_ATTN_HINT = re.compile(r"(attn|attention)", re.IGNORECASE)
_FF_HINT = re.compile(r"(mlp|ffn|feed_?forward|ff$|intermediate|moe|experts?$)", re.IGNORECASE)


def _hinted(path: str, role: str) -> bool:
    """Whether the module's own name is one ``role`` goes by in some architecture."""
    name = path.rsplit(".", 1)[-1].lower()
    if name == "dense":  # BERT's attention.output.dense and output.dense, GPT-NeoX's attention.dense
        return role in ("o", "down")
    return bool(_ROLE_HINTS[role].fullmatch(name))


# --------------------------------------------------------------------------- projections


@dataclass(frozen=True)
class Proj:
    path: str
    n_in: int
    n_out: int
    order: int


def _projections(tree: ModuleTree, indices: Iterable[int]) -> list[Proj]:
    out = []
    for i in indices:
        path = tree.paths[i]
        n_in, n_out = projection_shape(tree.modules[path])
        out.append(Proj(path, n_in, n_out, i))
    return out


def match_attention(projs: list[Proj], hidden: int, *, cross_ok: bool = True) -> Optional[dict[str, Proj]]:
    """Roles (``q``, ``k``, ``v``, ``qkv``, ``kv``, ``o``) of an attention among ``projs``, or None."""
    # A projection named as an input (``value``) is never the output, whatever its shape.
    outs = [p for p in projs if p.n_out == hidden and not any(_hinted(p.path, r) for r in ("q", "k", "v", "qkv", "kv"))]
    outs.sort(key=lambda p: (not _hinted(p.path, "o"), -p.order))
    for o in outs:
        # The output projection usually comes last; where a query is defined after it, look at all.
        before = [p for p in projs if p is not o and p.order < o.order]
        for rest in (before, [p for p in projs if p is not o]):
            found = _inputs_for(o, rest, hidden, cross_ok) if rest else None
            if found is not None and not _reads_inner_width(o, found, projs, hidden):
                found["o"] = o
                return found
    return None


def _reads_inner_width(o: Proj, roles: dict[str, Proj], projs: list[Proj], hidden: int) -> bool:
    """Another projection reads what feeds ``o``: a state-space mixer (Mamba's ``x_proj`` after its
    packed ``in_proj``), not an attention, whose only reader of the mixed width is ``o``."""
    if o.n_in == hidden:
        return False
    used = {p.path for p in roles.values()} | {o.path}
    return any(p.n_in == o.n_in and p.path not in used and not _hinted(p.path, "down") for p in projs)


def _inputs_for(o: Proj, rest: list[Proj], hidden: int, cross_ok: bool) -> Optional[dict[str, Proj]]:
    inner = o.n_in

    def kv_width_ok(width: int) -> bool:
        return width > 0 and inner % width == 0

    def separate(q: Proj, k: Proj, v: Proj, named: bool = False) -> bool:
        # Unnamed, keys and values must read one input; named so, they may read two (MobileBERT).
        same_input = k.n_in == v.n_in and (k.n_in == hidden or cross_ok)
        return (q.n_in == hidden and (same_input or named)
                and k.n_out == v.n_out and kv_width_ok(v.n_out) and q.n_out % k.n_out == 0)

    def fused(p: Proj) -> bool:
        extra = p.n_out - inner
        return p.n_in == hidden and extra > 0 and extra % 2 == 0 and kv_width_ok(extra // 2)

    def q_plus_kv(q: Proj, kv: Proj) -> bool:
        return (q.n_in == hidden and kv.n_out % 2 == 0 and kv_width_ok(kv.n_out // 2)
                and (kv.n_in == hidden or cross_ok) and q.n_out % (kv.n_out // 2) == 0)

    named = {role: [p for p in rest if _hinted(p.path, role)] for role in ("q", "k", "v", "qkv", "kv")}
    # 1. names that agree with the shapes
    for q in named["q"]:
        for k in named["k"]:
            for v in named["v"]:
                if separate(q, k, v, named=True):
                    return {"q": q, "k": k, "v": v}
    # A separately named query means a packed projection beside it holds only keys and values.
    for q in named["q"]:
        for kv in named["kv"]:
            if kv is not q and q_plus_kv(q, kv):
                return {"q": q, "kv": kv}
    for p in named["qkv"]:
        if fused(p):
            return {"qkv": p}
    # 2. shapes alone, in definition order
    for i, q in enumerate(rest):
        for j in range(i + 1, len(rest)):
            for m in range(j + 1, len(rest)):
                if separate(q, rest[j], rest[m]):
                    return {"q": q, "k": rest[j], "v": rest[m]}
    for p in rest:  # a projection named for one role (a query, a gate) packs no q|k|v
        if fused(p) and not any(_hinted(p.path, r) for r in ("q", "k", "v", "kv", "gate", "up")):
            return {"qkv": p}
    # 3. multi-head latent attention: a query (q, or q_a -> q_b) and compressed keys/values
    # (kv_a -> kv_b), every one named so, feeding an output named so.
    compressed = [p for p in rest if p.path.rsplit(".", 1)[-1].lower().startswith("kv")]
    if _hinted(o.path, "o") and compressed and named["q"]:
        return {"q": named["q"][-1]}  # q_b after q_a: the projection that produces the queries
    return None


def match_feed_forward(projs: list[Proj], hidden: int) -> Optional[dict[str, Proj]]:
    """Roles (``w1`` up, ``gate``, ``w2`` down) among ``projs``; ``fused`` marks a gate|up ``w1``."""
    downs = [p for p in projs if p.n_out == hidden]
    downs.sort(key=lambda p: (p.n_in == hidden, not _hinted(p.path, "down"), -p.order))
    for down in downs:
        width = down.n_in
        before = [p for p in projs if p is not down and p.order < down.order] or [p for p in projs if p is not down]
        ups = _closest([p for p in before if p.n_in == hidden and p.n_out == width], down)
        if len(ups) >= 2:
            gates = [p for p in ups if _hinted(p.path, "gate")]
            gate = gates[0] if gates else ups[0]
            up = next(p for p in ups if p is not gate)
            return {"gate": gate, "w1": up, "w2": down}
        if len(ups) == 1:
            return {"w1": ups[0], "w2": down}
        packed = _closest([p for p in before if p.n_in == hidden and p.n_out == 2 * width], down)
        if packed:
            return {"w1": packed[0], "w2": down, "fused": packed[0]}
    return None


def _closest(candidates: list[Proj], anchor: Proj) -> list[Proj]:
    """The candidates sharing the deepest module with ``anchor`` (an FF's own up projection, not
    the one of a second FF in the same block)."""
    if len(candidates) < 2:
        return candidates
    depth = {p.path: _lca(p.path, anchor.path).count(".") + bool(_lca(p.path, anchor.path)) for p in candidates}
    best = max(depth.values())
    return [p for p in candidates if depth[p.path] == best]


# --------------------------------------------------------------------------- blocks


@dataclass
class BlockLayout:
    """Common leaf names inside one block, as paths relative to the block."""

    names: dict[str, str] = field(default_factory=dict)  # relative path -> leaf name ("attn.q")
    fused: set[str] = field(default_factory=set)
    has_attention: bool = False
    has_cross: bool = False

    @property
    def has_feed_forward(self) -> bool:
        return any(n == "ff" or n.startswith("ff.w") for n in self.names.values())

    @property
    def attention_only(self) -> bool:
        """The block is an attention and nothing else (XLM keeps attentions, FFs and norms in
        parallel lists)."""
        return self.has_attention and all(n.startswith("attn.") for n in self.names.values())


def _relative(path: str, block: str) -> str:
    return path[len(block) + 1:] if block else path


def _lca(a: str, b: str) -> str:
    sa, sb = a.split("."), b.split(".")
    common = []
    for x, y in zip(sa, sb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def _parent(path: str) -> str:
    return path.rsplit(".", 1)[0] if "." in path else ""


def _widen(tree: ModuleTree, path: str, stop: str) -> str:
    """Climb from ``path`` over wrappers: parents (below ``stop``) with no parameters outside it."""
    while path and path != stop:
        parent = _parent(path)
        if parent == stop or not _is_under(parent, stop):
            break
        if any(True for _ in tree.modules[parent].parameters(recurse=False)):
            break
        if any(c != path and tree.has_parameters(c) for c in tree.children(parent)):
            break
        path = parent
    return path


def _smallest_holding(tree: ModuleTree, paths: list[str], block: str) -> str:
    common = paths[0]
    for p in paths[1:]:
        common = _lca(common, p)
    # the LCA of leaf paths may be a leaf itself only when there is one path
    if common in paths and len(set(paths)) == 1:
        common = _parent(common)
    if not _is_under(common, block) or common == "":
        return block
    return common


def _expert_holder(tree: ModuleTree, path: str, hidden: int) -> bool:
    """A mixture-of-experts module: a 3-D expert weight, or a list of >= 2 expert MLPs."""
    for i in tree.span(path):
        module = tree.modules[tree.paths[i]]
        if _is_expert_weight(module, hidden):
            return True
        if isinstance(module, (nn.ModuleList, nn.Sequential)) and _expert_list(tree, path, tree.paths[i], hidden):
            return True
    return False


def _expert_list(tree: ModuleTree, holder: str, path: str, hidden: int) -> bool:
    """Identical MLPs in a list are experts when a router scores them (a projection from the
    block width with one output per expert) or the list says so by name; otherwise they are
    layers applied one after another (MobileBERT's stacked FFNs)."""
    kids = tree.children(path)
    if len(kids) < 2 or len({type(tree.modules[k]) for k in kids}) != 1:
        return False
    if not all(len(tree.in_span(tree.projections, k)) >= 2 for k in kids):
        return False
    if "expert" in path.rsplit(".", 1)[-1].lower():
        return True
    routers = [p for p in _projections(tree, tree.in_span(tree.projections, holder))
               if not _is_under(p.path, path) and p.n_in == hidden and p.n_out == len(kids)]
    return bool(routers)


def block_hidden_width(tree: ModuleTree, block: str) -> Optional[int]:
    projs = _projections(tree, tree.in_span(tree.projections, block))
    if not projs:
        return None
    ins = Counter(p.n_in for p in projs)
    widths = Counter(w for i in tree.in_span(tree.norms, block)
                     if isinstance(w := norm_width(tree.modules[tree.paths[i]]), int))
    outs = Counter(p.n_out for p in projs)
    # The block width is what norms normalise and what projections both read and write.
    candidates = [w for w in widths if w in ins] or [w for w in ins if w in outs] or list(ins)
    return max(candidates, key=lambda w: (widths.get(w, 0) > 0, ins[w] + outs[w], ins[w]))


def find_attentions(tree: ModuleTree, block: str, hidden: int) -> list[tuple[str, dict[str, Proj]]]:
    """The attentions of one block as ``(module path, roles)``, in definition order. Each is
    matched in the smallest module holding all its projections (the block itself when they sit
    straight in it); a projection serves one attention only."""
    found: list[tuple[str, dict[str, Proj]]] = []
    claimed: set[str] = set()
    containers = [i for i in tree.span(block) if next(tree.modules[tree.paths[i]].children(), None) is not None]
    # Deepest first (sorted is stable: definition order within one depth); the block comes last.
    containers.sort(key=lambda i: -tree.paths[i].count(".") if tree.paths[i] != block else 1)
    for i in containers:
        path = tree.paths[i]
        if any(_is_under(path, f) for f, _ in found if f != block) or (path != block and _is_list(tree.modules[path])):
            continue  # inside an attention already found; a list's items are never one attention
        if isinstance(tree.modules[path], nn.MultiheadAttention):
            roles = {"o": p for p in _projections(tree, tree.in_span(tree.projections, path))}
            found.append((path, roles))
            claimed.update(p.path for p in roles.values())
            continue
        for _ in range(2 if path == block else 1):  # a flat block may hold self- and cross-attention
            projs = [p for p in _projections(tree, tree.in_span(tree.projections, path)) if p.path not in claimed]
            if len(projs) < 2 or _expert_holder(tree, path, hidden):
                break
            roles = match_attention(projs, hidden)
            if roles is None:
                break
            holder = _smallest_holding(tree, [r.path for r in roles.values()], block)
            if path != block and holder != path:
                break  # the projections reach outside this module: an enclosing one holds the attention
            if _is_list(tree.modules[holder]):
                break  # projections of different items of a list (FocalNet's layers): no attention
            if path == block and found and not _looks_like_attention(roles):
                break
            found.append((path, roles))
            if path == block:
                claimed.update(r.path for r in roles.values())
            else:
                claimed.update(tree.paths[j] for j in tree.in_span(tree.projections, path))
    found.sort(key=lambda item: min((r.order for r in item[1].values()), default=tree.index[item[0]]))
    return found


def _looks_like_attention(roles: dict[str, Proj]) -> bool:
    return any(_hinted(p.path, r) for r, p in roles.items() if r != "o")


def analyse_block(tree: ModuleTree, block: str, hidden: Optional[int] = None) -> BlockLayout:
    layout = BlockLayout()
    hidden = hidden or block_hidden_width(tree, block)
    if hidden is None:
        return layout
    attentions = find_attentions(tree, block, hidden)
    attentions = _drop_feed_forward_lookalikes(attentions)
    self_attn, cross_attn = _split_self_and_cross(attentions, hidden)
    names: dict[str, str] = {}
    claimed: set[str] = set()

    def put(path: str, name: str) -> None:
        if path != block and path not in names:
            names[path] = name

    for prefix, item in (("attn", self_attn), ("crossattn", cross_attn)):
        if item is None:
            continue
        path, roles = item
        module_path = _widen(tree, path, block) if path != block else block
        put(module_path, prefix)
        for role in ("q", "k", "v", "qkv", "o"):
            if role in roles:
                put(roles[role].path, f"{prefix}.{role}")
        if path != block:
            claimed.update(tree.paths[j] for j in tree.span(module_path))
        claimed.update(r.path for r in roles.values())
        if prefix == "attn":
            layout.has_attention = True
            if "qkv" in roles:
                layout.fused.add("attn.qkv")
        else:
            layout.has_cross = True

    _feed_forward(tree, block, hidden, claimed, put, layout)
    _assign_norms(tree, block, hidden, names, put)
    layout.names = {_relative(p, block): n for p, n in names.items()}
    return layout


def _drop_feed_forward_lookalikes(attentions):
    """A fused gate|up MLP has the shapes of a fused-qkv attention; when a block seems to hold
    more attentions than one self- and one cross-attention, or when one candidate's module is
    named like a feed-forward and another like an attention, the feed-forward goes."""
    if len(attentions) < 2:
        return attentions
    kept = [a for a in attentions if not (_FF_HINT.search(a[0].rsplit(".", 1)[-1] or "") and not _ATTN_HINT.search(a[0]))]
    return kept or attentions


def _named_after(norms: list[str], module: Optional[str]) -> Optional[str]:
    """The norm whose name holds the last name of ``module`` (``norm_feed_forward2`` for
    ``feed_forward2``), else the first one."""
    if not norms:
        return None
    last = module.rsplit(".", 1)[-1].lower() if module else ""
    return next((n for n in norms if last and last in n.rsplit(".", 1)[-1].lower()), norms[0])


def _split_self_and_cross(attentions, hidden):
    if not attentions:
        return None, None
    if len(attentions) == 1:
        return attentions[0], None
    hinted = [a for a in attentions if _CROSS_HINT.search(a[0])]
    if hinted and len(hinted) < len(attentions):
        cross = hinted[0]
        self_attn = next(a for a in attentions if a is not cross)
        return self_attn, cross
    # Cross-attention reads the encoder's states: keys/values of another width, else the later one.
    other_width = [a for a in attentions if any(p.n_in != hidden for r, p in a[1].items() if r in ("k", "v", "kv"))]
    if len(other_width) == 1:
        cross = other_width[0]
        return next(a for a in attentions if a is not cross), cross
    return attentions[0], attentions[1]


def _feed_forward(tree: ModuleTree, block: str, hidden: int, claimed: set[str], put, layout: BlockLayout) -> None:
    """Names the feed-forward among what the attentions left (``claimed``)."""
    # A child holding expert weights is a mixture of experts: the FF module, no w1/w2 inside.
    for child in _leafward_children(tree, block, claimed):
        if _expert_holder(tree, child, hidden):
            path = _widen(tree, child, block)
            put(path, "ff")
            claimed.update(tree.paths[j] for j in tree.span(path))
            return
    projs = [p for p in _projections(tree, tree.in_span(tree.projections, block)) if p.path not in claimed]
    roles = match_feed_forward(projs, hidden)
    if roles is None:
        return
    holder = _smallest_holding(tree, [roles[r].path for r in ("w1", "w2", "gate") if r in roles], block)
    if holder != block:  # BERT's intermediate / output and flat blocks have no FF module
        put(_widen(tree, holder, block), "ff")
    for role in ("gate", "w1", "w2"):
        if role in roles:
            put(roles[role].path, f"ff.{role}")
    if "fused" in roles:
        layout.fused.add("ff.w1")
    claimed.update(roles[r].path for r in ("w1", "w2", "gate") if r in roles)


def _leafward_children(tree: ModuleTree, block: str, claimed: set[str]) -> list[str]:
    out = []
    stack = list(reversed(tree.children(block)))
    while stack:
        path = stack.pop()
        if path in claimed:
            continue
        if any(_is_under(c, path) for c in claimed):
            # an ancestor of an attention (T5's layer.N wrappers): look inside it
            stack.extend(reversed(tree.children(path)))
            continue
        out.append(path)
    return out


def _assign_norms(tree: ModuleTree, block: str, hidden: int, names: dict[str, str], put) -> None:
    """Names the norms of the sub-layers already in ``names`` (see the module docstring)."""
    owners = {}
    for prefix in ("attn", "crossattn"):
        module = next((p for p, n in names.items() if n == prefix), None)
        projs = [p for p, n in names.items() if n.startswith(prefix + ".")]
        owners[prefix] = (module, projs)
    ff_projs = [p for p, n in names.items() if n.startswith("ff.")]
    owners["ff"] = (next((p for p, n in names.items() if n == "ff"), None), ff_projs)
    present = [role for role, (module, projs) in owners.items() if module or projs]

    norms = []
    for i in tree.in_span(tree.norms, block):
        path = tree.paths[i]
        width = norm_width(tree.modules[path])
        if path == block or (width is not None and width != hidden):
            continue
        if _QK_NORM_HINT.match(path.rsplit(".", 1)[-1]):
            continue  # per-head query/key norms
        attn_module = owners["attn"][0]
        if width is None and attn_module and _is_under(path, attn_module):
            continue  # a weightless norm inside the attention: nothing says it normalises the block width
        norms.append(path)

    def owner_of(norm: str) -> Optional[str]:
        best, best_depth = None, -1
        for role in present:
            module, projs = owners[role]
            anchors = ([module] if module else []) + projs
            for anchor in anchors:
                if module and _is_under(norm, module):
                    return role
                common = _lca(norm, anchor)
                if common != block and _is_under(common, block) and common.count(".") > best_depth:
                    best, best_depth = role, common.count(".")
        return best

    assigned: dict[str, str] = {}
    free = []
    for norm in norms:
        role = owner_of(norm)
        if role is None:
            if _parent(norm) == block:  # nested in something else (a hyper-connection): no sub-layer's norm
                free.append(norm)
        elif role not in assigned:
            assigned[role] = norm
    if any(norm_width(tree.modules[n]) is not None for n in free):
        free = [n for n in free if norm_width(tree.modules[n]) is not None]
    if "crossattn" in present and "crossattn" not in assigned:
        hinted = [n for n in free if _CROSS_HINT.search(n.rsplit(".", 1)[-1])]
        if hinted:
            assigned["crossattn"] = hinted[0]
            free.remove(hinted[0])
    needed = [r for r in ("attn", "crossattn", "ff") if r in present and r not in assigned]
    if "attn" not in present and needed == ["ff"] and len(free) >= 2:
        # A block whose token mixer is no attention (state-space, linear attention): the first
        # norm feeds the mixer, the FF's is the one named for it, else the next one.
        hinted = [n for n in free if _FF_NORM_HINT.search(n.rsplit(".", 1)[-1])]
        free = hinted[:1] or free[1:2]
    if needed == ["attn", "ff"] and len(free) >= 2:
        ff_named = [n for n in free if _FF_NORM_HINT.search(n.rsplit(".", 1)[-1])]
        attn_named = [n for n in free if n not in ff_named and _ATTN_NORM_HINT.search(n.rsplit(".", 1)[-1])]
        if len(attn_named) == 1 and len(ff_named) == 1:
            free = [attn_named[0], ff_named[0]]  # one named for each: names order them
        elif len(free) == 4:
            free = [free[0], free[2]]  # sandwich norms: input, post-attention, pre-FF, post-FF
        elif attn_named or ff_named:
            # Several named for one sub-layer (Conformer's two FFs): the one named after its module.
            attn = _named_after(attn_named, owners["attn"][0]) or next(n for n in free if n not in ff_named[:1])
            ff = _named_after(ff_named, owners["ff"][0]) or next(n for n in free if n != attn)
            free = [attn, ff]
    for role, norm in zip(needed, free):
        assigned[role] = norm
    for role, norm in assigned.items():
        put(norm, f"{role}.layer_norm")


# --------------------------------------------------------------------------- stacks and roots


@dataclass
class Stack:
    lists: list[str]
    blocks: list[str]  # each block's module; "" for a block spread over parallel lists
    layouts: list[BlockLayout]  # names relative to the block (absolute where the block is "")
    anchor: str  # the module holding the block list(s)
    spans: list[list[str]] = field(default_factory=list)  # the modules making up each block

    def __post_init__(self):
        if not self.spans:
            self.spans = [[b] for b in self.blocks]

    @property
    def has_cross(self) -> bool:
        return any(layout.has_cross for layout in self.layouts)



@dataclass
class InferredRoot:
    path: str
    stacks: dict[str, Stack]  # prefix ("", "encoder", "decoder") -> stack
    names: dict[str, str] = field(default_factory=dict)  # raw path -> common name
    fused: set[str] = field(default_factory=set)
    heads: set[str] = field(default_factory=set)


def _is_list(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def find_stacks(tree: ModuleTree, excluded: Iterable[str] = ()) -> list[Stack]:
    """Every stack of transformer blocks outside the ``excluded`` subtrees, in definition order."""
    excluded = list(excluded)
    cache: dict[tuple, BlockLayout] = {}
    qualified: dict[str, tuple[list[str], list[BlockLayout]]] = {}
    lists = [p for p in tree.paths if _is_list(tree.modules[p])
             and not any(_is_under(p, e) for e in excluded) and tree.children(p)]
    for path in reversed(lists):  # deepest lists first
        if any(_is_under(q, path) for q in qualified):
            continue
        blocks = tree.children(path)
        layouts = [_layout(tree, b, cache) for b in blocks]
        with_attention = [b for b, lay in zip(blocks, layouts) if lay.has_attention]
        if not with_attention:
            continue
        classes = Counter(type(tree.modules[b]) for b in blocks)
        repeated = any(classes[type(tree.modules[b])] > 1 for b in with_attention)
        whole = sum(lay.has_attention and lay.has_feed_forward for lay in layouts)
        if len(blocks) > 1 and not repeated and whole < 2:
            continue  # sub-layers of one block (T5's layer list), not a list of blocks
        if len(blocks) == 1 and not _is_block_like(tree, blocks[0], layouts[0]):
            continue
        qualified[path] = (blocks, layouts)
    parallel = {path: _parallel_blocks(tree, path, *qualified[path]) for path in qualified
                if all(lay.attention_only for lay in qualified[path][1])}
    # Lists nested in one outer list (ALBERT's groups, Swin's stages) form one stack.
    groups: dict[str, list[str]] = {}
    for path in sorted(qualified, key=tree.index.__getitem__):
        outer = _outer_list(tree, path)
        groups.setdefault(outer or path, []).append(path)
    stacks = []
    for key, members in groups.items():
        anchor = _parent(key) if key else ""
        if len(members) == 1 and parallel.get(members[0]) is not None:
            layouts, spans = parallel[members[0]]
            stacks.append(Stack(members, [""] * len(layouts), layouts, anchor, spans))
            continue
        blocks = [b for m in members for b in qualified[m][0]]
        layouts = [lay for m in members for lay in qualified[m][1]]
        stacks.append(Stack(members, blocks, layouts, anchor))
    return stacks


def _parallel_blocks(tree: ModuleTree, path: str, attentions: list[str], layouts: list[BlockLayout]):
    """Blocks spread over parallel lists (XLM: ``attentions``, ``layer_norm1``, ``ffns``,
    ``layer_norm2``): sibling lists of the same length holding feed-forwards or norms. Returns
    absolute-path layouts and the modules of each block, or None when there are no such lists."""
    n = len(attentions)
    hidden = block_hidden_width(tree, attentions[0])
    siblings = [c for c in tree.children(_parent(path)) if c != path and _is_list(tree.modules[c])
                and len(tree.children(c)) == n]
    ffs, norms = None, []
    for sibling in siblings:
        kids = tree.children(sibling)
        if all(norm_width(tree.modules[k]) in (hidden, None) for k in kids):
            norms.append(kids)
        elif ffs is None and all(match_feed_forward(_projections(tree, tree.in_span(tree.projections, k)), hidden)
                                 for k in kids):
            ffs = kids
    if ffs is None:
        return None
    out_layouts, spans = [], []
    for i, (attn, layout) in enumerate(zip(attentions, layouts)):
        names = {attn: "attn", **{_join(attn, rel): leaf for rel, leaf in layout.names.items()}}
        roles = match_feed_forward(_projections(tree, tree.in_span(tree.projections, ffs[i])), hidden)
        names[ffs[i]] = "ff"
        names.update({roles[r].path: f"ff.{r}" for r in ("gate", "w1", "w2") if r in roles})
        for role, kids in zip(("attn", "ff"), norms):
            names[kids[i]] = f"{role}.layer_norm"
        fused = set(layout.fused) | ({"ff.w1"} if "fused" in roles else set())
        out_layouts.append(BlockLayout(names, fused, has_attention=True))
        spans.append([attn, ffs[i]] + [kids[i] for kids in norms])
    return out_layouts, spans


def _is_block_like(tree: ModuleTree, block: str, layout: BlockLayout) -> bool:
    # A single child is a block when it holds more than the attention (an FF or a norm).
    return any(not n.startswith(("attn", "crossattn")) for n in layout.names.values())


def _outer_list(tree: ModuleTree, path: str) -> Optional[str]:
    current = _parent(path)
    while current:
        if _is_list(tree.modules.get(current, nn.Module())):
            return current
        current = _parent(current)
    return None


def _layout(tree: ModuleTree, block: str, cache: dict) -> BlockLayout:
    key = _signature(tree, block)
    layout = cache.get(key)
    if layout is None:
        layout = analyse_block(tree, block)
        cache[key] = layout
    return layout


def _signature(tree: ModuleTree, block: str) -> tuple:
    start = len(block) + 1 if block else 0
    sig = []
    for i in tree.span(block):
        path = tree.paths[i]
        module = tree.modules[path]
        shapes = tuple(tuple(p.shape) for p in module.parameters(recurse=False))
        sig.append((path[start:], type(module), shapes))
    return tuple(sig)


def group_roots(tree: ModuleTree, stacks: list[Stack], boundary: list[str], taken: list[str]) -> list[InferredRoot]:
    """Pair decoders with encoders and give every stack (or pair) its root module.

    ``boundary``: paths a root may not extend above (the transformers models in the tree);
    ``taken``: roots of other maps (table-mapped models), which a root may not contain."""
    remaining = list(stacks)
    roots: list[InferredRoot] = []
    pairs = []
    for dec in [s for s in stacks if s.has_cross]:
        encoders = [s for s in remaining if not s.has_cross and s is not dec]
        if not encoders:
            continue
        enc = max(encoders, key=lambda s: (_lca(s.anchor, dec.anchor).count(".") if _lca(s.anchor, dec.anchor) else -1,
                                            "encoder" in s.anchor.rsplit(".", 1)[-1]))
        pairs.append((enc, dec))
        remaining.remove(enc)
        remaining.remove(dec)
    # Two stacks named encoder / decoder side by side, without cross-attention found.
    by_parent: dict[str, dict[str, Stack]] = {}
    for s in remaining:
        last = s.anchor.rsplit(".", 1)[-1]
        if last in ("encoder", "decoder"):
            by_parent.setdefault(_parent(s.anchor), {})[last] = s
    for parent, kinds in by_parent.items():
        if len(kinds) == 2:
            pairs.append((kinds["encoder"], kinds["decoder"]))
            remaining.remove(kinds["encoder"])
            remaining.remove(kinds["decoder"])
    others_of = lambda own: [s for s in stacks if s not in own]  # noqa: E731
    for enc, dec in pairs:
        base = _lca(enc.anchor, dec.anchor)
        path = _grow_root(tree, base, others_of((enc, dec)), boundary, taken)
        roots.append(InferredRoot(path, {"encoder": enc, "decoder": dec}))
    for s in remaining:
        path = _grow_root(tree, s.anchor, others_of((s,)), boundary, taken)
        roots.append(InferredRoot(path, {"": s}))
    roots.sort(key=lambda r: tree.index[r.path])
    return roots


def _grow_root(tree: ModuleTree, path: str, others: list[Stack], boundary: list[str], taken: list[str]) -> str:
    """The highest ancestor of ``path`` that holds no other stack and no other map, up to the
    outermost ``boundary`` (transformers model) holding it."""
    limit = min((b for b in boundary if _is_under(path, b)), key=len, default="")
    current = path
    while current != limit:
        parent = _parent(current)
        if not _is_under(parent, limit):
            break
        if any(_is_under(s.anchor, parent) for s in others) or any(_is_under(t, parent) for t in taken):
            break
        current = parent
    return current


def name_root(tree: ModuleTree, root: InferredRoot, vocab_size: Optional[int] = None) -> None:
    """Fill ``root.names``: blocks, their leaves, embeddings (per stack and top)."""
    names: dict[str, str] = {}
    block_spans = []
    for prefix, stack in root.stacks.items():
        pre = f"{prefix}." if prefix else ""
        for i, (block, layout, span) in enumerate(zip(stack.blocks, stack.layouts, stack.spans)):
            if block:  # a block spread over parallel lists has no module of its own
                names.setdefault(block, f"{pre}block.{i}")
            for rel, leaf in layout.names.items():
                names.setdefault(_join(block, rel), f"{pre}block.{i}.{leaf}")
            root.fused |= layout.fused
            block_spans.extend(span)
    outside = [p for p in tree.paths[tree.span(root.path).start:tree.span(root.path).stop]
               if not any(_is_under(p, b) for b in block_spans)]
    if len(root.stacks) == 1:
        emb = _embeddings(tree, outside, root.path, block_spans, vocab_size)
        if emb is not None:
            names.setdefault(emb, "embeddings")
    else:
        anchors = [s.anchor for s in root.stacks.values()]
        for prefix, stack in root.stacks.items():
            own = [p for p in outside if _is_under(p, stack.anchor) and stack.anchor != root.path]
            emb = _embeddings(tree, own, stack.anchor, block_spans, vocab_size)
            if emb is not None:
                names.setdefault(emb, f"{prefix}.embeddings")
        top = [p for p in outside if not any(_is_under(p, a) for a in anchors if a != root.path)]
        emb = _embeddings(tree, top, root.path, block_spans, vocab_size)
        if emb is not None and emb not in names:
            names[emb] = "embeddings"
    root.names = names


def _embeddings(tree: ModuleTree, paths: list[str], root: str, blocks: list[str],
                vocab_size: Optional[int]) -> Optional[str]:
    tables = [p for p in paths if isinstance(tree.modules[p], nn.Embedding)]
    chosen = None
    if tables:
        by_vocab = [p for p in tables if vocab_size and tree.modules[p].num_embeddings == vocab_size]
        chosen = (by_vocab or tables)[0]
    else:
        convs = [p for p in paths if isinstance(tree.modules[p], (nn.Conv1d, nn.Conv2d, nn.Conv3d))]
        if convs:
            chosen = convs[0]
    if chosen is None:
        return None
    # Widen to the embeddings module (BERT's word+position+type+norm) but never to a module
    # that also holds blocks.
    current = chosen
    while current != root:
        parent = _parent(current)
        if not _is_under(parent, root) or parent == root or any(_is_under(b, parent) for b in blocks):
            break
        current = parent
    return current


def plain_heads(tree: ModuleTree, root: InferredRoot) -> tuple[set[str], Optional[str]]:
    """Output heads of a model that is not a transformers model: projections outside the
    blocks defined after the last block; the last one is ``lm_head``."""
    blocks = [b for s in root.stacks.values() for span in s.spans for b in span]
    if not blocks:
        return set(), None
    after = max(tree.end[tree.index[b]] for b in blocks)
    span = tree.span(root.path)
    named = set(root.names)
    heads = [tree.paths[i] for i in tree.projections
             if after <= i < span.stop and tree.paths[i] not in named
             and not any(_is_under(tree.paths[i], b) for b in blocks)]
    return set(heads), (heads[-1] if heads else None)


# --------------------------------------------------------------------------- helpers


def _join(a: str, b: str) -> str:
    return f"{a}.{b}" if a and b else a or b


def _is_under(path: str, root: str) -> bool:
    return root == "" or path == root or path.startswith(root + ".")
