"""Kernel benchmarks: LoRA linear, adapter, bias, merge, each against its references.

Providers per op:
  base    the frozen layer alone (the floor a fused delta is measured against)
  eager   odelta_fast's eager op path
  triton  the fused Triton kernels (CUDA only; the CPU interpreter is for correctness, not speed)
  cuda    the CUDA C++ extension where the op has one
  peft    PEFT's LoRA layer (LoRA only)
  copy    a device copy of the same tensor (merge only: the bandwidth ceiling)
"""
from __future__ import annotations

import collections
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from common import Row, check_output, time_ms
from roofline import lora_bytes, lora_extra_passes

from odelta_fast.ops.backend import LORA_PATHS

# "triton" is what backend="auto" runs on a GPU; the LoRA paths can be timed each on their own.
TRITON_PROVIDERS = ("triton", *LORA_PATHS)

LORA_GRIDS = {
    "full": dict(M=[2048, 8192, 16384], KN=[(4096, 4096), (4096, 11008)], r=[8, 16, 64], dropout=[0.0, 0.05]),
    # The target shape only: what a time-boxed first GPU run (bench/gpu_check.sh) measures.
    "headline": dict(M=[8192], KN=[(4096, 4096)], r=[16, 64], dropout=[0.0, 0.05]),
    "small": dict(M=[64, 256], KN=[(128, 128), (128, 352)], r=[8], dropout=[0.0, 0.05]),
}


def _size(small) -> str:
    """Suites take ``small`` as a bool (toy sizes) or a size name (``full``, ``headline``, ``small``)."""
    if isinstance(small, str):
        return small
    return "small" if small else "full"


def _with_check(row: Row, check: dict) -> Row:
    row.extra.update(check)
    return row


def _providers(device: torch.device, wanted: list[str] | None, available: list[str]) -> list[str]:
    from odelta_fast.ops.backend import triton_available

    # Triton providers ("triton", LoRA's paths) are timed on a GPU only; the persistent path on a
    # GPU with TMA only.
    usable = [p for p in available
              if not (p in TRITON_PROVIDERS and (device.type != "cuda" or not triton_available()))
              and not (p == "persistent" and not _persistent_runs(device))]
    return [p for p in usable if wanted is None or p in wanted]


def _persistent_runs(device: torch.device) -> bool:
    from odelta_fast.ops.backend import kernels

    return kernels("lora").persistent_available(device)


def _peft_lora_layer(weight: torch.Tensor, r: int, alpha: float, dropout: float, lora_a=None, lora_b=None):
    """PEFT's LoRA layer over ``weight``, with our factors when given (so its output is checkable)."""
    import peft

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    linear.weight.data.copy_(weight)
    model = torch.nn.Sequential(collections.OrderedDict(proj=linear))
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                                                         target_modules=["proj"], init_lora_weights=False))
    wrapped = wrapped.to(device=weight.device, dtype=weight.dtype)
    if lora_a is not None:
        layer = wrapped.base_model.model.proj
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(lora_a)
            layer.lora_B["default"].weight.copy_(lora_b)
    return wrapped


def _fwd_bwd(fn, x, dy, params):
    def run():
        x.grad = None
        for p in params:
            p.grad = None
        fn(x).backward(dy)
    return run


def _lora_reference(x, w, a, b, scaling, keep):
    """fp32 output of the LoRA layer (keep: the provider's dropout multiplier, or None)."""
    from odelta_fast.ops import lora_linear_reference

    return lora_linear_reference(x.float(), w.float(), None, a.float(), b.float(), scaling,
                                 keep_scale=None if keep is None else keep.float())


def _drawn_keep(provider, p, shape, device, dtype, seed):
    """The dropout multiplier ``provider`` drew right after ``torch.manual_seed(seed)``; None when
    it cannot be reproduced (PEFT's nn.Dropout) or dropout is off."""
    from odelta_fast.ops import lora as lora_op
    from odelta_fast.ops.backend import kernels

    if p == 0.0:
        return None
    torch.manual_seed(seed)
    if provider in TRITON_PROVIDERS:  # every Triton path draws its seed the same way
        dev_seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
        return kernels("lora").dropout_keep_scale(dev_seed, shape, p)
    if provider == "eager":
        return lora_op.dropout_keep_scale(shape, p, int(lora_op.new_dropout_seed().item()), device, dtype)
    return None


def _check_lora(provider, fn, x, w, a, b, dy, params, p, scaling, dtype) -> dict:
    """The provider's output and gradients against fp32 autograd at the same shape and mask."""
    if provider == "base":
        return {"valid": True, "max_rel_err": 0.0, "why_invalid": None}
    keep = _drawn_keep(provider, p, tuple(x.shape), x.device, dtype, seed=1234)
    if p > 0.0 and keep is None:
        return {"valid": None, "max_rel_err": None, "why_invalid": "not checked: its dropout mask is not reproducible"}
    torch.manual_seed(1234)
    x.grad = None
    for q in params:
        q.grad = None
    y = fn(x)
    y.backward(dy)
    got = [y, x.grad] + [q.grad for q in params]
    xr = x.detach().float().requires_grad_()
    ar, br = a.detach().float().requires_grad_(), b.detach().float().requires_grad_()
    ref = _lora_reference(xr, w, ar, br, scaling, keep)
    ref.backward(dy.float())
    want = [ref, xr.grad] + ([ar.grad, br.grad] if params else [])  # PEFT: its own parameters, not checked
    return check_output(got, want, dtype)


def lora_rows(device, dtype, small, providers=None) -> Iterator[Row]:
    from odelta_fast import ops

    grid = LORA_GRIDS[_size(small)]
    # "triton" is what backend="auto" runs (the dispatch table's path); each of LORA_PATHS is timed
    # by name, which is what `run.py --write-dispatch` turns into that table.
    names = _providers(device, providers, ["base", "eager", "triton", *LORA_PATHS, "peft"])
    for (K, N) in grid["KN"]:
        for r in grid["r"]:
            for p in grid["dropout"]:
                for M in grid["M"]:
                    gen = torch.Generator(device=device).manual_seed(0)
                    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
                    w = torch.randn(N, K, device=device, dtype=dtype, generator=gen) / math.sqrt(K)
                    a = (torch.randn(r, K, device=device, dtype=dtype, generator=gen) / math.sqrt(K)).requires_grad_()
                    b = (torch.randn(N, r, device=device, dtype=dtype, generator=gen) / math.sqrt(r)).requires_grad_()
                    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
                    es = x.element_size()
                    shape = {"M": M, "K": K, "N": N, "r": r, "dropout": p}
                    for provider in names:
                        if provider == "base":
                            fn, params, flops_lora = (lambda t: F.linear(t, w)), [], 0
                        elif provider == "peft":
                            layer = _peft_lora_layer(w, r, 2 * r, p, a.detach(), b.detach()).train()
                            params = [q for q in layer.parameters() if q.requires_grad]
                            fn, flops_lora = layer, 1
                        else:
                            fn = (lambda t, prov=provider: ops.lora_linear(t, w, None, a, b, 2.0, p, backend=prov))
                            params, flops_lora = [a, b], 1
                        # peft's alpha = 2r makes its scaling 2.0, like ours.
                        check = _check_lora(provider, fn, x, w, a, b, dy, params if provider != "peft" else [],
                                            p, 2.0, dtype)
                        fwd_flops = 2 * M * N * K + flops_lora * (2 * M * K * r + 2 * M * N * r)
                        bwd_flops = 2 * M * N * K + flops_lora * (4 * M * N * r + 4 * M * K * r)
                        with torch.no_grad():
                            t = time_ms(lambda: fn(x), device, reps=20 if device.type != "cuda" else 100)
                        row = Row("lora", provider, "fwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"],
                                  fwd_flops, lora_bytes(provider, M, K, N, r, es, p, "fwd"),
                                  {"extra_passes": lora_extra_passes(provider, p, "fwd")})
                        yield _with_check(row, check)
                        t = time_ms(_fwd_bwd(fn, x, dy, params), device, reps=20 if device.type != "cuda" else 100)
                        row = Row("lora", provider, "fwd+bwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"],
                                  t["ms_p80"], fwd_flops + bwd_flops, lora_bytes(provider, M, K, N, r, es, p, "fwd+bwd"),
                                  {"extra_passes": lora_extra_passes(provider, p, "fwd+bwd")})
                        yield _with_check(row, check)


def _check_against_eager(provider, run, eager_run, dtype) -> dict:
    """Compare what ``run()`` returns with ``eager_run()`` (fp32 eager at the same shape)."""
    if provider in ("eager", "base", "copy"):
        return {"valid": True, "max_rel_err": 0.0, "why_invalid": None}
    return check_output(run(), eager_run(), dtype)


def _grads(fn, inputs, dy):
    for t in inputs:
        t.grad = None
    out = fn(inputs[0])
    out.backward(dy)
    return [out.detach().clone()] + [t.grad.detach().clone() for t in inputs]


def adapter_rows(device, dtype, small, providers=None) -> Iterator[Row]:
    from odelta_fast import ops

    size = _size(small)
    d, bottleneck = (128, 16) if size == "small" else (4096, 64)
    names = _providers(device, providers, ["eager", "triton"])
    for M in {"small": [64, 256], "headline": [8192], "full": [2048, 8192, 16384]}[size]:
        gen = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(M, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        down = (torch.randn(bottleneck, d, device=device, dtype=dtype, generator=gen) / math.sqrt(d)).requires_grad_()
        up = (torch.randn(d, bottleneck, device=device, dtype=dtype, generator=gen) / math.sqrt(bottleneck)).requires_grad_()
        db = torch.zeros(bottleneck, device=device, dtype=dtype, requires_grad=True)
        ub = torch.zeros(d, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, d, device=device, dtype=dtype, generator=gen)
        es = h.element_size()
        flops = 4 * M * d * bottleneck
        tensors = [h, down, up, db, ub]
        fp32 = [t.detach().float().requires_grad_() for t in tensors]

        def eager32():
            return _grads(lambda t: ops.adapter_bottleneck(t, fp32[1], fp32[3], fp32[2], fp32[4], residual=t,
                                                           backend="eager"), fp32, dy.float())
        for provider in names:
            fn = (lambda t, prov=provider: ops.adapter_bottleneck(t, down, db, up, ub, residual=t, backend=prov))
            check = _check_against_eager(provider, lambda: _grads(fn, tensors, dy), eager32, dtype)
            shape = {"M": M, "d": d, "bottleneck": bottleneck}
            with torch.no_grad():
                t = time_ms(lambda: fn(h), device)
            yield _with_check(Row("adapter", provider, "fwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"],
                                  t["ms_p80"], flops, 2 * M * d * es), check)
            t = time_ms(_fwd_bwd(fn, h, dy, [down, up, db, ub]), device)
            yield _with_check(Row("adapter", provider, "fwd+bwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"],
                                  t["ms_p80"], 3 * flops, 5 * M * d * es), check)


def bias_rows(device, dtype, small, providers=None) -> Iterator[Row]:
    from odelta_fast import ops

    size = _size(small)
    N = 128 if size == "small" else 4096
    names = _providers(device, providers, ["eager", "triton"])
    for M in {"small": [64, 256], "headline": [8192], "full": [2048, 8192, 16384]}[size]:
        y = torch.randn(M, N, device=device, dtype=dtype).requires_grad_()
        bias = torch.zeros(N, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(M, N, device=device, dtype=dtype)
        es = y.element_size()
        y32, b32 = y.detach().float().requires_grad_(), bias.detach().float().requires_grad_()
        for provider in names:
            fn = (lambda t, prov=provider: ops.bias_add(t, bias, backend=prov))
            check = _check_against_eager(provider, lambda: _grads(fn, [y, bias], dy),
                                         lambda: _grads(lambda t: ops.bias_add(t, b32, backend="eager"), [y32, b32],
                                                        dy.float()), dtype)
            with torch.no_grad():
                t = time_ms(lambda: fn(y), device, graph=True)
            yield _with_check(Row("bias", provider, "fwd", {"M": M, "N": N}, str(dtype)[6:], t["ms"], t["ms_p20"],
                                  t["ms_p80"], M * N, 2 * M * N * es), check)
            t = time_ms(_fwd_bwd(fn, y, dy, [bias]), device)
            yield _with_check(Row("bias", provider, "fwd+bwd", {"M": M, "N": N}, str(dtype)[6:], t["ms"], t["ms_p20"],
                                  t["ms_p80"], 2 * M * N, 3 * M * N * es), check)


def merge_rows(device, dtype, small, providers=None) -> Iterator[Row]:
    from odelta_fast import ops

    size = _size(small)
    names = _providers(device, providers, ["copy", "eager", "triton", "cuda"])
    if "cuda" in names:
        from odelta_fast.ops.merge import merge_backends

        if "cuda" not in merge_backends() or device.type != "cuda":
            names.remove("cuda")
    for (N, K) in ([(128, 128)] if size == "small" else [(4096, 4096)] if size == "headline"
                   else [(4096, 4096), (11008, 4096)]):
        for r in ([8] if size == "small" else [16, 64]):
            w = torch.randn(N, K, device=device, dtype=dtype)
            a = torch.randn(r, K, device=device, dtype=dtype) / math.sqrt(K)
            b = torch.randn(N, r, device=device, dtype=dtype) / math.sqrt(r)
            es = w.element_size()
            moved = 2 * N * K * es + (N * r + r * K) * es

            def merged(prov):
                fresh = w.clone()
                ops.lora_merge_(fresh, a, b, 0.5, backend=prov)
                return fresh

            want32 = w.float() + 0.5 * (b.float() @ a.float())
            for provider in names:
                check = ({"valid": True, "max_rel_err": 0.0, "why_invalid": None} if provider == "copy"
                         else check_output(merged(provider), want32, dtype))
                if provider == "copy":
                    dst = torch.empty_like(w)
                    t = time_ms(lambda: dst.copy_(w), device, graph=True)
                else:
                    t = time_ms(lambda prov=provider: ops.lora_merge_(w, a, b, 1e-3, backend=prov), device, graph=True)
                yield _with_check(Row("merge", provider, "merge", {"N": N, "K": K, "r": r}, str(dtype)[6:], t["ms"],
                                      t["ms_p20"], t["ms_p80"], 2 * N * K * r + N * K, moved), check)


def multi_rows(device, dtype, small, providers=None) -> Iterator[Row]:
    """Decode with many deltas: one token per sequence, each sequence its own delta ("mixed"),
    against the same batch with one delta through the ordinary fused LoRA op ("one delta")."""
    from multi_delta import peft_mixed_layer

    from odelta_fast import ops
    from odelta_fast.ops import cuda_ext
    from odelta_fast.ops.multi_lora import lora_expand, lora_shrink

    H, M, D, R = (128, 8, 4, 8) if _size(small) == "small" else (4096, 64, 16, 16)
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(H, H, device=device, dtype=dtype, generator=gen) / math.sqrt(H)
    factors = [(torch.randn(R, H, device=device, dtype=dtype, generator=gen) / math.sqrt(H),
                torch.randn(H, R, device=device, dtype=dtype, generator=gen) * 0.1) for _ in range(D)]
    stacked_a = torch.stack([a for a, _ in factors]).contiguous()
    stacked_b = torch.stack([b for _, b in factors]).contiguous()
    scalings = torch.full((D,), 2.0, device=device)
    x = torch.randn(M, H, device=device, dtype=dtype, generator=gen)
    ids = torch.arange(M, device=device) % D  # every delta used, rows interleaved (unsorted)
    es = x.element_size()
    flops = 2 * M * H * H + 4 * M * H * R
    moved = (H * H + 2 * M * H + D * 2 * H * R) * es
    base = lambda: F.linear(x, weight)  # noqa: E731

    def mixed(backend):
        def run():
            y = F.linear(x, weight)
            return lora_expand(y, lora_shrink(x, stacked_a, ids, backend=backend), stacked_b, ids, scalings,
                               backend=backend)
        return run

    a0, b0 = factors[0]
    runs = {("mixed", "base"): base, ("one delta", "base"): base}
    for backend in _providers(device, providers, ["eager", "triton", "cuda"]):
        if backend == "cuda" and (device.type != "cuda" or not cuda_ext.available()):
            continue
        runs[("mixed", backend)] = mixed(backend)
        if backend != "cuda":
            runs[("one delta", backend)] = (lambda b=backend: ops.lora_linear(x, weight, None, a0, b0, 2.0, 0.0,
                                                                             training=False, backend=b))
    if "peft" in _providers(device, providers, ["peft"]):
        peft_fn = peft_mixed_layer(weight, factors, [f"d{int(i)}" for i in ids.tolist()], dtype)
        runs[("mixed", "peft")] = lambda: peft_fn(x)
    want = {"mixed": mixed("eager")(),
            "one delta": ops.lora_linear(x, weight, None, a0, b0, 2.0, 0.0, training=False, backend="eager")}
    for (batch, provider), fn in runs.items():
        with torch.no_grad():
            check = ({"valid": True, "max_rel_err": 0.0, "why_invalid": None} if provider in ("base", "eager")
                     else check_output(fn(), want[batch], dtype))
            t = time_ms(fn, device, graph=provider != "peft")
        yield _with_check(Row("multi", provider, "decode", {"M": M, "H": H, "deltas": D, "r": R, "batch": batch},
                              str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"], flops, moved), check)


class _Holder(torch.nn.Module):
    """A backbone of one module, so deltas and PEFT address it by name."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def _moe_experts(H, I, E, device, dtype):
    import transformers

    config = transformers.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=8,
                                         num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
                                         vocab_size=128)
    # grouped_mm: transformers 5.24's default experts implementation (what PEFT wraps); on CPU it also
    # avoids the eager loop's index_add_, measured ~0.1 s per call on a shared 2-core machine.
    config._experts_implementation = "grouped_mm"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        experts = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeExperts(config)
        for p in experts.parameters():
            torch.nn.init.normal_(p, std=0.02)
    return experts.to(device=device, dtype=dtype).requires_grad_(False)


def moe_rows(device, dtype, small: bool, providers=None) -> Iterator[Row]:
    """LoRA on every expert of a MoE layer (gate_up_proj and down_proj, one (A, B) per expert),
    fwd+bwd (input and LoRA gradients): ours (grouped low-rank over routed tokens) against PEFT's
    target_parameters and the frozen layer. Issue target: >= 1.5x PEFT at 128 experts, hidden
    2048, expert width 768, r = 16, 4096 tokens, top-8, bf16."""
    import peft

    from odelta_fast import LoraModel

    T, H, I, E, k, r = (128, 64, 32, 8, 2, 4) if small else (4096, 2048, 768, 128, 8, 16)
    targets = ["experts.gate_up_proj", "experts.down_proj"]
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(T, H, device=device, dtype=dtype, generator=gen).requires_grad_()
    logits = torch.randn(T, E, device=device, generator=gen)
    top_w, top_i = logits.softmax(-1).topk(k, dim=-1)
    top_w = (top_w / top_w.sum(-1, keepdim=True)).to(dtype)
    dy = torch.randn(T, H, device=device, dtype=dtype, generator=gen)
    es = x.element_size()
    S = T * k
    base_flops = 2 * S * H * 2 * I + 2 * S * I * H
    lora_flops = 2 * S * r * (H + 2 * I) + 2 * S * r * (I + H)
    weight_bytes = 3 * E * H * I * es
    shape = {"tokens": T, "experts": E, "H": H, "I": I, "top_k": k, "r": r}
    for provider in _providers(device, providers, ["base", "eager", "triton", "peft"]):
        holder = _Holder(experts=_moe_experts(H, I, E, device, dtype))
        if provider == "peft":
            config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=targets,
                                     init_lora_weights=False)
            holder = peft.get_peft_model(holder, config).base_model.model
            params = [p for p in holder.parameters() if p.requires_grad]
        elif provider != "base":
            delta = LoraModel(holder, lora_r=r, lora_alpha=2 * r, modified_modules=[], target_parameters=targets,
                              backend=provider)
            for p in delta.parameters():
                torch.nn.init.normal_(p, std=0.02)
            params = list(delta.parameters())
        else:
            params = []
        layer = holder.experts
        fn = (lambda t, layer=layer: layer(t, top_i, top_w))
        flops = base_flops + (lora_flops if provider != "base" else 0)
        with torch.no_grad():
            t = time_ms(lambda: fn(x), device, reps=10 if device.type != "cuda" else 100)
        yield Row("moe", provider, "fwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"],
                  flops, weight_bytes + 2 * S * H * es)
        t = time_ms(_fwd_bwd(fn, x, dy, params), device, reps=10 if device.type != "cuda" else 100)
        yield Row("moe", provider, "fwd+bwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"],
                  3 * flops, 2 * weight_bytes + 6 * S * H * es)


def qlora_rows(device, dtype, small: bool, providers=None) -> Iterator[Row]:
    """LoRA on a bitsandbytes nf4 (double-quantized) Linear, fwd+bwd: ours (bitsandbytes' matmul
    plus the low-rank update beside it) against PEFT's QLoRA layer and the frozen 4-bit layer.
    Issue target: step time no worse than PEFT's."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        print("qlora: bitsandbytes is not installed; suite skipped")
        return
    import peft

    from odelta_fast import LoraModel

    M, K, N, r = (256, 128, 128, 8) if small else (8192, 4096, 4096, 16)
    gen = torch.Generator(device=device).manual_seed(0)
    dense = torch.randn(N, K, device=device, dtype=dtype, generator=gen) / math.sqrt(K)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    es = x.element_size()

    def quantized():
        layer = bnb.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(dense.detach().cpu().float(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        return layer.to(device).train()

    shape = {"M": M, "K": K, "N": N, "r": r}
    for provider in _providers(device, providers, ["base", "eager", "peft"]):
        holder = _Holder(proj=quantized())
        if provider == "peft":
            holder.is_loaded_in_4bit = True  # what PEFT's dispatcher reads off a transformers model
            wrapped = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                                  init_lora_weights=False))
            holder = wrapped.base_model.model
            params = [p for p in holder.parameters() if p.requires_grad]
        elif provider == "eager":
            delta = LoraModel(holder, lora_r=r, lora_alpha=2 * r, modified_modules=["proj"])
            for p in delta.parameters():
                torch.nn.init.normal_(p, std=0.02)
            params = list(delta.parameters())
        else:
            params = []
        fn = holder.proj
        flops = 2 * M * N * K + (2 * M * r * (K + N) if provider != "base" else 0)
        moved = N * K // 2 + (M * K + M * N) * es  # 4-bit weight: half a byte per element
        with torch.no_grad():
            t = time_ms(lambda: fn(x), device, reps=10 if device.type != "cuda" else 100)
        yield Row("qlora", provider, "fwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"], flops, moved)
        t = time_ms(_fwd_bwd(fn, x, dy, params), device, reps=10 if device.type != "cuda" else 100)
        yield Row("qlora", provider, "fwd+bwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"],
                  2 * flops, 2 * moved)


def dora_rows(device, dtype, small: bool, providers=None) -> Iterator[Row]:
    """DoRA on a Linear, fwd+bwd: ours (``dora_linear``: ``lora_linear`` plus row norms without
    forming ``W + sBA`` and one scale pass) against our plain LoRA, PEFT's DoRA and the frozen
    layer. Issue targets: <= 1.25x our LoRA, >= 1.5x faster than PEFT's DoRA."""
    import peft

    from odelta_fast import LoraModel

    M, K, N, r = (256, 128, 128, 8) if small else (8192, 4096, 4096, 16)
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(M, K, device=device, dtype=dtype, generator=gen).requires_grad_()
    dy = torch.randn(M, N, device=device, dtype=dtype, generator=gen)
    es = x.element_size()
    shape = {"M": M, "K": K, "N": N, "r": r}
    for provider in _providers(device, providers, ["base", "lora", "eager", "peft"]):
        holder = _Holder(proj=torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype))
        holder.proj.weight.requires_grad_(False)
        if provider == "peft":
            wrapped = peft.get_peft_model(holder, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"],
                                                                  use_dora=True, init_lora_weights=False))
            holder = wrapped.base_model.model
            params = [p for p in holder.parameters() if p.requires_grad]
        elif provider in ("lora", "eager"):
            delta = LoraModel(holder, lora_r=r, lora_alpha=2 * r, modified_modules=["proj"],
                              use_dora=provider == "eager")
            with torch.no_grad():
                for slot in delta.slots:
                    slot.delta.lora_B.normal_(std=0.02)
            params = list(delta.parameters())
        else:
            params = []
        fn = holder.proj
        lowrank = 2 * M * r * (K + N) if provider != "base" else 0
        norm = 2 * N * K * r if provider in ("eager", "peft") else 0  # W A^T (ours) / W + sBA (PEFT)
        flops = 2 * M * N * K + lowrank + norm
        moved = N * K * es + (M * K + M * N) * es + (M * N * es if provider in ("eager", "peft") else 0)
        t = time_ms(_fwd_bwd(fn, x, dy, params), device, reps=10 if device.type != "cuda" else 100)
        yield Row("dora", provider, "fwd+bwd", shape, str(dtype)[6:], t["ms"], t["ms_p20"], t["ms_p80"],
                  2 * flops + 2 * M * N * K, 2 * moved)


SUITES = {"lora": lora_rows, "adapter": adapter_rows, "bias": bias_rows, "merge": merge_rows, "multi": multi_rows,
          "moe": moe_rows, "qlora": qlora_rows, "dora": dora_rows}
