"""Fixtures for the op tests (every backend against the float64 eager reference)."""
import pytest

from opcheck import DEVICE, triton_ok


@pytest.fixture
def poison():
    """Kernel outputs are allocated full of NaN, so an element a kernel never writes fails."""
    if not triton_ok():
        yield
        return
    from odelta_fast.ops.backend import kernels

    common = kernels("common")
    old = common.POISON_OUTPUTS
    common.POISON_OUTPUTS = True
    try:
        yield
    finally:
        common.POISON_OUTPUTS = old


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    # A developer's ODELTA_BACKEND must not turn the eager tests into Triton ones or back.
    monkeypatch.delenv("ODELTA_BACKEND", raising=False)


@pytest.fixture
def device():
    return DEVICE
