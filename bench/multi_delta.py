"""Multi-delta decode and LoRA merge on a GPU: the figures of issue 4.

One projection of hidden 4096 (bf16), 64 sequences decoding one token each, 16 distinct rank-16
LoRA deltas. Times (median of many launches, CUDA events through ``triton.testing.do_bench``):

* ``base``            the frozen layer alone, ``x W^T``;
* ``single/<b>``      base + one delta for every row (the ordinary fused ``ops.lora_linear`` path);
* ``mixed/<b>``       base + 16 deltas mixed across rows (``ops.multi_lora``), per backend
                      (``triton``, ``cuda`` when the extension builds, ``eager`` for reference);
* ``peft_mixed``      PEFT's LoRA layer with 16 adapters and ``adapter_names=`` (its mixed-batch forward,
                      serial sub-batches per adapter), measured in the same run;
* ``merge/<b>``       ``W += s B A`` in place on a 4096 x 4096 bf16 weight, against a device copy of W
                      (same bytes read and written) for the bandwidth ratio.

Targets (H100, bf16): mixed <= 1.3 x single; mixed >= 5 x faster than PEFT; merge >= 80 % of copy
bandwidth. Prints a table and writes JSON under bench/results/. Runs only with CUDA and says so
otherwise.

    python bench/multi_delta.py [--hidden 4096] [--batch 64] [--deltas 16] [--rank 16] [--out bench/results]
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

import torch


def bench(fn, reps_ms: int = 200) -> float:
    """Median milliseconds per call."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=reps_ms, return_mode="median"))


def peft_mixed_layer(weight, factors, names, dtype):
    """PEFT's mixed-batch forward (``adapter_names=``) on the same weights and factors."""
    import peft
    from torch import nn

    class One(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=dtype, device=weight.device)
            self.proj.weight.data.copy_(weight)

        def forward(self, x):
            return self.proj(x)

    model = One()
    r, alpha = factors[0][0].shape[0], 2 * factors[0][0].shape[0]
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, config, adapter_name="d0")
    for i in range(1, len(factors)):
        model.add_adapter(f"d{i}", config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for i, (a, b) in enumerate(factors):
            layer.lora_A[f"d{i}"].weight.copy_(a)
            layer.lora_B[f"d{i}"].weight.copy_(b)
    model.eval()
    return lambda x: model(x, adapter_names=names)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--deltas", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/multi_delta.py needs a CUDA GPU (none visible): nothing measured.")
        return 0

    from odelta_fast import ops
    from odelta_fast.ops import cuda_ext
    from odelta_fast.ops.multi_lora import lora_expand, lora_shrink

    dev, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    H, M, D, R = args.hidden, args.batch, args.deltas, args.rank
    torch.manual_seed(0)
    weight = torch.randn(H, H, device=dev, dtype=dtype) * H ** -0.5
    factors = [(torch.randn(R, H, device=dev, dtype=dtype) * H ** -0.5, torch.randn(H, R, device=dev, dtype=dtype) * 0.1)
               for _ in range(D)]
    stacked_a = torch.stack([a for a, _ in factors]).contiguous()
    stacked_b = torch.stack([b for _, b in factors]).contiguous()
    scal = torch.full((D,), 2.0, device=dev)
    x = torch.randn(M, H, device=dev, dtype=dtype)
    mixed_ids = (torch.arange(M, device=dev) % D)  # every delta used, interleaved (unsorted) rows
    names = [f"d{int(i)}" for i in mixed_ids.tolist()]

    results: dict[str, float] = {}
    results["base"] = bench(lambda: torch.nn.functional.linear(x, weight))
    a0, b0 = factors[0]
    for backend in ("triton", "eager"):
        results[f"single/{backend}"] = bench(
            lambda: ops.lora_linear(x, weight, None, a0, b0, 2.0, 0.0, training=False, backend=backend))

    backends = ["triton", "eager"]
    if cuda_ext.available():
        backends.insert(1, "cuda")
    else:
        print(f"CUDA extension unavailable: {cuda_ext.unavailable_reason()}")

    def mixed(backend, ids):
        def run():
            y = torch.nn.functional.linear(x, weight)
            t = lora_shrink(x, stacked_a, ids, backend=backend)
            return lora_expand(y, t, stacked_b, ids, scal, backend=backend)
        return run

    for backend in backends:
        results[f"mixed/{backend}"] = bench(mixed(backend, mixed_ids))
        results[f"one_id_multi/{backend}"] = bench(mixed(backend, torch.zeros_like(mixed_ids)))
    # Correctness of the measured paths against each other (bf16 tolerance).
    ref = mixed("eager", mixed_ids)()
    for backend in backends[:-1]:
        torch.testing.assert_close(mixed(backend, mixed_ids)(), ref, rtol=3e-2, atol=3e-2)

    try:
        peft_fn = peft_mixed_layer(weight, factors, names, dtype)
        with torch.no_grad():
            results["peft_mixed"] = bench(lambda: peft_fn(x))
    except ImportError:
        print("peft is not installed: PEFT comparison skipped")

    # Merge bandwidth: W read + written once, like a copy of W into another buffer.
    w = torch.randn(H, H, device=dev, dtype=dtype)
    other = torch.empty_like(w)
    results["copy"] = bench(lambda: other.copy_(w))
    for backend in ["triton"] + (["cuda"] if "cuda" in backends else []):
        if backend == "cuda":
            results["merge/cuda"] = bench(lambda: cuda_ext.lora_merge_(w, a0, b0, 1e-3, False))
        else:
            results["merge/triton"] = bench(lambda: ops.lora_merge_(w, a0, b0, 1e-3, backend="triton"))

    gbps = lambda ms: 2 * w.numel() * w.element_size() / (ms * 1e-3) / 1e9  # noqa: E731
    best_mixed = min(v for k, v in results.items() if k.startswith("mixed/") and not k.endswith("eager"))
    ratios = {
        "mixed_over_single": best_mixed / results["single/triton"],
        "mixed_over_base": best_mixed / results["base"],
    }
    if "peft_mixed" in results:
        ratios["peft_over_mixed"] = results["peft_mixed"] / best_mixed
    for key in [k for k in results if k.startswith("merge/")]:
        ratios[f"{key}_bandwidth_vs_copy"] = gbps(results[key]) / gbps(results["copy"])

    print(f"{torch.cuda.get_device_name()}  {args.dtype}  hidden {H}  batch {M}  deltas {D}  rank {R}")
    for key, ms in results.items():
        print(f"  {key:24s} {ms * 1e3:9.1f} us")
    for key, value in ratios.items():
        print(f"  {key:32s} {value:6.2f}")
    print("targets: mixed_over_single <= 1.3, peft_over_mixed >= 5, merge bandwidth >= 0.80 of copy")

    from common import environment, write_record

    record = {
        "benchmark": "multi_delta", "when": dt.datetime.now(dt.timezone.utc).isoformat(),
        "environment": environment(dev), "args": vars(args),
        "times_ms": results, "ratios": ratios,
        "cuda_extension": cuda_ext.unavailable_reason() or "built",
    }
    path = write_record(args.out, f"multi_delta-{record['when'][:19].replace(':', '')}.json", record)
    print(f"wrote {path.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
