"""Test-wide setup. Kept minimal: op-specific fixtures live in tests/ops/conftest.py."""
import os

import pytest
import torch

# Without CUDA the Triton kernels run on CPU through Triton's interpreter. It must be switched on
# before anything imports a kernel module: triton.jit decides at decoration time.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

# CI machines are slow and shared: no per-example deadline, and a fixed example sequence under CI
# so a red run is reproducible rather than a draw of the dice.
settings.register_profile("odelta", deadline=None)
settings.register_profile("odelta-ci", deadline=None, derandomize=True)
settings.load_profile("odelta-ci" if os.environ.get("CI") else "odelta")


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread (tiny models: threads only add overhead), restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
