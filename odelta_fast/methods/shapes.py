"""Shapes of target modules, read from their weights (no dummy forward pass)."""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..projections import is_conv1d, linear_features


def hidden_size_of(backbone: nn.Module) -> Optional[int]:
    for module in backbone.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        for key in ("hidden_size", "d_model", "n_embd", "dim", "embed_dim"):
            value = getattr(text_config, key, None)
            if isinstance(value, int):
                return value
    return None


def output_features(module: nn.Module, backbone: Optional[nn.Module] = None) -> int:
    """Width of a module's output hidden states, from its own weights where it has them."""
    if is_conv1d(module) or isinstance(module, nn.Linear):
        return linear_features(module)[1]
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 1:  # RMSNorm and friends
        return weight.shape[0]
    size = hidden_size_of(backbone) if backbone is not None else None
    if size is None:
        raise ValueError(
            f"cannot tell the output width of {type(module).__name__} from its weights or the model config; "
            "target a Linear / LayerNorm module instead"
        )
    return size


def input_features(module: nn.Module, backbone: Optional[nn.Module] = None) -> int:
    if is_conv1d(module) or isinstance(module, nn.Linear):
        return linear_features(module)[0]
    return output_features(module, backbone)


def param_device_dtype(module: nn.Module, backbone: Optional[nn.Module] = None):
    for source in (module, backbone):
        if source is None:
            continue
        for param in source.parameters():
            if param.is_floating_point():
                return param.device, param.dtype
    import torch

    return torch.device("cpu"), torch.get_default_dtype()


def pretrained_model_type() -> Optional[type]:
    """transformers' ``PreTrainedModel`` class, or None where transformers cannot be imported."""
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return PreTrainedModel
