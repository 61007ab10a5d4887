"""The op layer: every piece of delta math the methods use, one function per computation.

Each op checks its inputs, owns an eager reference implementation (the CPU path and the
yardstick for every kernel) and the autograd of every implementation, and picks what runs with
``backend_for`` (see ``backend.py``), which ``delta.log()`` calls too.
"""

from .adapter import ACTIVATIONS, adapter_backends, adapter_bottleneck
from .backend import BACKENDS, backend_for, op_backends, resolve_backend
from .bias import bias_add, bias_backends, linear_bias_delta
from .lora import lora_backends, lora_linear, lora_linear_reference, lora_shrink_grouped
from .merge import bias_merge_, lora_delta_weight, lora_merge_, merge_backends
from .dora import dora_linear, dora_merge_, dora_row_norm
from .low_rank import lora_conv_update, lora_embedding_update, lora_update
from .multi_lora import multi_lora_backends
from .weights import kronecker_sum, low_rank_product, prefix_mlp

# Which backends besides eager implement each op (registered by the op modules): for ``backend_for``
# and ``delta.log()``.
OP_BACKENDS = op_backends()


__all__ = [
    "ACTIVATIONS", "BACKENDS", "OP_BACKENDS", "adapter_backends", "adapter_bottleneck", "backend_for", "bias_add",
    "bias_backends", "bias_merge_", "dora_linear", "dora_merge_", "dora_row_norm", "kronecker_sum",
    "linear_bias_delta", "lora_backends", "lora_conv_update", "lora_delta_weight", "lora_embedding_update",
    "lora_linear", "lora_linear_reference", "lora_merge_", "lora_shrink_grouped", "lora_update", "low_rank_product",
    "merge_backends", "multi_lora_backends", "prefix_mlp", "resolve_backend",
]
