"""Backend choice: ``auto`` / ``eager`` / ``triton``, the ``ODELTA_BACKEND`` override, and the
per-op query the frontend uses to show which backend a module runs with."""
from __future__ import annotations

import pytest
import torch

from odelta_fast import ops
from odelta_fast.ops import backend_for, resolve_backend
from opcheck import CUDA, needs_triton

OPS = ["lora_linear", "lora_shrink_grouped", "adapter_bottleneck", "bias_add", "lora_merge_"]


@pytest.mark.parametrize("op", OPS)
def test_every_op_implements_triton(op):
    assert "triton" in ops.OP_BACKENDS[op]()


@pytest.mark.parametrize("op", OPS)
def test_auto_picks_eager_on_cpu_and_for_float64(op):
    assert backend_for(op, "cpu") == "eager"
    assert backend_for(op, "cpu", "eager") == "eager"
    if CUDA:
        assert backend_for(op, "cuda") == "triton"
        assert backend_for(op, "cuda", dtype=torch.float64) == "eager"


@needs_triton
def test_forced_triton(monkeypatch):
    device = "cuda" if CUDA else "cpu"
    # LoRA linear's Triton kernels come in two paths; "triton" lets the dispatch table choose, and
    # no GPU has measured this shape, so: split.
    assert backend_for("lora_linear", device, "triton", K=64, N=64, r=8) == "split"
    assert backend_for("lora_linear", device, "fused") == "fused"
    assert backend_for("adapter_bottleneck", device, "triton") == "triton"
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        backend_for("lora_linear", device, "triton", dtype=torch.float64)
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="TRITON_INTERPRET"):
            backend_for("lora_linear", "cpu", "triton")


@needs_triton
def test_persistent_path_needs_tma(monkeypatch):
    """Forcing the persistent path where it cannot run is an error naming what would; a table entry
    naming it on such a device (a Triton without tensor descriptors) runs the fused path instead."""
    from odelta_fast.ops import lora_dispatch
    from odelta_fast.ops.backend import kernels

    device = "cuda" if CUDA else "cpu"
    if kernels("lora").persistent_available(torch.device(device)):  # the interpreter, a Hopper GPU
        assert backend_for("lora_linear", device, "persistent") == "persistent"
    monkeypatch.setattr(kernels("lora"), "persistent_available", lambda device: False)
    with pytest.raises(ValueError, match="compute capability 9.0 or later.*backend='fused'"):
        backend_for("lora_linear", device, "persistent", K=64, N=64, r=8)
    monkeypatch.setattr(lora_dispatch, "choose", lambda *a, **k: "persistent")
    assert backend_for("lora_linear", device, "triton", M=4096, K=64, N=64, r=8) == "fused"


def test_env_override(monkeypatch):
    monkeypatch.setenv("ODELTA_BACKEND", "eager")
    assert backend_for("lora_linear", "cuda", "triton") == "eager"
    monkeypatch.setenv("ODELTA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="ODELTA_BACKEND"):
        backend_for("lora_linear", "cpu")


def test_bad_names():
    with pytest.raises(ValueError, match="backend="):
        resolve_backend("lora_linear", "fast", torch.device("cpu"), ("triton",))
    with pytest.raises(ValueError, match="no 'cuda' implementation"):
        backend_for("lora_linear", "cpu", "cuda")
    with pytest.raises(ValueError, match="unknown op"):
        backend_for("nope", "cpu")


@needs_triton
def test_env_override_reaches_the_ops(monkeypatch):
    """ODELTA_BACKEND=triton sends a plain call (backend='auto') to the kernels."""
    monkeypatch.setenv("ODELTA_BACKEND", "triton")
    device = "cuda" if CUDA else "cpu"
    x = torch.randn(3, 8, device=device, requires_grad=True)
    y = ops.bias_add(x, torch.zeros(8, device=device))
    assert "triton" in type(y.grad_fn.next_functions[0][0]).__name__


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    import pytest
    import torch

    from odelta_fast import ops

    w = torch.randn(8, 4)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ops.lora_merge_(w, torch.randn(2, 4), torch.randn(8, 2), 1.0, backend="cuda")
    with pytest.raises(ValueError, match="has no 'cuda' implementation"):
        ops.lora_linear(torch.randn(3, 4), w, None, torch.randn(2, 4), torch.randn(8, 2), 1.0, backend="cuda")
