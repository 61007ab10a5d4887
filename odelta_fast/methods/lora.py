"""LoRA: ``W x + s * B A dropout(x)`` on Linear and GPT-2 Conv1D projections.

The delta replaces the target's computation with one ``lora_linear`` op (base matmul plus the
low-rank update), which the fused kernels implement; the backbone's weight is only read.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
from torch import nn

from .. import ops, peft_format, routing
from ..addressing import NOT_A_PROJECTION, OWN_FORWARD, linear_forward_kind, pattern_value, select_modules
from ..checkpoint import CheckpointError
from ..configs import BaseDeltaConfig, positive_int
from ..quantized import is_quantized
from ..delta import DeltaBase, DeltaModule
from ..ops.low_rank import lora_update
from . import moe_lora
from .qlora import QuantizedLoraDelta
from ..projections import is_conv1d, linear_features, linear_types

logger = logging.getLogger("odelta_fast")


def _scaling(r: int, alpha: float, use_rslora: bool) -> float:
    return alpha / (math.sqrt(r) if use_rslora else r)


class LoraDelta(DeltaModule):
    """LoRA on a Linear or GPT-2 Conv1D: replaces the target's computation with one op
    (``lora_linear``, or ``dora_linear`` with a magnitude vector)."""

    route_kind = "replace"
    mergeable = True
    peft_factor_names = ("lora_A.weight", "lora_B.weight")  # PEFT's key suffixes for A and B

    def __init__(
        self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, *,
        use_rslora: bool = False, fan_in_fan_out: bool = False, backend: str = "auto",
        device=None, dtype=None,
    ):
        super().__init__(backend)
        self.r, self.alpha, self.dropout, self.fan_in_fan_out = r, alpha, dropout, fan_in_fan_out
        self.scaling = _scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))
        # Kaiming-uniform A and zero B: a fresh delta is an exact no-op (as in the LoRA paper and PEFT).
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_magnitude_vector: Optional[nn.Parameter] = None
        self.refer("_weight_sq_norm", None)

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def init_dora(self, target: nn.Module) -> None:
        """DoRA's magnitude, initialised to the row norms of ``W + s B A`` (``||W||`` for a fresh
        delta), so attaching it changes nothing."""
        norm = ops.dora_row_norm(self._weight(target), self.lora_A, self.lora_B, self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.dtype))

    def implemented_backends(self):
        return ops.lora.lora_backends()

    def op_call(self, target: nn.Module):
        # DoRA runs lora_linear inside dora_linear: the same decision.
        return "lora_linear", dict(K=self.lora_A.shape[1], N=self.lora_B.shape[0], r=self.r, dropout=self.dropout > 0)

    def _weight(self, target: nn.Module) -> torch.Tensor:
        return target.weight.t() if self.fan_in_fan_out else target.weight

    def _squared_row_norms(self, weight: torch.Tensor) -> torch.Tensor:
        # ||W_n||^2 of the frozen weight, recomputed only when the weight changes (merge, load).
        key = (weight.data_ptr(), weight._version if not weight.is_inference() else None, weight.dtype)
        cached = self._weight_sq_norm
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, weight.float().pow(2).sum(dim=1))
            self.refer("_weight_sq_norm", cached)
        return cached[1]

    @staticmethod
    def _input(args, kwargs) -> torch.Tensor:
        if args:
            return args[0]
        return kwargs["input"] if "input" in kwargs else next(iter(kwargs.values()))

    def _factors(self, dtype):
        a, b = self.lora_A, self.lora_B
        return (a, b) if a.dtype == dtype else (a.to(dtype), b.to(dtype))

    # A bias delta (BitFit) on the same module rides in the fused op's bias epilogue.
    fuses_bias = True

    def replace(self, target, original, args, kwargs, extra_bias=None):
        x = self._input(args, kwargs)
        lora_a, lora_b = self._factors(x.dtype)
        bias = target.bias
        if extra_bias is not None:
            extra_bias = extra_bias.to(x.dtype)
            bias = extra_bias if bias is None else bias + extra_bias
        weight = self._weight(target)
        if self.use_dora:
            return ops.dora_linear(
                x, weight, bias, lora_a, lora_b, self.lora_magnitude_vector, self.scaling, self.dropout,
                training=self.training, backend=self.backend, weight_sq_norm=self._squared_row_norms(weight))
        return ops.lora_linear(
            x, weight, bias, lora_a, lora_b, self.scaling, self.dropout,
            training=self.training, backend=self.backend,
        )

    def parallel(self, target, args, kwargs):
        if self.use_dora:
            raise RuntimeError(f"a DoRA delta rescales its module's whole output, so it cannot be added beside "
                               f"another delta that computes {type(target).__name__}'s output")
        x = self._input(args, kwargs)
        lora_a, lora_b = self._factors(x.dtype)
        return lora_update(x, lora_a, lora_b, self.scaling, self.dropout, training=self.training, backend=self.backend)

    def fold_(self, target: nn.Module, param: torch.Tensor) -> None:
        if self.use_dora:
            ops.dora_merge_(param, self.lora_A, self.lora_B, self.lora_magnitude_vector, self.scaling,
                            fan_in_fan_out=self.fan_in_fan_out)
            return
        ops.lora_merge_(param, self.lora_A, self.lora_B, self.scaling,
                        fan_in_fan_out=self.fan_in_fan_out, backend=self.backend)

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}{dora}"


class _RescaledLoraDelta(DeltaModule):
    """Shared by LoRA on embeddings and convolutions: the low-rank update is added to what the
    module's own forward computes (its padding, scaling, padding mode stay as they are); with
    DoRA the sum is then rescaled per output feature."""

    mergeable = True
    feature_dim = -1  # where the output features are in the module's output
    peft_factor_names = ("lora_A.weight", "lora_B.weight")

    def __init__(self, r: int, alpha: float, dropout: float, *, use_rslora: bool, backend: str):
        super().__init__(backend)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = _scaling(r, alpha, use_rslora)
        self.lora_magnitude_vector: Optional[nn.Parameter] = None

    @property
    def route_kind(self) -> str:  # type: ignore[override]
        # Plain LoRA only adds; DoRA rescales the module's output too, so it runs after it.
        return "sequential" if self.lora_magnitude_vector is not None else "parallel"

    def rows(self, param: torch.Tensor) -> torch.Tensor:
        """``param`` (the target's weight) as ``(out_features, fan_in)`` rows (a view)."""
        raise NotImplementedError

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``A (r, fan_in)``, ``B (out_features, r)`` as matrices (views)."""
        raise NotImplementedError

    def update(self, target: nn.Module, args, kwargs) -> torch.Tensor:
        raise NotImplementedError

    def init_dora(self, target: nn.Module) -> None:
        a, b = self.factors()
        norm = ops.dora_row_norm(self.rows(target.weight), a, b, self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.to(a.dtype))

    def _broadcast(self, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        shape = [1] * like.dim()
        shape[self.feature_dim] = -1
        return vector.to(like.dtype).view(shape)

    def parallel(self, target, args, kwargs):
        return self.update(target, args, kwargs)

    def post(self, target, args, kwargs, output):
        bias = getattr(target, "bias", None)
        a, b = self.factors()
        norm = ops.dora_row_norm(self.rows(target.weight), a, b, self.scaling)
        scale = self.lora_magnitude_vector / norm.to(self.lora_magnitude_vector.dtype)
        base = output if bias is None else output - self._broadcast(bias, output)
        result = (base + self.update(target, args, kwargs)) * self._broadcast(scale, output)
        return result if bias is None else result + self._broadcast(bias, output)

    def fold_(self, target: nn.Module, param: torch.Tensor) -> None:
        a, b = self.factors()
        if self.lora_magnitude_vector is not None:
            ops.dora_merge_(self.rows(param), a, b, self.lora_magnitude_vector, self.scaling)
        else:
            ops.lora_merge_(self.rows(param), a, b, self.scaling, backend="eager")

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}"


class LoraEmbeddingDelta(_RescaledLoraDelta):
    """LoRA on an ``nn.Embedding``: ``W[ids] + s A^T[ids] B^T``, a gather of ``A``'s columns (PEFT's
    ``lora_embedding_A (r, num_embeddings)`` / ``lora_embedding_B (dim, r)``; ``A`` starts at zero)."""

    peft_factor_names = ("lora_embedding_A", "lora_embedding_B")

    def __init__(self, num_embeddings: int, dim: int, r: int, alpha: float, dropout: float, *, use_rslora: bool,
                 backend: str, device=None, dtype=None):
        super().__init__(r, alpha, dropout, use_rslora=use_rslora, backend=backend)
        self.lora_A = nn.Parameter(torch.zeros(r, num_embeddings, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(dim, r, device=device, dtype=dtype))
        nn.init.normal_(self.lora_B)

    def rows(self, param):
        return param.t()  # (num_embeddings, dim) -> rows per embedding feature

    def factors(self):
        return self.lora_A, self.lora_B

    def update(self, target, args, kwargs):
        ids = args[0] if args else next(iter(kwargs.values()))
        out = ops.lora_embedding_update(ids, self.lora_A, self.lora_B, self.scaling, padding_idx=target.padding_idx,
                                        backend=self.backend)
        # Scaled embeddings (Gemma's) multiply their lookup in forward; the update gets the same factor.
        scale = getattr(target, "embed_scale", None)
        if scale is None:
            return out
        return out * (scale.to(out.dtype) if torch.is_tensor(scale) else scale)


class LoraConvDelta(_RescaledLoraDelta):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (PEFT's layout): ``A`` a convolution with the target's
    kernel into ``r`` channels, ``B`` a 1x1 convolution back."""

    feature_dim = 1

    def __init__(self, target: nn.Module, r: int, alpha: float, dropout: float, *, use_rslora: bool, backend: str):
        super().__init__(r, alpha, dropout, use_rslora=use_rslora, backend=backend)
        weight = target.weight
        ones = (1,) * (weight.dim() - 2)
        self.lora_A = nn.Parameter(torch.empty(r, *weight.shape[1:], device=weight.device, dtype=weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, *ones, device=weight.device, dtype=weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def peft_magnitude_shape(self) -> tuple[int, ...]:
        return (1, -1, *([1] * (self.lora_A.dim() - 2)))

    def rows(self, param):
        return param.view(param.shape[0], -1)

    def factors(self):
        return self.lora_A.view(self.r, -1), self.lora_B.view(self.lora_B.shape[0], self.r)

    def update(self, target, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        return ops.lora_conv_update(x, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), self.scaling, self.dropout,
                                    stride=target.stride, padding=target.padding, dilation=target.dilation,
                                    training=self.training, backend=self.backend)


@dataclass
class LoraConfig(BaseDeltaConfig):
    """LoRA: rank ``lora_r``, scaling ``lora_alpha / lora_r`` (rsLoRA: ``/ sqrt(lora_r)``),
    dropout on the input of the low-rank path. ``rank_pattern`` / ``alpha_pattern`` override
    the rank / alpha of modules whose path ends with a match of the regex (PEFT's semantics).
    ``use_dora``: DoRA, a learned magnitude per output feature over the normalised ``W + s B A``."""

    delta_type: ClassVar[str] = "lora"

    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False
    # Parameters targeted by name (PEFT's target_parameters): MoE expert stacks, see methods/moe_lora.py.
    target_parameters: Optional[list[str]] = None

    def validate(self):
        positive_int(self, "lora_r")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern or {}), dict(self.alpha_pattern or {})
        if isinstance(self.target_parameters, str):
            self.target_parameters = [self.target_parameters]
        if self.target_parameters and self.lora_dropout:
            # As in PEFT: the update on a parameter is folded through the layer's own computation
            # (W + s B A), where dropout on the low-rank branch's input has no meaning.
            raise ValueError("lora_dropout must be 0 with target_parameters (PEFT refuses it too)")


class LoraModel(DeltaBase):
    """LoRA on Linear / GPT-2 Conv1D, ``nn.Embedding`` and ``nn.Conv1d`` / ``nn.Conv2d`` modules
    (``use_dora`` for DoRA on any of them). Defaults to the query and value projections
    (``attn.q``, ``attn.v``), or the fused ``attn.qkv`` where the architecture fuses them;
    ``"embeddings"`` names the token embedding of any mapped model."""

    delta_type = "lora"
    config_class = LoraConfig
    default_modified_modules = ["attn.q", "attn.v"]

    def __init__(
        self,
        backbone_model: nn.Module,
        lora_r: int = 8,
        lora_alpha: float = 16,
        lora_dropout: float = 0.0,
        modified_modules: Optional[Sequence[str]] = None,
        exclude_modules: Optional[Sequence[str]] = None,
        unfrozen_modules: Optional[Sequence[str]] = None,
        common_structure: Optional[bool] = None,
        backend: str = "auto",
        interactive_modify: bool = False,
        use_rslora: bool = False,
        rank_pattern: Optional[dict[str, int]] = None,
        alpha_pattern: Optional[dict[str, float]] = None,
        use_dora: bool = False,
        name: Optional[str] = None,
        target_parameters: Optional[Sequence[str]] = None,
    ):
        self.target_types = self.supported_types()
        DeltaBase.__init__(self, backbone_model, LoraConfig.from_arguments(locals()))

    @staticmethod
    def supported_types() -> tuple[type, ...]:
        """Module types LoRA attaches to (resolved on use: GPT-2's Conv1D comes from transformers)."""
        return (*linear_types(), nn.Embedding, nn.Conv1d, nn.Conv2d)

    def select_targets(self):
        # modified_modules=[] with target_parameters: parameters only (PEFT's target_modules=[]).
        modules = self._select_modules() if self.modified_modules or not self.target_parameters else []
        if not self.target_parameters:
            return modules
        params = moe_lora.select_parameter_targets(self.backbone_model, self.target_parameters, self.exclude_modules)
        both = sorted({p for p, _ in modules} & {p for p, _, _ in params})
        if both:
            raise ValueError(f"{both[:5]} selected by modified_modules and by target_parameters; target each once")
        self.__dict__["_parameter_targets"] = {path: names for path, _, names in params}
        return modules + [(path, module) for path, module, _ in params]

    def default_targets(self):
        # q and v where they are separate, the fused projection where they are not; a wrapper
        # holding both kinds of backbone gets each its own.
        return self.present_common_names([*self.default_modified_modules, "attn.qkv"])

    def _select_modules(self):
        # A common name for a container of the token embedding (BERT's ``embeddings`` module holds
        # word, position and type embeddings and a norm) means the token embedding inside it.
        specs = list(self.modified_modules)
        if self.structure.mapped and any(s == "embeddings" or s.endswith(".embeddings") for s in specs):
            for path, common in self.structure.items():
                if common.rsplit(".", 1)[-1] != "embeddings":
                    continue
                module = self.backbone_model.get_submodule(path)
                if not isinstance(module, self.target_types):
                    token = _token_embedding(module)
                    if token is not None:
                        specs = [s for s in specs if s != "embeddings"] + [f"{path}.{token}"]
            if specs != list(self.modified_modules):
                return select_modules(self.backbone_model, specs, self.exclude_modules, structure=self.structure,
                                      common_structure=None if self.common_structure else self.common_structure,
                                      module_types=self.target_types)
        return super().select_targets()

    def build_delta(self, path, target):
        names = self.__dict__.get("_parameter_targets", {}).get(path)
        if names:
            if self.use_dora:
                raise ValueError(f"use_dora on {path}: DoRA is not available for expert parameters (target_parameters)")
            return moe_lora.build_experts_delta(
                path, target, names, lora_r=self.lora_r, lora_alpha=self.lora_alpha, rank_pattern=self.rank_pattern,
                alpha_pattern=self.alpha_pattern, use_rslora=self.use_rslora, backend=self.backend)
        if is_quantized(target):  # bitsandbytes: the base matmul stays theirs, see methods/qlora.py
            if self.use_dora:
                raise ValueError(f"use_dora on {path}: DoRA on a quantized base is not supported here")
            return QuantizedLoraDelta(target, pattern_value(self.rank_pattern, path, self.lora_r),
                                      pattern_value(self.alpha_pattern, path, self.lora_alpha), self.lora_dropout,
                                      use_rslora=self.use_rslora, backend=self.backend)
        rank = pattern_value(self.rank_pattern, path, self.lora_r)
        alpha = pattern_value(self.alpha_pattern, path, self.lora_alpha)
        if isinstance(target, nn.Embedding):
            weight = target.weight
            delta = LoraEmbeddingDelta(target.num_embeddings, target.embedding_dim, rank, alpha, self.lora_dropout,
                                       use_rslora=self.use_rslora, backend=self.backend, device=weight.device,
                                       dtype=weight.dtype)
            if self._shared_elsewhere(target):
                # A tied output head reads the same weight: folding the update in would change the
                # head's outputs too, which the routed delta never does. It keeps running routed.
                delta.mergeable = False
        elif isinstance(target, (nn.Conv1d, nn.Conv2d)):
            if target.groups != 1 or target.padding_mode != "zeros":
                raise ValueError(f"LoRA on {path} ({type(target).__name__}): groups={target.groups}, "
                                 f"padding_mode={target.padding_mode!r}; supported: groups=1 with zero padding")
            delta = LoraConvDelta(target, rank, alpha, self.lora_dropout, use_rslora=self.use_rslora,
                                  backend=self.backend)
        else:
            delta = self._linear_delta(path, target, rank, alpha)
        if self.use_dora:
            if isinstance(delta, LoraDelta) and delta.route_kind == "parallel":
                raise ValueError(f"use_dora on {path} ({type(target).__name__}): DoRA rescales the module's output, "
                                 "which a Linear subclass with a forward of its own computes itself")
            if any(d.route_kind == "replace" for d in routing.routes(target)):
                raise ValueError(f"use_dora on {path}: another delta already computes its output; DoRA must be the "
                                 "first (or only) LoRA on a module")
            delta.init_dora(target)
        return delta

    def _shared_elsewhere(self, target: nn.Module) -> bool:
        weight = target.weight
        return any(m is not target and any(p is weight for p in m.parameters(recurse=False))
                   for m in self.backbone_model.modules())

    def _linear_delta(self, path, target, rank, alpha) -> LoraDelta:
        in_features, out_features = linear_features(target)
        kind = linear_forward_kind(target)
        if kind == NOT_A_PROJECTION:
            raise ValueError(
                f"LoRA cannot modify {path} ({type(target).__name__}): its own forward does not return the projection "
                "of its input (it returns a tuple or reshapes it); leave it out of modified_modules"
            )
        delta = LoraDelta(
            in_features, out_features, rank, alpha, self.lora_dropout,
            use_rslora=self.use_rslora, fan_in_fan_out=is_conv1d(target), backend=self.backend,
            device=target.weight.device, dtype=target.weight.dtype,
        )
        if kind == OWN_FORWARD:
            # The module's own forward runs as it is and the low-rank update is added to its output;
            # folding B A into the weight would pass it through that forward's extra computation.
            delta.route_kind = "parallel"
            delta.mergeable = False
        return delta

    @classmethod
    def from_peft_config(cls, backbone_model: nn.Module, peft_config, **overrides) -> "LoraModel":
        """A fresh LoRA on the modules PEFT's ``get_peft_model(backbone_model, peft_config)`` would
        adapt, with its rank, alpha, dropout, rsLoRA, rank / alpha patterns, modules to save and
        initialisation (``True``: A Kaiming-uniform, B zero; ``"gaussian"``: A normal with std
        ``1/r``; ``False``: B Kaiming-uniform too). ``peft_config`` is a ``peft.LoraConfig`` or its
        dict; PEFT's matching rules are in ``odelta_fast.peft_format``. What PEFT refuses, or what
        plain LoRA on Linear / Conv1D cannot reproduce, raises ``ValueError``."""
        values = peft_format.peft_config_dict(peft_config)
        delta = cls(backbone_model, **{**peft_format.lora_kwargs_from_peft_config(backbone_model, values, cls.supported_types()),
                                        **overrides})
        init = values.get("init_lora_weights", True)
        with torch.no_grad():
            for slot in delta.slots:
                if isinstance(slot.delta, LoraEmbeddingDelta):
                    # PEFT starts an embedding's A at zero for True and "gaussian"; False leaves both normal.
                    if init is False:
                        nn.init.normal_(slot.delta.lora_A)
                elif not hasattr(slot.delta, "lora_B"):
                    continue  # expert stacks (target_parameters) keep PEFT's default initialisation
                elif init == "gaussian":
                    nn.init.normal_(slot.delta.lora_A, std=1 / slot.delta.r)
                elif init is False:
                    nn.init.kaiming_uniform_(slot.delta.lora_B, a=math.sqrt(5))
        return delta

    @classmethod
    def from_peft(cls, path: str, backbone_model: nn.Module, **overrides) -> "LoraModel":
        """Load a LoRA checkpoint saved by PEFT (``adapter_config.json`` + ``adapter_model.safetensors``);
        any mismatch raises ``CheckpointError`` and leaves the backbone as it was."""
        adapter = peft_format.read_peft_adapter(path)
        experts = None
        if adapter.config.get("target_parameters"):
            adapter, experts = moe_lora.split_peft_adapter(adapter, backbone_model)
        try:
            delta = cls(backbone_model, **{**adapter.lora_kwargs, **overrides})
        except ValueError as err:
            raise CheckpointError(f"cannot attach the PEFT adapter in {str(path)!r}: {err}") from None
        tensors = dict(adapter.module_tensors)
        ours = {"A": "lora_A", "B": "lora_B", "magnitude": "lora_magnitude_vector"}
        for slot in delta.slots:
            for which, tensor in adapter.factors.get(slot.path, {}).items():
                tensors[f"{slot.path}.{slot.child_name}.{ours[which]}"] = tensor
            if experts is not None and slot.path in experts.tensors:
                for key, tensor in experts.tensors[slot.path].items():
                    child = slot.delta.child_names.get(key.split(".")[0], key.split(".")[0])
                    tensors[f"{slot.path}.{slot.child_name}.{child}.{key.split('.', 1)[1]}"] = tensor
        expected = sorted(adapter.factors) + (sorted(experts.tensors) if experts is not None else [])
        try:
            delta.load_backbone_tensors(adapter.base_tensors, source=adapter.source)
            delta.load_delta_state_dict(tensors, expected_targets=expected, source=adapter.source)
        except BaseException:
            delta.remove()
            raise
        logger.info("loaded PEFT LoRA adapter from %s into %d modules", path, len(delta.slots))
        return delta

    def save_in_format(self, fmt: str, path: str) -> str:
        if fmt == "peft":
            return peft_format.save_peft(self, path)
        return super().save_in_format(fmt, path)


def _token_embedding(container: nn.Module) -> Optional[str]:
    """The name of the token embedding inside an embeddings container: its largest nn.Embedding."""
    embeddings = [(name, m) for name, m in container.named_modules() if isinstance(m, nn.Embedding)]
    if not embeddings:
        return None
    return max(embeddings, key=lambda item: item[1].num_embeddings)[0]


__all__ = ["LoraConfig", "LoraConvDelta", "LoraDelta", "LoraEmbeddingDelta", "LoraModel"]
