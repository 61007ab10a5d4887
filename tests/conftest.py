"""Test-wide setup. Kept minimal: op-specific fixtures live in tests/ops/conftest.py."""
import os

import torch

# Without CUDA the Triton kernels run on CPU through Triton's interpreter. It must be switched on
# before anything imports a kernel module: triton.jit decides at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
