"""Compile every kernel launch with the real Triton compiler for an NVIDIA target, without a GPU.

The interpreter accepts code the compiler rejects (tl.dot dims < 16, non-constexpr globals,
...). This script runs the host launchers on CPU tensors with ``wrap_triton`` intercepted and
compiles each launch (every autotune config) down to a cubin with the ptxas bundled in Triton's
wheel, reporting shared memory per kernel. Usage (from the repo root)::

    python tests/ops/compile_for_gpu.py            # all dtypes and shapes, ~4 min cold
    QUICK=1 python tests/ops/compile_for_gpu.py    # fp16 + fp32, one shape each (what CI runs)
    ARCH=80 python tests/ops/compile_for_gpu.py    # another compute capability
"""
import os, sys, itertools, traceback
os.environ.pop("TRITON_INTERPRET", None)
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime.autotuner import Autotuner

TARGET = GPUTarget("cuda", int(os.environ.get("ARCH", "90")), 32)
TY = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64"}
done, failed = set(), []


def compile_one(fn, args, kwargs, cfg_kwargs, num_warps, num_stages):
    names = fn.arg_names
    bound = dict(zip(names, args)); bound.update(kwargs); bound.update(cfg_kwargs)
    sig, consts = {}, {}
    for p in fn.params:
        v = bound[p.name]
        if p.is_constexpr:
            sig[p.name] = "constexpr"; consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = TY[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError((p.name, v))
    key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())), tuple(sorted(sig.items())), num_warps, num_stages)
    if key in done:
        return
    done.add(key)
    try:
        k = triton.compile(triton.compiler.ASTSource(fn, sig, consts), target=TARGET,
                           options={"num_warps": num_warps, "num_stages": num_stages})
        print("ok  ", fn.__name__, {c: consts[c] for c in consts if c.startswith("BLOCK")}, "warps", num_warps,
              "smem", k.metadata.shared)
    except Exception as e:
        failed.append((fn.__name__, consts, repr(e)[:2000]))
        print("FAIL", fn.__name__, consts, repr(e)[:600])


class Fake:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def call(*args, **kwargs):
            kw = dict(kwargs)
            nw = kw.pop("num_warps", 4); ns = kw.pop("num_stages", 3)
            if isinstance(self.kernel, Autotuner):
                for c in self.kernel.configs:
                    compile_one(self.kernel.fn, args, kw, c.kwargs, c.num_warps, c.num_stages)
            else:
                compile_one(self.kernel, args, kw, {}, nw, ns)
        return call


sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
QUICK = os.environ.get("QUICK") == "1"
from odelta_fast.ops.backend import kernels
mods = [kernels(n) for n in ("lora", "adapter", "bias", "merge")]
for m in mods:
    m.wrap_triton = Fake
klora = mods[0]
klora._dropout_keep_kernel = Fake(klora._dropout_keep_kernel)
import odelta_fast.ops as ops

for dtype in (torch.float16, torch.float32) if QUICK else (torch.float16, torch.bfloat16, torch.float32):
    for (M, K, N, r) in [(300, 70, 50, 8)] if QUICK else [(1, 4096, 4096, 16), (8192, 4096, 4096, 1), (300, 70, 50, 64)]:
        x = torch.randn(M, K, dtype=dtype); W = torch.randn(N, K, dtype=dtype); b = torch.randn(N, dtype=dtype)
        A = torch.randn(r, K, dtype=dtype); B = torch.randn(N, r, dtype=dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        for p in (0.0, 0.1):
            y, xa = klora.lora_linear_fwd(x, W, b, A, B, 2.0, p, seed)
            klora.lora_linear_bwd(y, x, W, A, B, xa, 2.0, p, seed, True, True, True)
        klora.lora_shrink_grouped_fwd(x, torch.randn(3, r, K, dtype=dtype), 0.1, seed)
    for bott in (64,) if QUICK else (8, 64, 256):
        h = torch.randn(64, 768, dtype=dtype)
        wd = torch.randn(bott, 768, dtype=dtype); wu = torch.randn(768, bott, dtype=dtype)
        for act in ("gelu_new", "gelu", "silu", "tanh") if QUICK else ("gelu_new", "gelu", "relu", "silu", "tanh", "leakyrelu", "identity"):
            mods[1].adapter_fwd(h, wd, wd[:, 0].contiguous(), wu, wu[:, 0].contiguous(), h, act, 1.0)
            mods[1].adapter_bwd(h, h, wd, wd[:, 0].contiguous(), wu, True, act, 1.0, True, True)
    mods[2].bias_add_fwd(torch.randn(64, 768, dtype=dtype), torch.randn(768, dtype=dtype))
    mods[2].bias_grad(torch.randn(64, 768, dtype=dtype), torch.randn(768, dtype=dtype))
    mods[3].lora_merge_(torch.randn(768, 512, dtype=dtype), torch.randn(8, 512, dtype=dtype), torch.randn(768, 8, dtype=dtype), 1.0, False)
klora.dropout_keep_scale(torch.zeros(1, dtype=torch.int64), (64, 64), 0.1)
print("compiled", len(done), "variants;", len(failed), "failed")
sys.exit(1 if failed else 0)
