"""Prefix tuning (Li & Liang, 2021): learned key/value prefixes in front of every targeted
self-attention layer.

How the prefix gets in
----------------------
Each targeted attention module is routed with a ``"replace"`` delta that calls the module's own
forward with one argument swapped: its KV cache (``cache``, formerly ``past_key_values``: found by its
annotation, see ``kv_cache``) becomes a small stand-in
(``_PrefixedCache``) whose ``update()`` stores the new keys/values in the real cache (if there is
one) and returns them with the prefix in front. The attention mask gets ``prefix_token_num``
"attend" columns on the left. Every transformers 5.x attention module calls ``cache.update()``
right after projecting (and rotating) the keys and right before the attention function, so:

* the prefix is never rotated by RoPE and never stored in the cache: ``generate()`` with a
  ``DynamicCache`` sees it once per step, the cache length and therefore the positions of the
  real tokens are exactly those of the backbone alone;
* it works for encoders (no cache at all: the stand-in has nothing behind it), decoder-only
  models and the self-attention of encoder-decoder models (the stand-in wraps the
  ``EncoderDecoderCache``'s self-attention half), with eager, SDPA and flash attention
  (4-D additive / boolean masks, 2-D padding masks, or no mask: SDPA's implicit causal mask is
  made explicit because the keys are now longer than the queries);
* under gradient checkpointing the layer's recomputation goes through the same path, so the
  prefix is applied in the recomputed forward too and gradients reach it. A top-level
  pre-filled cache (PEFT's approach) does not survive checkpointing: transformers drops
  the KV cache inside checkpointed layers.

T5 adds a relative position bias to the scores; its bias for the prefix columns is zero (the
prefix has no position) and the bias handed to the next layer stays the un-prefixed one, so
prefixed and plain layers can be mixed.

With ``reparameterize=True`` one MLP (Embedding -> Linear -> Tanh -> Linear) produces all layers'
prefixes. A ``"pre"`` delta on each transformer stack (the nearest ``PreTrainedModel`` around the
targets: the decoder of a decoder-only model, the encoder and the decoder of T5/BART) computes the
rows of its own layers once per call of that stack; the layers read them. Under non-reentrant
checkpointing (the transformers default) the layers' recomputation reads the same values; under
reentrant checkpointing each layer computes its own rows instead, since a shared graph cannot be
backpropagated once per layer.

Limits
------
* Cross-attention is not prefixed (targeting it raises).
* Attention modules must take a KV cache argument and call its ``update()``; DistilBERT, ViT
  and other cache-less attention modules are rejected at construction, naming the class.
* ``flex_attention`` (block masks) is not supported; T5 with a static cache is not supported.
* Returned attention weights (``output_attentions=True``) include the prefix columns.
* Several prefix deltas on one attention module put their prefixes side by side (the first attached
  runs the attention with all of them); another delta that replaces the attention module's forward
  cannot be combined with a prefix.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops, routing
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase, DeltaModule
from .kv_cache import HISTORICAL_CACHE_NAMES, cache_parameter
from .shapes import param_device_dtype, pretrained_model_type

_MASK_ARGS = ("attention_mask", "mask")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim", "head_size")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "kv_heads")
_HEAD_ATTRS = ("num_heads", "num_attention_heads", "n_heads", "n_head")
_KEY_PROJ_NAMES = ("k_proj", "key", "k", "k_lin", "key_proj")


def _find_attr(module: nn.Module, names: Sequence[str], kind=int):
    """First attribute among ``names`` of ``kind`` on the module or its descendants (BERT keeps
    the head geometry on the inner ``BertSelfAttention``)."""
    for sub in module.modules():
        for name in names:
            value = getattr(sub, name, None)
            if isinstance(value, kind) and not isinstance(value, bool):
                return value
    return None


def _first_with(module: nn.Module, name: str) -> Optional[nn.Module]:
    for sub in module.modules():
        if hasattr(sub, name):
            return sub
    return None


def _forward_params(module: nn.Module, what: str) -> list[str]:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        raise TypeError(f"{what}: {type(module).__name__}.forward takes *args; its arguments cannot be located by name")
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _by_name(names: list[str], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move positional arguments after the first (the hidden states) into ``kwargs`` so the cache
    and mask can be swapped whatever the caller's calling convention."""
    if len(args) > 1:
        kwargs = dict(kwargs)
        for name, value in zip(names[1:], args[1:]):
            kwargs[name] = value
        args = args[:1]
    return args, kwargs


class _PrefixedCache:
    """Stands in for one attention layer's KV cache during one call: real keys/values go to the
    real cache; the attention sees them behind the prefix."""

    __slots__ = ("inner", "keys", "values")

    def __init__(self, inner, keys: torch.Tensor, values: torch.Tensor):
        self.inner, self.keys, self.values = inner, keys, values

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if self.inner is not None:
            key_states, value_states = self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)
        batch = key_states.shape[0]
        keys = self.keys.to(device=key_states.device, dtype=key_states.dtype)
        values = self.values.to(device=value_states.device, dtype=value_states.dtype)
        heads = key_states.shape[1]
        if keys.shape[0] != heads:
            # Some models (Falcon's new architecture) repeat the grouped key/value heads before
            # caching; repeat the prefix the same way, keeping one learned prefix per group.
            if heads % keys.shape[0]:
                raise RuntimeError(f"prefix has {keys.shape[0]} key/value heads, the attention {heads}")
            keys = keys.repeat_interleave(heads // keys.shape[0], dim=0)
            values = values.repeat_interleave(heads // values.shape[0], dim=0)
        keys = keys.unsqueeze(0).expand(batch, *keys.shape)
        values = values.unsqueeze(0).expand(batch, *values.shape)
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def get_seq_length(self, layer_idx: int = 0):
        return 0 if self.inner is None else self.inner.get_seq_length(layer_idx)

    def __getattr__(self, name):
        inner = object.__getattribute__(self, "inner")
        if inner is None:
            raise AttributeError(f"prefix cache stand-in has no real cache behind it (asked for {name!r})")
        return getattr(inner, name)


def _pad_left(mask: torch.Tensor, n: int, what: str) -> torch.Tensor:
    if mask.dim() == 4:  # (batch, heads, q, kv): boolean "may attend" or additive float
        pad = (mask.new_ones if mask.dtype == torch.bool else mask.new_zeros)((*mask.shape[:-1], n))
    elif mask.dim() == 2:  # flash attention's (batch, kv) padding mask
        pad = mask.new_ones((mask.shape[0], n))
    else:
        raise NotImplementedError(f"PrefixModel: cannot extend a {mask.dim()}-D attention mask of {what}")
    return torch.cat([pad, mask], dim=-1)


class _PrefixState:
    """What the deltas of one ``PrefixModel`` share: the reparameterisation MLP, the prefixes
    computed for the current call of each stack, and masks already extended in this call (every
    layer of a stack gets the same mask object). Never copied: a deep copy starts empty."""

    def __init__(self):
        self.reparam: Optional["PrefixReparameterization"] = None
        self.values: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.version: Optional[tuple] = None
        self.padded: "OrderedDict[int, tuple]" = OrderedDict()

    def clear(self) -> None:
        self.values.clear()
        self.version = None
        self.padded.clear()

    def padded_left(self, tensor: torch.Tensor, n: int, pad_fn) -> torch.Tensor:
        # Keyed by identity and checked against the version counter (a static buffer updated in
        # place must not hit); holding ``tensor`` keeps its id from being reused. Inference-mode
        # tensors have no version counter, so they are padded every time.
        if tensor.is_inference():
            return pad_fn(tensor, n)
        hit = self.padded.get(id(tensor))
        if hit is not None and hit[0] is tensor and hit[1] == tensor._version and hit[2] == n:
            return hit[3]
        out = pad_fn(tensor, n)
        self.padded[id(tensor)] = (tensor, tensor._version, n, out)
        while len(self.padded) > 4:
            self.padded.popitem(last=False)
        return out

    def __deepcopy__(self, memo):
        import copy

        fresh = _PrefixState()
        fresh.reparam = copy.deepcopy(self.reparam, memo)
        return fresh

    def __getstate__(self):
        return {"reparam": self.reparam}

    def __setstate__(self, state):
        self.__init__()
        self.reparam = state["reparam"]


class PrefixReparameterization(nn.Module):
    """``Embedding(P, embed_dim) -> Linear(embed_dim, mid_dim) -> Tanh -> Linear(mid_dim, rows)``;
    ``rows`` holds every layer's keys then values. A stack computes only its own rows."""

    def __init__(self, prefix_token_num: int, embed_dim: int, mid_dim: int, out_features: int, *, device=None, dtype=None):
        super().__init__()
        self.embedding = nn.Embedding(prefix_token_num, embed_dim, device=device, dtype=dtype)
        self.mid = nn.Linear(embed_dim, mid_dim, device=device, dtype=dtype)
        self.out = nn.Linear(mid_dim, out_features, device=device, dtype=dtype)

    def forward(self, start: int = 0, end: Optional[int] = None) -> torch.Tensor:
        # The embedding table is exactly the lookup of ids 0..P-1, without building the id tensor.
        return ops.prefix_mlp(self.embedding.weight, self.mid.weight, self.mid.bias,
                              self.out.weight[start:end], self.out.bias[start:end])

    def version(self) -> tuple:
        return tuple((p.data_ptr(), None if p.is_inference() else p._version) for p in self.parameters())


class _Layout:
    """Where one layer's prefix lives in the MLP output and how to reshape it."""

    __slots__ = ("index", "row", "kv_heads", "head_dim")

    def __init__(self, index: int, row: int, kv_heads: int, head_dim: int):
        self.index, self.row, self.kv_heads, self.head_dim = index, row, kv_heads, head_dim

    @property
    def width(self) -> int:
        return 2 * self.kv_heads * self.head_dim

    def split(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P, 2*kv*d)`` -> keys, values of shape ``(kv_heads, P, head_dim)``."""
        kv = block.view(block.shape[0], 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]


class PrefixDelta(DeltaModule):
    """The prefix of one attention module."""

    route_kind = "replace"

    def __init__(self, target: nn.Module, path: str, layout: _Layout, prefix_token_num: int, *,
                 reparameterized: bool, state: _PrefixState, checkpoint_layers: list, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__(backend)
        self.prefix_token_num = prefix_token_num
        self.layout = layout
        self.reparameterized = reparameterized
        self.state = state
        self.checkpoint_layers = checkpoint_layers  # a plain list: these modules are not children
        self.target_name = f"{type(target).__name__} at {path!r}"
        names = _forward_params(target, f"PrefixModel on {self.target_name}")
        self.param_names = names
        self.cache_arg = cache_parameter(target)
        self.mask_arg = next((n for n in _MASK_ARGS if n in names), None)
        self.refer("core", _first_with(target, "layer_idx") or target)
        self.refer("causal_source", _first_with(target, "is_causal"))
        self.refer("config_source", _first_with(target, "config"))
        # T5-style relative position bias: computed here so the prefix columns get a zero bias.
        self.position_bias = "position_bias" in names and hasattr(target, "compute_bias")
        if self.position_bias:
            bias_params = inspect.signature(target.compute_bias).parameters
            self.bias_past_arg = "past_seen_tokens" if "past_seen_tokens" in bias_params else (
                "cache_position" if "cache_position" in bias_params else None)
        if not reparameterized:
            shape = (layout.kv_heads, prefix_token_num, layout.head_dim)
            self.prefix_keys = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
            self.prefix_values = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))

    def implemented_backends(self):
        return ()

    # ------------------------------------------------------------------ prefix values
    def _reentrant_checkpointing(self) -> bool:
        for layer in self.checkpoint_layers:
            if getattr(layer, "gradient_checkpointing", False) and layer.training:
                func = getattr(layer, "_gradient_checkpointing_func", None)
                if (getattr(func, "keywords", None) or {}).get("use_reentrant") is not False:
                    return True
        return False

    def absorbs(self, other) -> bool:
        return isinstance(other, PrefixDelta)

    def prefixes_on(self, target: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of every active prefix delta on ``target``, side by side in
        attach order: (kv_heads, total prefix length, head_dim)."""
        peers = [d for d in routing.routes(target) if isinstance(d, PrefixDelta) and d.route_active]
        if len(peers) == 1:
            return self.prefix()
        pairs = [peer.prefix() for peer in peers]
        shapes = {(k.shape[0], k.shape[-1]) for k, _ in pairs}
        if len(shapes) > 1:
            raise RuntimeError(f"the prefix deltas on {self.target_name} disagree on (key/value heads, head size): "
                               f"{sorted(shapes)}")
        return torch.cat([k for k, _ in pairs], dim=-2), torch.cat([v for _, v in pairs], dim=-2)

    def prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.reparameterized:
            return self.prefix_keys, self.prefix_values
        state, reparam = self.state, self.state.reparam
        # Reentrant checkpointing backpropagates each layer separately; a graph shared by all
        # layers could only be walked once, so each layer builds its own.
        if not self._reentrant_checkpointing():
            cached = state.values.get(self.layout.index)
            if cached is not None and state.version == reparam.version():
                return cached
        layout = self.layout
        return layout.split(reparam(layout.row, layout.row + layout.width))

    # ------------------------------------------------------------------ routing
    def replace(self, target, original, args, kwargs):
        args, kwargs = _by_name(self.param_names, args, kwargs)
        if kwargs.get("key_value_states") is not None or (
                kwargs.get("encoder_hidden_states") is not None and getattr(target, "is_cross_attention", False)):
            raise NotImplementedError(f"PrefixModel prefixes self-attention only; {self.target_name} was called as cross-attention")
        hidden = args[0] if args else kwargs[self.param_names[0]]
        q_len = hidden.shape[1]
        cache = kwargs.get(self.cache_arg)
        if cache is None:
            # A caller still using a former name of the argument (the forward's deprecation shim
            # renames it): take the cache from there, or the call would carry it twice.
            for alias in HISTORICAL_CACHE_NAMES:
                if alias != self.cache_arg and alias not in self.param_names and alias in kwargs:
                    cache = kwargs.pop(alias)
                    break
        inner = getattr(cache, "self_attention_cache", cache) if hasattr(cache, "cross_attention_cache") else cache
        state = self.state
        keys, values = self.prefixes_on(target)
        n = keys.shape[-2]
        kwargs[self.cache_arg] = _PrefixedCache(inner, keys, values)

        if self.mask_arg is not None:
            mask = kwargs.get(self.mask_arg)
            if mask is None:
                mask = self._implicit_mask(kwargs, inner, q_len, hidden.device, n)
            elif not isinstance(mask, torch.Tensor):
                raise NotImplementedError(
                    f"PrefixModel cannot extend a {type(mask).__name__} attention mask ({self.target_name}); "
                    "use attn_implementation='eager', 'sdpa' or a flash attention")
            else:
                mask = state.padded_left(mask, n, lambda m, k: _pad_left(m, k, self.target_name))
            kwargs[self.mask_arg] = mask

        unprefixed_bias = None
        if self.position_bias:
            unprefixed_bias = kwargs.get("position_bias")
            if unprefixed_bias is None:
                unprefixed_bias = self._relative_bias(target, inner, q_len, hidden)
            kwargs["position_bias"] = state.padded_left(
                unprefixed_bias, n, lambda b, k: torch.cat([b.new_zeros((*b.shape[:-1], k)), b], dim=-1))

        output = original(*args, **kwargs)
        if self.position_bias and isinstance(output, tuple) and len(output) > 1:
            # The next layer may be unprefixed: it gets the bias of the real keys only.
            output = (output[0], unprefixed_bias) + tuple(output[2:])
        return output

    def _implicit_mask(self, kwargs, inner, q_len: int, device, n: int) -> Optional[torch.Tensor]:
        config = getattr(self.config_source, "config", None)
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if "flex" in impl:
            raise NotImplementedError(f"PrefixModel does not support attn_implementation={impl!r} ({self.target_name})")
        causal = kwargs.get("is_causal")
        if causal is None:
            causal = getattr(self.causal_source, "is_causal", True)
        # Eager treats "no mask" as "attend everywhere", flash aligns its causal mask to the end of
        # the keys; both stay right with the prefix in front. SDPA's implicit causal mask is
        # aligned to the start, so it is spelled out.
        if impl == "eager" or "flash" in impl or not causal or q_len == 1:
            return None
        past = inner.get_seq_length(self._layer_idx()) if inner is not None else 0
        past = int(past)
        rows = torch.arange(q_len, device=device).unsqueeze(1) + past
        cols = torch.arange(past + q_len, device=device).unsqueeze(0)
        real = cols <= rows
        prefix = torch.ones((q_len, n), dtype=torch.bool, device=device)
        return torch.cat([prefix, real], dim=-1)[None, None]

    def _layer_idx(self) -> int:
        idx = getattr(self.core, "layer_idx", None)
        return 0 if idx is None else idx

    def _relative_bias(self, target, inner, q_len: int, hidden: torch.Tensor) -> torch.Tensor:
        if inner is not None and getattr(inner, "is_compileable", False):
            raise NotImplementedError(f"PrefixModel on {self.target_name} supports dynamic caches only, not static ones")
        past = int(inner.get_seq_length(self._layer_idx())) if inner is not None else 0
        kv_len = past + q_len
        if not getattr(target, "has_relative_attention_bias", False):
            heads = _find_attr(target, _HEAD_ATTRS)
            return torch.zeros((1, heads, q_len, kv_len), device=hidden.device, dtype=hidden.dtype)
        if self.bias_past_arg == "past_seen_tokens":
            return target.compute_bias(q_len, kv_len, device=hidden.device, past_seen_tokens=past)
        if self.bias_past_arg == "cache_position":
            positions = torch.arange(past, kv_len, device=hidden.device)
            return target.compute_bias(q_len, kv_len, device=hidden.device, cache_position=positions)
        return target.compute_bias(q_len, kv_len, device=hidden.device)[:, :, -q_len:, :]

    def parallel(self, target, args, kwargs):
        raise RuntimeError(
            f"PrefixModel and another delta both replace the forward of {self.target_name}; "
            "only one of them can; attach the prefix to other modules or remove the other delta")

    def extra_repr(self) -> str:
        layout = self.layout
        kind = "reparameterized" if self.reparameterized else "direct"
        return f"prefix_token_num={self.prefix_token_num}, kv_heads={layout.kv_heads}, head_dim={layout.head_dim}, {kind}"


class PrefixStackDelta(DeltaModule):
    """Computes, once per call of a transformer stack, the prefixes of its layers."""

    route_kind = "pre"

    def __init__(self, layouts: list[_Layout], state: _PrefixState, *, owns_reparam: bool, backend: str = "auto"):
        super().__init__(backend)
        self.layouts = layouts
        self.state = state
        self.start = min(l.row for l in layouts)
        self.end = max(l.row + l.width for l in layouts)
        if owns_reparam:
            # Registered once, here, so the MLP has one name in state dicts and checkpoints.
            self.reparam = state.reparam

    def implemented_backends(self):
        return ()

    def pre(self, module, args, kwargs):
        state, reparam = self.state, self.state.reparam
        block = reparam(self.start, self.end)
        for layout in self.layouts:
            offset = layout.row - self.start
            state.values[layout.index] = layout.split(block[:, offset:offset + layout.width])
        state.version = reparam.version()
        return args, kwargs

    def extra_repr(self) -> str:
        return f"layers={len(self.layouts)}, rows={self.start}:{self.end}"


@dataclass
class PrefixConfig(BaseDeltaConfig):
    """``prefix_token_num`` learned key/value positions per layer; with ``reparameterize`` they
    come from an ``embed_dim`` -> ``mid_dim`` MLP shared by all layers (OpenDelta's names)."""

    delta_type: ClassVar[str] = "prefix"

    prefix_token_num: int = 6
    reparameterize: bool = True
    embed_dim: int = 512
    mid_dim: int = 512

    def validate(self):
        positive_int(self, "prefix_token_num", "embed_dim", "mid_dim")
        self.reparameterize = bool(self.reparameterize)
        if self.backend not in ("auto", "eager"):
            raise ValueError(f"PrefixModel runs in plain PyTorch only; backend={self.backend!r} is not available "
                             "(use 'auto' or 'eager')")


class PrefixModel(DeltaBase):
    """Prefix tuning on self-attention modules (common name ``attn``); see the module docstring
    for how the prefix is applied and which architectures work."""

    delta_type = "prefix"
    config_class = PrefixConfig
    default_modified_modules = ["attn"]

    def __init__(
        self,
        backbone_model: nn.Module,
        prefix_token_num: int = 6,
        reparameterize: bool = True,
        embed_dim: int = 512,
        mid_dim: int = 512,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        name: Optional[str] = None,
    ):
        self._state = _PrefixState()  # shared by the layers' deltas, built while targets are selected
        DeltaBase.__init__(self, backbone_model, PrefixConfig.from_arguments(locals()))

    # ------------------------------------------------------------------ construction
    def select_targets(self):
        attention = super().select_targets()
        self._layouts: dict[str, _Layout] = {}
        self._stacks: dict[str, list[_Layout]] = {}
        row = 0
        for index, (path, module) in enumerate(attention):
            self._check_target(path, module)
            kv_heads, head_dim = self._geometry(path, module)
            layout = _Layout(index, row, kv_heads, head_dim)
            row += layout.width
            self._layouts[path] = layout
            self._stacks.setdefault(self._stack_of(path), []).append(layout)
        if not self.reparameterize:
            self._stacks = {}
            return attention
        device, dtype = param_device_dtype(attention[0][1], self.backbone_model)
        self._state.reparam = PrefixReparameterization(
            self.prefix_token_num, self.embed_dim, self.mid_dim, row, device=device, dtype=dtype)
        modules = dict(self.backbone_model.named_modules())
        return attention + [(path, modules[path]) for path in self._stacks]

    def _check_target(self, path: str, module: nn.Module) -> None:
        where = f"{type(module).__name__} at {path!r}"
        # Another prefix delta there is fine: the prefixes go side by side into one attention call.
        taken = [d for d in routing.routes(module) if d.route_kind == "replace" and not isinstance(d, PrefixDelta)]
        if taken:
            raise ValueError(f"{where} already carries a delta that replaces its forward ({type(taken[0]).__name__}); "
                             "PrefixModel cannot share it")
        common = self.structure.common_name(path) if self.structure.mapped else None
        if getattr(module, "is_cross_attention", False) or (common and "crossattn" in common.split(".")[-1]):
            raise ValueError(f"PrefixModel prefixes self-attention only; {where} is a cross-attention module")
        try:
            names = _forward_params(module, f"PrefixModel on {where}")
        except (TypeError, ValueError) as err:
            raise TypeError(str(err)) from None
        config = getattr(_first_with(module, "config"), "config", None)
        if "alibi" in names and getattr(config, "alibi", True):
            raise TypeError(
                f"PrefixModel does not support {where}: its ALiBi bias is sized to the real keys, "
                "so prefix keys cannot be added in front")
        if cache_parameter(module) is None:
            raise TypeError(
                f"PrefixModel works on attention modules whose forward takes a KV cache (a parameter annotated "
                f"as a transformers Cache, or named {' / '.join(HISTORICAL_CACHE_NAMES)}); "
                f"{where} takes none, so this architecture (or this module) is not supported by PrefixModel")

    @staticmethod
    def _geometry(path: str, module: nn.Module) -> tuple[int, int]:
        head_dim = _find_attr(module, _HEAD_DIM_ATTRS)
        if head_dim is None:
            raise TypeError(f"PrefixModel cannot find the head size of {type(module).__name__} at {path!r} "
                            f"(looked for {', '.join(_HEAD_DIM_ATTRS)})")
        kv_width = None
        for sub_path, sub in module.named_modules():
            if sub_path and sub_path.rsplit(".", 1)[-1] in _KEY_PROJ_NAMES and isinstance(sub, nn.Linear):
                kv_width = sub.out_features
                break
        if kv_width is not None and kv_width % head_dim == 0:
            return kv_width // head_dim, head_dim
        heads = _find_attr(module, _KV_HEAD_ATTRS) or _find_attr(module, _HEAD_ATTRS)
        if heads is None:
            config = getattr(_first_with(module, "config"), "config", None)
            heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int):
            raise TypeError(f"PrefixModel cannot find the number of key/value heads of {type(module).__name__} at {path!r}")
        return heads, head_dim

    def _stack_of(self, path: str) -> str:
        """The nearest transformers model around ``path`` (a decoder, an encoder): the module whose
        one call covers a forward pass of these layers."""
        pretrained = pretrained_model_type()
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            candidate = ".".join(parts[:cut])
            if pretrained is not None and isinstance(self.backbone_model.get_submodule(candidate), pretrained):
                return candidate
        return ""

    def _checkpoint_layers(self, path: str) -> list[nn.Module]:
        parts = path.split(".")
        found = []
        for cut in range(len(parts) - 1, -1, -1):
            module = self.backbone_model.get_submodule(".".join(parts[:cut]))
            if hasattr(module, "gradient_checkpointing"):
                found.append(module)
        return found

    def build_delta(self, path, target):
        if path in self._layouts:
            device, dtype = param_device_dtype(target, self.backbone_model)
            return PrefixDelta(
                target, path, self._layouts[path], self.prefix_token_num, reparameterized=self.reparameterize,
                state=self._state, checkpoint_layers=self._checkpoint_layers(path), backend=self.backend,
                device=device, dtype=dtype,
            )
        owner = next(iter(self._stacks)) == path
        return PrefixStackDelta(self._stacks[path], self._state, owns_reparam=owner, backend=self.backend)

    # ------------------------------------------------------------------ lifecycle
    def named_parameters(self):
        # A stack can be the backbone itself (path ""): no leading dot in the names.
        for slot in self.slots:
            base = f"{slot.path}.{slot.child_name}" if slot.path else slot.child_name
            for name, param in slot.delta.named_parameters():
                yield f"{base}.{name}", param

    def detach(self):
        super().detach()
        self._state.clear()
        return self

    def attach(self):
        self._state.clear()
        return super().attach()


__all__ = ["PrefixConfig", "PrefixDelta", "PrefixModel", "PrefixReparameterization", "PrefixStackDelta"]
