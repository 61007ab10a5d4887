"""Per-architecture tables: common structure names -> raw HF module paths.

How to read a table
-------------------
Paths are relative to the HF *base model* (``model.base_model``: ``bert`` in
``BertForSequenceClassification``, ``model`` in ``LlamaForCausalLM``, the model
itself for ``T5ForConditionalGeneration``), so a table serves every head class
of an architecture.

* ``Stack.blocks`` is where the transformer blocks live (a ModuleList); ``*``
  matches any child name (ALBERT nests blocks in groups).
* ``Stack.block`` maps a common name to the module path inside one block.
* ``Stack.extra`` / ``Arch.top`` name modules outside the blocks.
* A stack key ("encoder"/"decoder") becomes the common-name prefix; decoder-
  only and encoder-only models use the single stack key ``""``.

Any path may list alternatives separated by ``|``; the first one present in the
model wins. Alternatives absorb module renames between transformers releases
(e.g. ViT's ``attention.attention.query`` in 4.x became ``attention.q_proj`` in
5.x) and optional modules (BERT's cross-attention, Falcon's layer-norm
layouts). A name whose paths are all absent is simply not mapped.

Output heads (lm_head, classifier, ...) need no table: they are found
generically from the base model boundary (see ``mapping.py``).

To add an architecture: write (or reuse) an ``Arch`` below and register its
``config.model_type`` in ``MODEL_TYPES`` at the bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Stack:
    blocks: str
    block: Mapping[str, str]
    extra: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Arch:
    stacks: Mapping[str, Stack]
    top: Mapping[str, str] = field(default_factory=dict)
    # Block-level names other than attn.qkv whose module packs several
    # projections in one weight (a delta on it sees the concatenated output).
    fused: frozenset[str] = frozenset()


def _single(blocks: str, block: Mapping[str, str], **top: str) -> Arch:
    """Decoder-only / encoder-only model: one stack, no name prefix."""
    return Arch(stacks={"": Stack(blocks, block)}, top=top)


# --------------------------------------------------------------------------- encoders

BERT = _single("encoder.layer", {
    "attn": "attention",
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "attn.layer_norm": "attention.output.LayerNorm",  # post-LN: norm after the residual
    "ff.w1": "intermediate.dense",
    "ff.w2": "output.dense",
    "ff.layer_norm": "output.LayerNorm",
    # only present with config.is_decoder + add_cross_attention
    "crossattn": "crossattention",
    "crossattn.q": "crossattention.self.query",
    "crossattn.k": "crossattention.self.key",
    "crossattn.v": "crossattention.self.value",
    "crossattn.o": "crossattention.output.dense",
    "crossattn.layer_norm": "crossattention.output.LayerNorm",
}, embeddings="embeddings")

DEBERTA_V2 = _single("encoder.layer", {
    "attn": "attention",
    "attn.q": "attention.self.query_proj",
    "attn.k": "attention.self.key_proj",
    "attn.v": "attention.self.value_proj",
    "attn.o": "attention.output.dense",
    "attn.layer_norm": "attention.output.LayerNorm",
    "ff.w1": "intermediate.dense",
    "ff.w2": "output.dense",
    "ff.layer_norm": "output.LayerNorm",
}, embeddings="embeddings")

DISTILBERT = _single("transformer.layer", {
    "attn": "attention",
    "attn.q": "attention.q_lin",
    "attn.k": "attention.k_lin",
    "attn.v": "attention.v_lin",
    "attn.o": "attention.out_lin",
    "attn.layer_norm": "sa_layer_norm",
    "ff": "ffn",
    "ff.w1": "ffn.lin1",
    "ff.w2": "ffn.lin2",
    "ff.layer_norm": "output_layer_norm",
}, embeddings="embeddings")

# ALBERT shares one set of layer weights across depth; with the default
# num_hidden_groups=1 there is a single physical block.
ALBERT = _single("encoder.albert_layer_groups.*.albert_layers", {
    "attn": "attention",
    "attn.q": "attention.query",
    "attn.k": "attention.key",
    "attn.v": "attention.value",
    "attn.o": "attention.dense",
    "attn.layer_norm": "attention.LayerNorm",
    "ff.w1": "ffn",
    "ff.w2": "ffn_output",
    "ff.layer_norm": "full_layer_layer_norm",
}, embeddings="embeddings")

# transformers 5 rewrote ViT on the llama-style layout (layers.N.attention.q_proj,
# mlp.fc1); 4.x has BERT-style encoder.layer.N.attention.attention.query.
VIT = _single("layers|encoder.layer", {
    "attn": "attention",
    "attn.q": "attention.q_proj|attention.attention.query",
    "attn.k": "attention.k_proj|attention.attention.key",
    "attn.v": "attention.v_proj|attention.attention.value",
    "attn.o": "attention.o_proj|attention.output.dense",
    "attn.layer_norm": "layernorm_before",
    "ff": "mlp",  # 4.x has no single MLP module
    "ff.w1": "mlp.fc1|intermediate.dense",
    "ff.w2": "mlp.fc2|output.dense",
    "ff.layer_norm": "layernorm_after",
}, embeddings="embeddings")

# --------------------------------------------------------------------------- GPT-style decoders

# c_attn packs q,k,v (Conv1D in GPT-2; Linear with multi-query q|kv in BigCode).
GPT2 = _single("h", {
    "attn": "attn",
    "attn.qkv": "attn.c_attn",
    "attn.o": "attn.c_proj",
    "attn.layer_norm": "ln_1",
    "ff": "mlp",
    "ff.w1": "mlp.c_fc",
    "ff.w2": "mlp.c_proj",
    "ff.layer_norm": "ln_2",
    # add_cross_attention=True only; its c_attn packs k,v (no q), so no crossattn.k/v
    "crossattn": "crossattention",
    "crossattn.q": "crossattention.q_attn",
    "crossattn.o": "crossattention.c_proj",
    "crossattn.layer_norm": "ln_cross_attn",
}, embeddings="wte")

GPT_NEO = _single("h", {
    "attn": "attn",
    "attn.q": "attn.attention.q_proj",
    "attn.k": "attn.attention.k_proj",
    "attn.v": "attn.attention.v_proj",
    "attn.o": "attn.attention.out_proj",
    "attn.layer_norm": "ln_1",
    "ff": "mlp",
    "ff.w1": "mlp.c_fc",
    "ff.w2": "mlp.c_proj",
    "ff.layer_norm": "ln_2",
}, embeddings="wte")

# Parallel attention/MLP sharing one input norm: ln_1 is named attn.layer_norm
# only, since a module has exactly one common name.
GPTJ = _single("h", {
    "attn": "attn",
    "attn.q": "attn.q_proj",
    "attn.k": "attn.k_proj",
    "attn.v": "attn.v_proj",
    "attn.o": "attn.out_proj",
    "attn.layer_norm": "ln_1",
    "ff": "mlp",
    "ff.w1": "mlp.fc_in",
    "ff.w2": "mlp.fc_out",
}, embeddings="wte")

GPT_NEOX = _single("layers", {
    "attn": "attention",
    "attn.qkv": "attention.query_key_value",
    "attn.o": "attention.dense",
    "attn.layer_norm": "input_layernorm",
    "ff": "mlp",
    "ff.w1": "mlp.dense_h_to_4h",
    "ff.w2": "mlp.dense_4h_to_h",
    "ff.layer_norm": "post_attention_layernorm",
}, embeddings="embed_in")

BLOOM = _single("h", {
    "attn": "self_attention",
    "attn.qkv": "self_attention.query_key_value",
    "attn.o": "self_attention.dense",
    "attn.layer_norm": "input_layernorm",
    "ff": "mlp",
    "ff.w1": "mlp.dense_h_to_4h",
    "ff.w2": "mlp.dense_4h_to_h",
    "ff.layer_norm": "post_attention_layernorm",
}, embeddings="word_embeddings")

# Three layouts by config: new_decoder_architecture (ln_attn + ln_mlp), Falcon-7B
# parallel attention (input_layernorm only), sequential (input + post_attention).
FALCON = _single("h", {
    "attn": "self_attention",
    "attn.qkv": "self_attention.query_key_value",
    "attn.o": "self_attention.dense",
    "attn.layer_norm": "ln_attn|input_layernorm",
    "ff": "mlp",
    "ff.w1": "mlp.dense_h_to_4h",
    "ff.w2": "mlp.dense_4h_to_h",
    "ff.layer_norm": "ln_mlp|post_attention_layernorm",
}, embeddings="word_embeddings")

MPT = _single("blocks", {
    "attn": "attn",
    "attn.qkv": "attn.Wqkv",
    "attn.o": "attn.out_proj",
    "attn.layer_norm": "norm_1",
    "ff": "ffn",
    "ff.w1": "ffn.up_proj",
    "ff.w2": "ffn.down_proj",
    "ff.layer_norm": "norm_2",
}, embeddings="wte")

# OPT's decoder layers are BART's (fairseq lineage): one layer table serves both.
_BART_LAYER = {
    "attn": "self_attn",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.out_proj",
    "attn.layer_norm": "self_attn_layer_norm",
    "ff.w1": "fc1",
    "ff.w2": "fc2",
    "ff.layer_norm": "final_layer_norm",
}

OPT = _single("decoder.layers", _BART_LAYER, embeddings="decoder.embed_tokens")

# --------------------------------------------------------------------------- llama-style decoders

_LLAMA_ATTN = {
    "attn": "self_attn",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.o_proj",
    "attn.layer_norm": "input_layernorm",
}
_GATED_MLP = {
    "ff": "mlp",
    "ff.gate": "mlp.gate_proj",
    "ff.w1": "mlp.up_proj",
    "ff.w2": "mlp.down_proj",
}

LLAMA = _single("layers", {
    **_LLAMA_ATTN, **_GATED_MLP,
    "ff.layer_norm": "post_attention_layernorm",
}, embeddings="embed_tokens")

# Gemma2/3 "sandwich" norms: post_attention_layernorm normalises the attention
# *output*; the MLP input norm is pre_feedforward_layernorm.
GEMMA2 = _single("layers", {
    **_LLAMA_ATTN, **_GATED_MLP,
    "ff.layer_norm": "pre_feedforward_layernorm",
}, embeddings="embed_tokens")

PHI = _single("layers", {
    "attn": "self_attn",
    "attn.q": "self_attn.q_proj",
    "attn.k": "self_attn.k_proj",
    "attn.v": "self_attn.v_proj",
    "attn.o": "self_attn.dense",
    "attn.layer_norm": "input_layernorm",  # parallel block: the only norm
    "ff": "mlp",
    "ff.w1": "mlp.fc1",
    "ff.w2": "mlp.fc2",
}, embeddings="embed_tokens")

# Phi-3 fuses q|k|v and gate|up; gate_up_proj is exposed as ff.w1 (no ff.gate).
PHI3 = Arch(
    stacks={"": Stack("layers", {
        "attn": "self_attn",
        "attn.qkv": "self_attn.qkv_proj",
        "attn.o": "self_attn.o_proj",
        "attn.layer_norm": "input_layernorm",
        "ff": "mlp",
        "ff.w1": "mlp.gate_up_proj",
        "ff.w2": "mlp.down_proj",
        "ff.layer_norm": "post_attention_layernorm",
    })},
    top={"embeddings": "embed_tokens"},
    fused=frozenset({"ff.w1"}),
)

# --------------------------------------------------------------------------- encoder-decoder


def _t5_attn(prefix: str, layer: str, module: str) -> dict[str, str]:
    base = f"layer.{layer}.{module}"
    return {
        prefix: base,
        f"{prefix}.q": f"{base}.q",
        f"{prefix}.k": f"{base}.k",
        f"{prefix}.v": f"{base}.v",
        f"{prefix}.o": f"{base}.o",
        f"{prefix}.layer_norm": f"layer.{layer}.layer_norm",
    }


def _t5_ff(layer: str) -> dict[str, str]:
    # T5 v1.0 has one input projection `wi`; v1.1/flan/mT5 gate it: wi_0 is
    # the activated (gate) branch, wi_1 the linear (up) branch.
    ff = f"layer.{layer}.DenseReluDense"
    return {
        "ff": ff,
        "ff.w1": f"{ff}.wi|{ff}.wi_1",
        "ff.gate": f"{ff}.wi_0",
        "ff.w2": f"{ff}.wo",
        "ff.layer_norm": f"layer.{layer}.layer_norm",
    }


# Decoder blocks are [self-attn, cross-attn, ff]; encoder blocks [self-attn, ff].
# In 4.x encoder/decoder.embed_tokens *are* `shared` (so named_modules lists
# them once, as `shared`); 5.x ties weights instead and lists them separately.
T5 = Arch(
    stacks={
        "encoder": Stack("encoder.block", {**_t5_attn("attn", "0", "SelfAttention"), **_t5_ff("1")},
                         extra={"embeddings": "encoder.embed_tokens"}),
        "decoder": Stack("decoder.block", {**_t5_attn("attn", "0", "SelfAttention"),
                                           **_t5_attn("crossattn", "1", "EncDecAttention"),
                                           **_t5_ff("2")},
                         extra={"embeddings": "decoder.embed_tokens"}),
    },
    top={"embeddings": "shared"},
)

BART = Arch(
    stacks={
        "encoder": Stack("encoder.layers", _BART_LAYER, extra={"embeddings": "encoder.embed_tokens"}),
        "decoder": Stack("decoder.layers", {
            **_BART_LAYER,
            "crossattn": "encoder_attn",
            "crossattn.q": "encoder_attn.q_proj",
            "crossattn.k": "encoder_attn.k_proj",
            "crossattn.v": "encoder_attn.v_proj",
            "crossattn.o": "encoder_attn.out_proj",
            "crossattn.layer_norm": "encoder_attn_layer_norm",
        }, extra={"embeddings": "decoder.embed_tokens"}),
    },
    top={"embeddings": "shared"},
)

# --------------------------------------------------------------------------- registry

#: config.model_type -> table. Only types covered by tests/test_structure.py.
MODEL_TYPES: Mapping[str, Arch] = MappingProxyType({
    "bert": BERT,
    "roberta": BERT,
    "xlm-roberta": BERT,
    "camembert": BERT,
    "electra": BERT,
    "albert": ALBERT,
    "distilbert": DISTILBERT,
    "deberta-v2": DEBERTA_V2,
    "vit": VIT,
    "gpt2": GPT2,
    "gpt_bigcode": GPT2,
    "gpt_neo": GPT_NEO,
    "gptj": GPTJ,
    "gpt_neox": GPT_NEOX,
    "opt": OPT,
    "bloom": BLOOM,
    "falcon": FALCON,
    "mpt": MPT,
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,  # plus per-head q_norm/k_norm, left unnamed
    "gemma": LLAMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi": PHI,
    "phi3": PHI3,
    "t5": T5,
    "mt5": T5,
    "bart": BART,
    "mbart": BART,
})
