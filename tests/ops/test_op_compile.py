"""``torch.compile(fullgraph=True)`` over the ops: no graph break, same numbers as eager.

``fullgraph=True`` turns any graph break into an error, so compiling at all is the assertion.
Runs on CPU with the eager backend of each op (the Triton ops are ``triton_op``s, traceable by
the same machinery, and are compiled on GPU machines).
"""
from __future__ import annotations

import pytest
import torch

from odelta_fast.ops import adapter_bottleneck, bias_add, lora_linear


def _inputs():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(2, 7, 24).requires_grad_()
    params = dict(
        w=r(32, 24), b=r(32), a=r(4, 24).requires_grad_(), bb=r(32, 4).requires_grad_(),
        bias_delta=r(32).requires_grad_(),
        dw=r(6, 32).requires_grad_(), db=r(6).requires_grad_(), uw=r(32, 6).requires_grad_(), ub=r(32).requires_grad_(),
    )
    return x, params


def block(x, p, backend="eager", lora_backend=None):
    y = lora_linear(x, p["w"], p["b"], p["a"], p["bb"], 2.0, 0.0, backend=lora_backend or backend)
    y = bias_add(y, p["bias_delta"], backend=backend)
    return adapter_bottleneck(y, p["dw"], p["db"], p["uw"], p["ub"], residual=y, activation="gelu_new",
                              scaling=0.5, backend=backend)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(compiler):
    torch._dynamo.reset()
    x, p = _inputs()
    want = block(x, p)
    want_grads = torch.autograd.grad(want.sum(), [x, p["a"], p["bb"], p["bias_delta"], p["dw"], p["uw"]])
    compiled = torch.compile(block, fullgraph=True, backend=compiler)
    got = compiled(x, p)
    got_grads = torch.autograd.grad(got.sum(), [x, p["a"], p["bb"], p["bias_delta"], p["dw"], p["uw"]])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g_, w_ in zip(got_grads, want_grads):
        torch.testing.assert_close(g_, w_, rtol=1e-4, atol=1e-4)


def test_compile_fullgraph_with_dropout():
    torch._dynamo.reset()
    x, p = _inputs()

    def fn(x):
        return lora_linear(x, p["w"], p["b"], p["a"], p["bb"], 2.0, 0.3, backend="eager")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y.sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(p["a"].grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason=(
    "compiling the Triton ops needs CUDA: under TRITON_INTERPRET the fake-tensor trace of a triton_op "
    "reaches the interpreter, which reads data pointers"))
@pytest.mark.parametrize("backend", ["triton", "persistent"])
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph_triton_backend(compiler, backend):
    from odelta_fast.ops.backend import kernels

    if backend == "persistent" and not kernels("lora").persistent_available(torch.device("cuda")):
        pytest.skip("the persistent LoRA path needs compute capability 9.0+ and Triton with tensor descriptors")
    torch._dynamo.reset()
    x, p = _inputs()
    # 16-bit rows of 16-byte multiples (K = 24, N = 32), so the persistent path runs its TMA GEMMs
    dtype = torch.float16 if backend == "persistent" else torch.float32
    x = x.detach().cuda().to(dtype).requires_grad_()
    p = {k: v.detach().cuda().to(dtype).requires_grad_(v.requires_grad) for k, v in p.items()}
    want = block(x, p, "triton", backend)
    compiled = torch.compile(lambda x, p: block(x, p, "triton", backend), fullgraph=True, backend=compiler)
    got = compiled(x, p)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    got.sum().backward()
    assert torch.isfinite(x.grad).all()
