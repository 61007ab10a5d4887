"""Tiny random models of any transformers model type, built from its config class alone.

``build(model_type)`` takes the config class's defaults, shrinks every size it recognises
(widths, depths, heads, experts, vocabulary), builds the base model (``AutoModel``) with eager
attention, and synthesises inputs its forward accepts. No hub access, no weights: every tensor
is random, so a build costs milliseconds to a second.

Every weight gets a little noise on top of its init (zero-initialised gates would otherwise cut
whole sub-layers off the output). A type is built when its forward runs on the synthesised
inputs, repeats itself, and trains without any delta (finite gradients). One that still comes
out large (a size field this shrinker does not know), needs inputs it cannot synthesise or fails
those checks is reported with the reason rather than built at full size.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

HIDDEN = 64
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
FFN = 128
LAYERS = 2
EXPERTS = 4
EXPERT_FFN = 32
VOCAB = 256
BATCH = 2
SEQ = 8
WEIGHT_NOISE = 0.02
MAX_IMAGE = 64
MAX_PARAMETERS = 20_000_000  # above this a size field was missed: report instead of building

_DEPTH = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers", "decoder_layers",
          "num_decoder_layers", "num_encoder_layers", "depth", "num_blocks", "text_layers", "vision_layers",
          "num_text_layers", "num_vision_layers", "layers", "num_hidden_blocks")
_WIDTH = ("hidden_size", "d_model", "n_embd", "embed_dim", "emb_dim", "model_dim", "dim", "text_hidden_size",
          "vision_hidden_size", "word_embed_proj_dim", "embedding_size", "projection_dim", "out_hidden_size",
          "encoder_hidden_size", "decoder_hidden_size", "output_hidden_size", "hidden_size_global",
          "projector_hidden_size", "audio_hidden_size")
_FFN = ("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim", "n_inner", "ffn_hidden_size",
        "intermediate_size_mlp", "mlp_dim", "d_inner", "decoder_intermediate_size", "dim_feedforward",
        "encoder_feedforward_dim", "dense_intermediate_size", "projection_intermediate_size",
        "encoder_linear_units", "decoder_linear_units", "hidden_dim")
_EXPERT_FFN = ("moe_intermediate_size", "shared_expert_intermediate_size", "shared_intermediate_size",
               "moe_hidden_size", "shared_experts_intermediate_size", "expert_intermediate_size")
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "num_routed_experts")
_HEADS = ("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads", "decoder_attention_heads",
          "num_heads", "attention_heads", "swa_num_attention_heads", "index_n_heads", "linear_num_heads")
_KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num", "num_key_value_groups",
             "linear_num_key_heads", "linear_num_value_heads")
_HEAD_DIM = ("head_dim", "d_kv", "dim_head", "d_head", "kv_channels", "attention_head_dim", "swa_head_dim",
             "index_head_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_head_dim", "v_head_dim",
             "qk_nope_head_dim", "mamba_d_head", "resampler_head_dim")
_SMALL = {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "num_experts_per_tok": 2, "top_k": 2,
          "moe_topk": 2, "n_group": 1, "topk_group": 1, "index_topk": 4, "first_k_dense_replace": 1,
          "num_shared_experts": 1, "n_shared_experts": 1, "mamba_n_heads": 4, "mamba_d_state": 16,
          "mamba_dt_rank": 8, "time_step_rank": 8, "mamba_chunk_size": 16, "chunk_size": 16,
          "attention_chunk_size": 8, "num_query_tokens": 4, "latent_query_num": 4, "resampler_n_latents": 4,
          "mm_tokens_per_image": 4, "image_seq_length": 4, "num_image_tokens": 4, "max_window_layers": LAYERS,
          "laurel_rank": 8, "hidden_size_per_layer_input": 8, "altup_num_inputs": 2, "relative_attention_num_buckets": 8,
          "hc_sinkhorn_iters": 2, "rotary_dim": 8, "moe_k": 2, "num_experts_per_token": 2,
          "attention_hidden_size": HIDDEN}
# Types whose layer pattern needs more than two layers to contain every kind of block.
_TYPE_OVERRIDES: dict[str, dict[str, Any]] = {
    "jamba": dict(num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                  expert_layer_offset=1),
}


@dataclass
class Built:
    model_type: str
    model: nn.Module
    inputs: dict[str, torch.Tensor]
    config: Any


class NotBuildable(Exception):
    """The type cannot be built tiny here; the message says why."""


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _pow2_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1)


def _shrink_dict(d: dict, *, special_ids: dict[int, int]) -> dict:
    """A shrunk copy of one (sub-)config dict."""
    d = dict(d)
    depth_before = {k: d[k] for k in _DEPTH if _is_int(d.get(k))}
    heads_before = next((d[k] for k in _HEADS if _is_int(d.get(k))), None)
    old_depth = max(depth_before.values(), default=0)
    picked = _picked_layers(d, old_depth)
    for key in _DEPTH:
        if _is_int(d.get(key)) and d[key] > LAYERS:
            d[key] = len(picked) if d[key] == old_depth else LAYERS
        elif isinstance(d.get(key), list) and d[key] and all(_is_int(v) for v in d[key]):
            d[key] = [min(v, LAYERS) for v in d[key]]  # per-stage depths (Swin): keep the stages
    if isinstance(d.get("depths"), list) and all(_is_int(v) for v in d["depths"]):
        d["depths"] = [min(v, LAYERS) for v in d["depths"]]
    for key in _WIDTH:
        if _is_int(d.get(key)) and d[key] > HIDDEN:
            d[key] = HIDDEN
        elif isinstance(d.get(key), list) and d[key] and all(_is_int(v) for v in d[key]):
            first = d[key][0]  # per-stage widths keep their ratios
            d[key] = [max(8, v * HIDDEN // first) if first > HIDDEN else v for v in d[key]]
    for key in _FFN:
        if _is_int(d.get(key)) and d[key] > FFN:
            d[key] = FFN
    for key in _EXPERT_FFN:
        if _is_int(d.get(key)) and d[key] > EXPERT_FFN:
            d[key] = EXPERT_FFN
    for key in _EXPERTS:
        if _is_int(d.get(key)) and d[key] > EXPERTS:
            d[key] = EXPERTS
    for key in _HEADS:
        if _is_int(d.get(key)) and d[key] > HEADS:
            d[key] = HEADS
        elif isinstance(d.get(key), list) and d[key] and all(_is_int(v) for v in d[key]):
            d[key] = [_pow2_floor(min(v, HEADS)) for v in d[key]]
    for key in _KV_HEADS:
        if _is_int(d.get(key)):
            d[key] = HEADS if heads_before is not None and d[key] >= heads_before else min(d[key], KV_HEADS)
    for key in _HEAD_DIM:
        if _is_int(d.get(key)) and d[key] > HEAD_DIM:
            d[key] = HEAD_DIM
    for key, value in _SMALL.items():
        if _is_int(d.get(key)) and d[key] > value:
            d[key] = value
    if _is_int(d.get("qk_nope_head_dim")) and _is_int(d.get("qk_rope_head_dim")):
        # Multi-head latent attention: rotary runs on the rope part only (head_dim is its width).
        if "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_nope_head_dim"] + d["qk_rope_head_dim"]
        if _is_int(d.get("head_dim")):
            d["head_dim"] = d["qk_rope_head_dim"]
    head_dim = d["head_dim"] if _is_int(d.get("head_dim")) else HEAD_DIM
    rope = d.get("rope_parameters")
    multimodal_rope = re.search(r"(vl|omni|ocr|image|video|glm4v|glm46v)", str(d.get("model_type", "")))
    if isinstance(rope, dict) and ("mrope_section" in rope or multimodal_rope):
        # multimodal rotary sections default to a full-size head; give them the tiny one
        d["rope_parameters"] = {**rope, "mrope_section": _split(head_dim // 2, len(rope.get("mrope_section") or [0] * 3))}
    if _is_int(d.get("vocab_size")) and d["vocab_size"] > VOCAB:
        d["vocab_size"] = VOCAB
    if _is_int(d.get("image_size")) and d["image_size"] > MAX_IMAGE:
        d["image_size"] = MAX_IMAGE  # thousands of patches make attention slow, not different
    if "n_routed_experts" in d and d.get("num_experts_per_tok") is None:
        d["num_experts_per_tok"] = 2
    for key, value in list(d.items()):
        if _is_int(value) and value in special_ids and _is_token_key(key):
            d[key] = special_ids[value]
        elif isinstance(value, list) and _is_token_key(key) and all(_is_int(v) for v in value):
            d[key] = [special_ids.get(v, v) for v in value]
    if old_depth > LAYERS:  # per-layer settings follow the layers kept
        for key, value in list(d.items()):
            if isinstance(value, list) and len(value) == old_depth and key not in _DEPTH:
                d[key] = [value[i] for i in picked]
        if isinstance(d.get("mlp_only_layers"), list):
            d["mlp_only_layers"] = [picked.index(i) for i in d["mlp_only_layers"] if i in picked]
        if isinstance(d.get("per_layer_config"), dict):
            old = {int(k): v for k, v in d["per_layer_config"].items()}
            d["per_layer_config"] = {str(new): _shrink_dict(old[i], special_ids=special_ids)
                                     for new, i in enumerate(picked) if i in old}
    for key in ("stage_names", "out_features", "out_indices"):
        d.pop(key, None)  # recomputed from the new depth
    return d


def _split(total: int, parts: int) -> list[int]:
    base = [total // parts] * parts
    base[-1] += total - sum(base)
    return base


def _picked_layers(d: dict, old_depth: int) -> list[int]:
    """Which of the ``old_depth`` layers a tiny model keeps: the first ``LAYERS``, or the first
    layer of each kind where layers differ (sliding / full attention, linear attention, ...)."""
    if old_depth <= LAYERS:
        return list(range(old_depth))
    for key in ("layer_types", "attention_types", "block_types", "mixer_types", "hybrid_layer_types"):
        values = d.get(key)
        if isinstance(values, list) and len(values) == old_depth:
            kinds = list(dict.fromkeys(map(repr, values)))
            if len(kinds) > 1:
                firsts = sorted(next(i for i, v in enumerate(values) if repr(v) == kind) for kind in kinds[:4])
                return firsts if len(firsts) >= LAYERS else sorted(set(firsts) | set(range(LAYERS)))
    return list(range(LAYERS))


_TOKEN_KEY = re.compile(r".*(_token_id|_token_index|_token_ids|_id|_index)$")


def _is_token_key(key: str) -> bool:
    return bool(_TOKEN_KEY.match(key)) and not key.startswith(("vision_feature", "text_feature")) and "layer" not in key


def _collect_special_ids(d: dict, found: set[int]) -> None:
    for key, value in d.items():
        if isinstance(value, dict):
            _collect_special_ids(value, found)
        elif _is_int(value) and _is_token_key(key) and value >= VOCAB - 64:
            found.add(value)
        elif isinstance(value, list) and _is_token_key(key):
            found.update(v for v in value if _is_int(v) and v >= VOCAB - 64)


def _shrink_tree(d: dict, special_ids: dict[int, int]) -> dict:
    out = _shrink_dict(d, special_ids=special_ids)
    for key, value in list(out.items()):
        if isinstance(value, dict) and ("model_type" in value or key.endswith("_config") or key in (
                "encoder", "decoder", "text_encoder", "vision_encoder")):
            out[key] = _shrink_tree(value, special_ids)
    return out


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING

    config_cls = CONFIG_MAPPING[model_type]
    default = config_cls()
    d = default.to_dict()
    found: set[int] = set()
    _collect_special_ids(d, found)
    # Special token ids move to the top of a small vocabulary, distinct from the ids inputs use.
    special_ids = {old: VOCAB - 1 - i for i, old in enumerate(sorted(found))}
    d = _shrink_tree(d, special_ids)
    d.update(_TYPE_OVERRIDES.get(model_type, {}))
    for key in ("model_type", "transformers_version", "architectures"):
        d.pop(key, None)
    try:
        return config_cls(**d)
    except Exception as err:
        raise NotBuildable(f"config rejects the tiny sizes: {_one_line(err)}") from None


def _one_line(err: BaseException, limit: int = 160) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    text = re.sub(r"(?<![\w.])/(?:[\w.+-]+/)+", "", text)  # file paths of this machine: keep the file name
    return text if len(text) <= limit else text[: limit - 3] + "..."


def model_class(config):
    from transformers import AutoModel

    mapping = AutoModel._model_mapping
    try:
        return mapping[type(config)]
    except KeyError:
        raise NotBuildable(f"no AutoModel class for {type(config).__name__}") from None


def _count_meta_parameters(cls, config) -> int:
    with torch.device("meta"):
        model = cls(config)
    return sum(p.numel() for p in model.parameters())


def build(model_type: str, seed: int = 0) -> Built:
    """A tiny random base model of ``model_type`` in eval mode, with inputs its forward runs on.
    Raises ``NotBuildable`` with the reason when that is not possible here."""
    config = tiny_config(model_type)
    try:
        config._attn_implementation = "eager"
    except Exception:
        pass
    cls = model_class(config)
    try:
        n_params = _count_meta_parameters(cls, config)
    except Exception as err:
        raise NotBuildable(f"model __init__ fails at tiny sizes: {_one_line(err)}") from None
    if n_params > MAX_PARAMETERS:
        raise NotBuildable(f"still {n_params / 1e6:.0f}M parameters after shrinking (a size field this "
                           "shrinker does not know)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = cls(config)
        except Exception as err:
            raise NotBuildable(f"model __init__ fails at tiny sizes: {_one_line(err)}") from None
        model = model.float().eval()
        # Some inits zero a gate or a residual scale, which cuts whole sub-layers off the output
        # until the first update; a little noise on every weight makes every path count.
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point():
                    param.add_(torch.randn_like(param), alpha=WEIGHT_NOISE)
    inputs = runnable_inputs(model, config, seed)
    _check_backward(model, inputs)
    return Built(model_type, model, inputs, config)


def _check_backward(model: nn.Module, inputs: dict) -> None:
    """A model that cannot be trained without any delta (in-place state updates in eval mode,
    non-finite gradients) or whose outputs do not repeat says nothing about deltas: it is not
    counted as built."""
    outputs = []
    try:
        for _ in range(2):
            torch.manual_seed(0)
            with torch.enable_grad():
                out = main_tensor(model(**inputs))
                outputs.append(out.detach())
                out.float().pow(2).mean().backward()
    except Exception as err:
        raise NotBuildable(f"backward fails without any delta: {_one_line(err, 120)}") from None
    finally:
        grads_finite = all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
    if not torch.equal(outputs[0], outputs[1]):
        raise NotBuildable("the forward pass does not repeat itself with the same inputs and seed")
    if not grads_finite:
        raise NotBuildable("non-finite gradients without any delta")


def _sub(config, *names):
    for name in names:
        sub = getattr(config, name, None)
        if sub is not None:
            return sub
    return config


def _image_inputs(config, g) -> Optional[dict]:
    vision = _sub(config, "vision_config", "backbone_config")
    size = getattr(vision, "image_size", None) or getattr(config, "image_size", None)
    channels = getattr(vision, "num_channels", None) or getattr(config, "num_channels", 3)
    if isinstance(size, (list, tuple)):
        h, w = size[0], size[-1]
    elif _is_int(size):
        h = w = size
    else:
        h = w = 224
    return {"pixel_values": torch.randn(BATCH, channels, h, w, generator=g)}


def _text_ids(config, g, length=SEQ) -> torch.Tensor:
    text = _sub(config, "text_config")
    vocab = getattr(text, "vocab_size", None) or getattr(config, "vocab_size", None) or VOCAB
    high = max(4, min(vocab, VOCAB - 64))
    return torch.randint(3, high, (BATCH, length), generator=g)


def candidate_inputs(model: nn.Module, config, seed: int) -> list[dict[str, torch.Tensor]]:
    """Input dicts to try, most likely first."""
    g = torch.Generator().manual_seed(seed)
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    candidates: list[dict] = []

    def add_text_extras(inputs: dict) -> dict:
        if "attention_mask" in params and "input_ids" in inputs:
            inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "decoder_input_ids" in params:
            inputs["decoder_input_ids"] = _text_ids(config, g, 5)
        return inputs

    if main == "input_ids" or "input_ids" in params:
        candidates.append(add_text_extras({"input_ids": _text_ids(config, g)}))
    if main == "pixel_values" or "pixel_values" in params:
        image = _image_inputs(config, g)
        if "input_ids" in params:
            candidates.append(add_text_extras({**image, "input_ids": _text_ids(config, g)}))
        candidates.append(add_text_extras(dict(image)))
    if main in ("input_features", "input_values") or "input_features" in params or "input_values" in params:
        mels = next((getattr(config, k) for k in ("num_mel_bins", "feature_size", "input_feat_size", "input_dim")
                     if _is_int(getattr(config, k, None))), 80)
        source = getattr(config, "max_source_positions", None)
        frames = 2 * source if _is_int(source) and source <= 3000 else 64
        if main == "input_features" or "input_features" in params:
            candidates.append(add_text_extras({"input_features": torch.randn(BATCH, mels, frames, generator=g)}))
            candidates.append(add_text_extras({"input_features": torch.randn(BATCH, frames, mels, generator=g)}))
        if main == "input_values" or "input_values" in params:
            candidates.append(add_text_extras({"input_values": torch.randn(BATCH, 4000, generator=g)}))
    if "inputs_embeds" in params:
        width = getattr(_sub(config, "text_config"), "hidden_size", None) or HIDDEN
        candidates.append(add_text_extras({"inputs_embeds": torch.randn(BATCH, SEQ, width, generator=g)}))
    return candidates


def runnable_inputs(model: nn.Module, config, seed: int = 0) -> dict[str, torch.Tensor]:
    errors = []
    for inputs in candidate_inputs(model, config, seed):
        try:
            with torch.no_grad():
                out = model(**inputs)
            main_tensor(out)
            return inputs
        except Exception as err:
            errors.append(f"{'+'.join(inputs)}: {_one_line(err, 120)}")
    if not errors:
        raise NotBuildable(f"cannot synthesise inputs for {type(model).__name__} (main input "
                           f"{getattr(model, 'main_input_name', '?')!r})")
    raise NotBuildable("forward fails on synthesised inputs: " + " | ".join(errors[:2]))


def main_tensor(output) -> torch.Tensor:
    """The first floating-point tensor of a model output (last_hidden_state, logits, ...)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            return output
        raise ValueError("the output tensor is not floating point")
    values = output.values() if hasattr(output, "values") and not isinstance(output, (tuple, list)) else output
    for value in values:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            return value
        if isinstance(value, (tuple, list)) and value or hasattr(value, "values") and not isinstance(value, torch.Tensor):
            try:
                return main_tensor(value)
            except ValueError:
                continue
    raise ValueError("the model output holds no floating-point tensor")


def model_types() -> list[str]:
    """Every model type with a base-model class (``AutoModel``) in the installed transformers."""
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    return sorted(MODEL_MAPPING_NAMES)


__all__ = ["Built", "NotBuildable", "build", "tiny_config", "main_tensor", "model_types"]
