"""Soft prompt tuning (Lester et al., 2021): ``soft_token_num`` learned embeddings in front of
the input.

A ``"pre"`` delta on the model that receives ``input_ids`` (the backbone for decoder-only and
encoder-only models, the encoder for encoder-decoder ones) embeds the ids with the model's own
``get_input_embeddings()``, prepends the prompt and passes ``inputs_embeds`` on; the tensors in
``other_expand_ids`` (attention mask, token types) get ``soft_token_num`` columns of their fill
value, token-level ``labels`` get ``-100`` there, and explicit ``position_ids`` /
``cache_position`` are shifted behind the prompt. The outputs therefore cover
``soft_token_num + L`` positions.

During generation the prompt sits in the KV cache after the first step: later steps (a cache
that already holds tokens) embed nothing and only widen the attention mask the caller grew
from its own ``L`` tokens. For encoder-decoder models a parameter-free ``"pre"`` delta on the
module that calls the encoder (BART's ``BartModel``, T5's ``T5ForConditionalGeneration``)
widens the encoder attention mask the decoder's cross-attention uses; it is what makes
``generate()`` (which runs the encoder once, separately) line up.

Unlike OpenDelta: the prompt is a real ``nn.Parameter`` created on the embedding's device and
dtype, ``inputs_embeds`` given directly are supported (BERT called without ``input_ids``), the
caller's tensors are never modified in place, and no mask is guessed from a pad id (no mask
means every token is attended).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch
from torch import nn

from ..addressing import select_modules
from ..configs import BaseDeltaConfig, positive_int
from ..delta import DeltaBase, DeltaModule
from .kv_cache import cache_length
from .shapes import pretrained_model_type

IGNORE_INDEX = -100


def _param_names(module: nn.Module) -> list[str]:
    params = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def _by_name(names: list[str], args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Every positional argument moved into ``kwargs`` (``model(ids, mask)`` is common)."""
    if not args:
        return args, kwargs
    kwargs = dict(kwargs)
    for name, value in zip(names, args):
        kwargs[name] = value
    return tuple(args[len(names):]), kwargs


def _prepend(tensor: torch.Tensor, n: int, fill) -> torch.Tensor:
    pad = torch.full((tensor.shape[0], n, *tensor.shape[2:]), fill, dtype=tensor.dtype, device=tensor.device)
    return torch.cat([pad, tensor], dim=1)


def _shifted_positions(positions: torch.Tensor, n: int) -> torch.Tensor:
    """Prompt positions ``0..n-1`` in front of the given ones moved ``n`` to the right."""
    head = torch.arange(n, dtype=positions.dtype, device=positions.device)
    if positions.dim() > 1:
        head = head.expand(*positions.shape[:-1], n)
    return torch.cat([head, positions + n], dim=-1)


class SoftPromptDelta(DeltaModule):
    route_kind = "pre"

    def __init__(self, target: nn.Module, embedding: nn.Embedding, soft_token_num: int, *, init_range: float,
                 token_init: bool, other_expand_ids: Mapping[str, Any], backend: str = "auto"):
        super().__init__(backend)
        self.soft_token_num = soft_token_num
        self.other_expand_ids = dict(other_expand_ids)
        self.param_names = _param_names(target)
        # Used only where the target cannot name its embedding itself.
        self.refer("fallback_embedding", embedding)
        weight = embedding.weight
        # Created where the embedding lives, in its dtype (OpenDelta's ``Parameter(...).to(device)``
        # returned a plain tensor on GPU backbones).
        self.soft_embeds = nn.Parameter(torch.empty(soft_token_num, weight.shape[1], device=weight.device, dtype=weight.dtype))
        with torch.no_grad():
            if token_init:
                if soft_token_num > weight.shape[0]:
                    raise ValueError(f"token_init copies the first soft_token_num={soft_token_num} vocabulary "
                                     f"embeddings, but the vocabulary has {weight.shape[0]}; pass token_init=False")
                # Through the module, so scaled embeddings (BART) give what the model itself sees.
                ids = torch.arange(soft_token_num, device=weight.device)
                self.soft_embeds.copy_(embedding(ids).to(weight.dtype))
            else:
                self.soft_embeds.uniform_(-init_range, init_range)

    def implemented_backends(self):
        return ()

    def _embedding(self, module: nn.Module) -> nn.Module:
        getter = getattr(module, "get_input_embeddings", None)
        if getter is not None:
            try:
                found = getter()
            except NotImplementedError:
                found = None
            if found is not None:
                return found
        return self.fallback_embedding

    def pre(self, module, args, kwargs):
        args, kwargs = _by_name(self.param_names, args, kwargs)
        n = self.soft_token_num
        input_ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        current = embeds if embeds is not None else input_ids
        if current is None:
            return args, kwargs  # nothing to prompt; the model raises its own error
        length = current.shape[1]
        past = cache_length(kwargs)
        if past > 0:
            return args, self._continue(kwargs, past, length)
        if embeds is None:
            embeds = self._embedding(module)(input_ids)
        prompt = self.soft_embeds.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        if "input_ids" in kwargs or "input_ids" in self.param_names:
            kwargs["input_ids"] = None
        for key, fill in self.other_expand_ids.items():
            value = kwargs.get(key)
            # Only inputs of the caller's length; one already widened (the encoder of an
            # encoder-decoder model gets the mask from the delta above it) is left alone.
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == length:
                kwargs[key] = _prepend(value, n, fill)
        labels = kwargs.get("labels")
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2 and labels.shape[1] == length:
            kwargs["labels"] = _prepend(labels, n, IGNORE_INDEX)
        for key in ("position_ids", "cache_position"):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.shape[-1] == length:
                kwargs[key] = _shifted_positions(value, n)
        return args, kwargs

    def _continue(self, kwargs: dict, past: int, length: int) -> dict:
        """A step on a cache that already holds the prompt: widen what the caller sized for its
        own tokens only (``generate()`` grows the mask it was given by one per step)."""
        n = self.soft_token_num
        unaware = False
        for key, fill in self.other_expand_ids.items():
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[1] == past + length - n:
                kwargs[key] = _prepend(value, n, fill)
                unaware = True
        if unaware:
            for key in ("position_ids", "cache_position"):
                value = kwargs.get(key)
                if isinstance(value, torch.Tensor):
                    kwargs[key] = value + n
        return kwargs

    def extra_repr(self) -> str:
        return f"soft_token_num={self.soft_token_num}, dim={self.soft_embeds.shape[1]}"


class EncoderMaskDelta(DeltaModule):
    """On the module that runs an encoder-decoder's encoder: widens the encoder attention mask
    (also used by the decoder's cross-attention) to cover the prompt. No parameters."""

    route_kind = "pre"

    def __init__(self, target: nn.Module, soft_token_num: int, fill=1, backend: str = "auto"):
        super().__init__(backend)
        self.soft_token_num = soft_token_num
        self.fill = fill
        self.param_names = _param_names(target)

    def implemented_backends(self):
        return ()

    def pre(self, module, args, kwargs):
        args, kwargs = _by_name(self.param_names, args, kwargs)
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return args, kwargs
        encoded = kwargs.get("encoder_outputs")
        if encoded is not None:
            expected = encoded[0].shape[1] - self.soft_token_num
        else:
            source = kwargs.get("inputs_embeds")
            source = kwargs.get("input_ids") if source is None else source
            if source is None:
                return args, kwargs
            expected = source.shape[1]
        if mask.shape[1] == expected:
            kwargs["attention_mask"] = _prepend(mask, self.soft_token_num, self.fill)
        return args, kwargs


@dataclass
class SoftPromptConfig(BaseDeltaConfig):
    """``soft_token_num`` learned embeddings in front of the input, initialised from the
    vocabulary (``token_init``) or uniformly in ``+-init_range``; ``other_expand_ids`` maps the
    inputs widened with them to their fill value."""

    delta_type: ClassVar[str] = "soft_prompt"

    soft_token_num: int = 100
    init_range: float = 0.5
    token_init: bool = True
    other_expand_ids: dict[str, Any] = field(default_factory=lambda: {"attention_mask": 1, "token_type_ids": 0})

    def validate(self):
        positive_int(self, "soft_token_num")
        if not isinstance(self.other_expand_ids, Mapping):
            raise TypeError(f"other_expand_ids must map input names to fill values, "
                            f"got {type(self.other_expand_ids).__name__}")
        self.other_expand_ids = dict(self.other_expand_ids)
        self.init_range, self.token_init = float(self.init_range), bool(self.token_init)
        if self.backend not in ("auto", "eager"):
            raise ValueError(f"SoftPromptModel runs in plain PyTorch only; backend={self.backend!r} is not available "
                             "(use 'auto' or 'eager')")


class SoftPromptModel(DeltaBase):
    """Soft prompt tuning. By default (``modified_modules=None``) the prompt goes in front of the
    input of the outermost transformers model in the backbone, or of its encoder when it is an
    encoder-decoder; ``modified_modules`` may name that module explicitly (exactly one)."""

    delta_type = "soft_prompt"
    config_class = SoftPromptConfig
    # Empty: the prompt's place is found from the model, not from names, so an architecture
    # without a common-structure map works too (see select_targets).
    default_modified_modules: list[str] = []

    def __init__(
        self,
        backbone_model: nn.Module,
        soft_token_num: int = 100,
        init_range: float = 0.5,
        token_init: bool = True,
        other_expand_ids: Mapping[str, Any] = {"attention_mask": 1, "token_type_ids": 0},  # noqa: B006 - copied
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        name: Optional[str] = None,
    ):
        DeltaBase.__init__(self, backbone_model, SoftPromptConfig.from_arguments(locals()))

    # ------------------------------------------------------------------ construction
    def select_targets(self):
        modules = dict(self.backbone_model.named_modules())
        paths = {id(m): p for p, m in modules.items()}
        pretrained = pretrained_model_type()
        outer = next((m for m in modules.values() if pretrained is not None and isinstance(m, pretrained)), None)
        if self.modified_modules:
            chosen = select_modules(self.backbone_model, self.modified_modules, self.exclude_modules,
                                    structure=self.structure, common_structure=self.common_structure)
            if len(chosen) != 1:
                raise ValueError(f"SoftPromptModel needs exactly one module to prompt; {self.modified_modules} "
                                 f"selects {len(chosen)}: {[p for p, _ in chosen][:5]}")
            main_path, main = chosen[0]
        elif outer is None:
            main_path, main = "", self.backbone_model
        elif getattr(getattr(outer, "config", None), "is_encoder_decoder", False) and hasattr(outer, "get_encoder"):
            main = outer.get_encoder()
            main_path = paths.get(id(main))
            if main_path is None:
                raise ValueError(f"the encoder of {type(outer).__name__} is not a submodule of the backbone")
        else:
            main_path, main = paths[id(outer)], outer
        params = inspect.signature(type(main).forward).parameters
        if "inputs_embeds" not in params and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            raise TypeError(f"SoftPromptModel hands the prompt to the model as inputs_embeds, which "
                            f"{type(main).__name__}.forward does not take; this model is not supported")
        self._embedding = self._find_embedding(main, outer)
        targets = [(main_path, main)]
        self._mask_path = None
        if main_path and self._is_encoder(main, modules):
            self._mask_path = main_path.rsplit(".", 1)[0] if "." in main_path else ""
            targets.append((self._mask_path, modules[self._mask_path]))
        return targets

    @staticmethod
    def _is_encoder(module: nn.Module, modules: dict) -> bool:
        for candidate in modules.values():
            config = getattr(candidate, "config", None)
            if getattr(config, "is_encoder_decoder", False) and hasattr(candidate, "get_encoder"):
                try:
                    if candidate.get_encoder() is module:
                        return True
                except (AttributeError, NotImplementedError):
                    continue
        return False

    def _find_embedding(self, main: nn.Module, outer: Optional[nn.Module]) -> nn.Module:
        for owner in (main, outer, self.backbone_model):
            getter = getattr(owner, "get_input_embeddings", None)
            if getter is None:
                continue
            try:
                found = getter()
            except NotImplementedError:
                continue
            if found is not None and isinstance(getattr(found, "weight", None), torch.Tensor):
                return found
        raise TypeError(f"SoftPromptModel needs the token embedding table of {type(main).__name__}; "
                        "get_input_embeddings() gives no module with a weight (a non-text model?)")

    def build_delta(self, path, target):
        if path == self._mask_path:
            fill = self.other_expand_ids.get("attention_mask", 1)
            return EncoderMaskDelta(target, self.soft_token_num, fill=fill, backend=self.backend)
        return SoftPromptDelta(target, self._embedding, self.soft_token_num, init_range=self.init_range,
                               token_init=self.token_init, other_expand_ids=self.other_expand_ids, backend=self.backend)

    def named_parameters(self):
        # The prompt usually sits on the backbone itself (path ""): no leading dot in its name.
        for slot in self.slots:
            base = f"{slot.path}.{slot.child_name}" if slot.path else slot.child_name
            for name, param in slot.delta.named_parameters():
                yield f"{base}.{name}", param


__all__ = ["EncoderMaskDelta", "SoftPromptConfig", "SoftPromptDelta", "SoftPromptModel"]
