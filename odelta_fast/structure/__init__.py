"""Common structure names: one vocabulary for the modules of any architecture.

``structure_map(model)`` finds every transformers model inside ``model`` (the
model itself or nested in a user's wrapper), looks its ``config.model_type`` up
in :mod:`odelta_fast.structure.tables`, infers the structure of everything no
table covers (:mod:`odelta_fast.structure.inference`: other transformers models,
plain PyTorch models) and names its modules:

================  ==========================================================
``block.<i>``     i-th transformer block
``attn``          attention module; ``attn.q/k/v/o``; ``attn.qkv`` when fused
``ff``            MLP module; ``ff.w1`` (up), ``ff.w2`` (down), ``ff.gate``
``attn.layer_norm`` / ``ff.layer_norm``   norm belonging to each sub-layer
``crossattn.*``   cross attention (same leaves as ``attn``)
``embeddings``    token embeddings (or the embeddings module)
``lm_head``       final output projection (LM head / classifier)
================  ==========================================================

Encoder-decoder models prefix block names with ``encoder.`` / ``decoder.``
(``decoder.block.3.crossattn.q``); other models have no prefix
(``block.3.attn.q``). The tables live in ``tables.py``, one per family.
``StructureMap.sources`` says which mapped model came from a table and which was
inferred; ``describe(model)`` prints the whole mapping.
"""

from .mapping import HEAD_NAMES, StructureMap, UnmappedArchitectureWarning, describe, structure_map
from .tables import MODEL_TYPES, Arch, Stack

__all__ = [
    "StructureMap",
    "structure_map",
    "describe",
    "UnmappedArchitectureWarning",
    "MODEL_TYPES",
    "HEAD_NAMES",
    "Arch",
    "Stack",
]
