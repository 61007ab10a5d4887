"""The op layer: every piece of delta math the methods use, one function per computation.

Each op checks its inputs, owns an eager reference implementation (the CPU path and the
yardstick for every kernel), and picks a backend with ``backend=`` (see ``backend.py``).
"""
from typing import Optional

import torch

from .adapter import ACTIVATIONS, adapter_backends, adapter_bottleneck
from .backend import BACKENDS, resolve_backend
from .bias import bias_add, bias_backends, linear_bias_delta
from .lora import lora_backends, lora_linear, lora_linear_reference, lora_shrink_grouped
from .merge import bias_merge_, lora_delta_weight, lora_merge_, merge_backends
from .dora import dora_linear, dora_merge_, dora_row_norm
from .low_rank import lora_conv_update, lora_embedding_update, lora_update
from .multi_lora import multi_lora_backends
from .weights import kronecker_sum, low_rank_product, prefix_mlp

# Which backends besides eager implement each op, for ``backend_for`` and ``delta.log()``.
OP_BACKENDS = {
    "lora_linear": lora_backends,
    "lora_shrink_grouped": lora_backends,
    "adapter_bottleneck": adapter_backends,
    "bias_add": bias_backends,
    "lora_merge_": merge_backends,
    "multi_lora_shrink": multi_lora_backends,
    "multi_lora_expand": multi_lora_backends,
}


def backend_for(op: str, device, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> str:
    """The backend ``op`` will run with for tensors on ``device`` (what ``delta.log()`` shows).
    Raises ``ValueError`` exactly when the op call would."""
    if op not in OP_BACKENDS:
        raise ValueError(f"unknown op {op!r}; expected one of {sorted(OP_BACKENDS)}")
    return resolve_backend(op, backend, torch.device(device), OP_BACKENDS[op](), dtype=dtype)


__all__ = [
    "ACTIVATIONS", "BACKENDS", "OP_BACKENDS", "adapter_backends", "adapter_bottleneck", "backend_for", "bias_add",
    "bias_backends", "bias_merge_", "dora_linear", "dora_merge_", "dora_row_norm", "kronecker_sum", "linear_bias_delta", "lora_backends", "lora_delta_weight", "lora_linear", "lora_linear_reference",
    "lora_conv_update", "lora_embedding_update", "lora_merge_", "lora_shrink_grouped", "lora_update", "low_rank_product", "merge_backends", "prefix_mlp", "resolve_backend",
]
