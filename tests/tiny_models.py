"""Tiny randomly initialised HF models for tests (no hub access needed).

``tiny_model(model_type)`` builds a 2-layer, hidden-32, 4-head model from the
config class, so tests see the real module tree of each architecture for a few
milliseconds. Weights and inputs depend only on ``seed``.

``ARCHITECTURES`` lists the model types (``config.model_type``) available in the
installed transformers; ``VARIANTS`` lists extra configurations (gated T5).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 128
HIDDEN = 32
LAYERS = 2
HEADS = 4
FFN = 64
MAX_POS = 64
BATCH = 2
SEQ = 7

_ENCODER = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=FFN, max_position_embeddings=MAX_POS, type_vocab_size=2, num_labels=2,
)
# Llama-style decoders; 2 kv heads so grouped-query attention (k/v narrower than q) is exercised.
_LLAMA = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=MAX_POS,
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
_BART = dict(
    vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
    encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN,
    decoder_ffn_dim=FFN, max_position_embeddings=MAX_POS, pad_token_id=1, bos_token_id=0,
    eos_token_id=2, decoder_start_token_id=2,
)

# model_type -> (config class, model class, config kwargs). Heads are chosen so
# that every model has an output head to map (lm_head / classifier).
_SPECS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "bert": ("BertConfig", "BertForSequenceClassification", _ENCODER),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(_ENCODER, pad_token_id=1)),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaForSequenceClassification", dict(_ENCODER, pad_token_id=1)),
    "electra": ("ElectraConfig", "ElectraForSequenceClassification", dict(_ENCODER, embedding_size=HIDDEN)),
    "camembert": ("CamembertConfig", "CamembertForSequenceClassification", dict(_ENCODER, pad_token_id=1)),
    "albert": ("AlbertConfig", "AlbertForSequenceClassification", dict(_ENCODER, embedding_size=16)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(
        vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN,
        max_position_embeddings=MAX_POS, num_labels=2)),
    # DeBERTa-v3 style relative attention so the position projections exist too.
    "deberta-v2": ("DebertaV2Config", "DebertaV2ForSequenceClassification", dict(
        _ENCODER, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
        max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True, type_vocab_size=0)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS)),
    "gpt_bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", dict(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POS,
        multi_query=True)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM", dict(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
        attention_types=[[["global", "local"], 1]], window_size=4, intermediate_size=FFN,
        max_position_embeddings=MAX_POS)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(bos_token_id=1, eos_token_id=2,
        vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, rotary_dim=4,
        n_positions=MAX_POS, tie_word_embeddings=False)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, max_position_embeddings=MAX_POS, rotary_pct=0.5)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        ffn_dim=FFN, word_embed_proj_dim=HIDDEN, max_position_embeddings=MAX_POS, pad_token_id=1)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS)),
    # Falcon-40B style (new_decoder_architecture: separate ln_attn/ln_mlp, grouped kv).
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=MAX_POS)),
    "mpt": ("MptConfig", "MptForCausalLM", dict(
        vocab_size=VOCAB, d_model=HIDDEN, n_layers=LAYERS, n_heads=HEADS, max_seq_len=MAX_POS,
        expansion_ratio=2)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(_LLAMA, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA, head_dim=8, hidden_activation="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_LLAMA, head_dim=8, sliding_window=4)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        _LLAMA, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_LLAMA, partial_rotary_factor=0.5)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA, original_max_position_embeddings=MAX_POS)),
    "t5": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        decoder_start_token_id=0, pad_token_id=0)),
    # T5 v1.1 / flan-t5 style gated FFN (wi_0 / wi_1).
    "t5-gated": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0)),
    "mt5": ("MT5Config", "MT5ForConditionalGeneration", dict(
        vocab_size=VOCAB, d_model=HIDDEN, d_kv=8, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        decoder_start_token_id=0, pad_token_id=0)),
    "bart": ("BartConfig", "BartForConditionalGeneration", _BART),
    "mbart": ("MBartConfig", "MBartForConditionalGeneration", _BART),
    "vit": ("ViTConfig", "ViTForImageClassification", dict(
        hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        intermediate_size=FFN, image_size=16, patch_size=4, num_channels=3, num_labels=3)),
}



def _available(config_cls: str) -> bool:
    import transformers

    try:
        return hasattr(transformers, config_cls)
    except Exception:  # a lazily imported config module that fails to import
        return False


# Extra configurations of an architecture already in ARCHITECTURES; their
# config.model_type is the base one ("t5").
_VARIANT_OF = {"t5-gated": "t5"}

#: Every mapped model type (== config.model_type) with a tiny spec that the
#: installed transformers provides (older 4.4x releases lack e.g. Qwen3).
ARCHITECTURES: list[str] = [
    name for name, (cfg, _, _) in _SPECS.items() if name not in _VARIANT_OF and _available(cfg)
]
#: Other tiny configurations worth testing (also accepted by ``tiny_model``).
VARIANTS: list[str] = [name for name in _VARIANT_OF if _available(_SPECS[name][0])]

ENCODER_DECODER = frozenset({"t5", "t5-gated", "mt5", "bart", "mbart"})


def _transformers():
    import transformers

    return transformers


def tiny_config(model_type: str, **overrides: Any):
    """Config object for ``model_type`` (overrides win over the tiny defaults)."""
    try:
        config_cls, _, kwargs = _SPECS[model_type]
    except KeyError:
        raise KeyError(f"no tiny spec for {model_type!r}; known: {ARCHITECTURES}") from None
    return getattr(_transformers(), config_cls)(**{**kwargs, **overrides})


def example_inputs(model_type: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch of 2 inputs of length 7; the second row ends in two padding positions."""
    g = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=g)}
    # ids start at 3 so they never collide with the pad/bos/eos ids used above
    input_ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    attention_mask[1, -2:] = 0
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if model_type in ENCODER_DECODER:
        inputs["decoder_input_ids"] = torch.randint(3, VOCAB, (BATCH, 5), generator=g)
    return inputs


def tiny_model(model_type: str, seed: int = 0, head: str | None = None,
               **config_overrides: Any) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Tiny float32 model in eval mode and example inputs, deterministic in ``seed``.

    ``head`` replaces the default model class name (e.g. ``"BertModel"``).
    """
    _, model_cls, _ = _SPECS[model_type]
    config = tiny_config(model_type, **config_overrides)
    # Eager attention: no SDPA backend choice that varies by machine, so numeric
    # comparisons (e.g. merged vs unmerged deltas) can use tight tolerances.
    try:
        config._attn_implementation = "eager"
    except Exception:  # pragma: no cover - very old transformers
        pass
    cls = getattr(_transformers(), head or model_cls)
    # fork_rng so building a model does not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model = model.float().eval()
    return model, example_inputs(model_type, seed)


def tiny_llama(seed: int = 0, **config_overrides: Any):
    return tiny_model("llama", seed, **config_overrides)


def tiny_gpt2(seed: int = 0, **config_overrides: Any):
    return tiny_model("gpt2", seed, **config_overrides)


def tiny_bert(seed: int = 0, **config_overrides: Any):
    return tiny_model("bert", seed, **config_overrides)


def tiny_t5(seed: int = 0, **config_overrides: Any):
    return tiny_model("t5", seed, **config_overrides)
