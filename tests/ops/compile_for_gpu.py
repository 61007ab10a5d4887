"""Compile every kernel launch as a GPU would, without a GPU, and check its resources.

The interpreter accepts code the compiler rejects (tl.dot dims < 16, non-constexpr globals, ...),
and a kernel compiled without the launch-time specialization is not the kernel a GPU runs: a real
launch marks pointers and sizes that are 16-byte aligned / divisible by 16 and turns sizes and
strides equal to 1 into constants, which is what lets the compiler vectorize loads and build a
``cp.async`` pipeline (the forward's 128 x 256 config: 48 KB of shared memory without it, 144 KB and
3 stages with it). This script runs the host launchers on CPU tensors with ``Tuning.launch``
intercepted, and compiles every config of every launch with the specialization Triton's own
launcher derives from those arguments, for each target, down to a cubin (ptxas ``-v`` for
registers and spills).

It fails (exit 1) when a config that the kernel's autotuner can choose for a dtype on a target
exceeds that target's shared memory per block, or spills registers in fp16/bf16 (fp32 spills are
listed as notes: the fp32 kernels serve exactness, not speed); a config above the limit passes
only if the kernel's ``prune`` removes it for that dtype and target, and then the prune's
shared-memory bound must be at least what the compiler allocates (so the pruning is provably
right, not a guess). Any compile error fails. With ``--table PATH`` it writes the per kernel and config table (registers,
shared memory, spills, wgmma, cp.async) as markdown.

    python tests/ops/compile_for_gpu.py                      # sm_90 + sm_80, fp16/bf16/fp32
    python tests/ops/compile_for_gpu.py --table bench/results/kernel-resources.md
    python tests/ops/compile_for_gpu.py --arch 90 --dtypes fp16 --jobs 2
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Shared memory per block (opt-in maximum) of the targets checked.
SMEM_LIMIT = {90: 232448, 80: 166912}
TARGET_NAME = {90: "H100 (sm_90a)", 80: "A100 (sm_80)"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Job:
    """One compile: a kernel, one of its configs, the specialization of one launch."""

    tuning: str
    kernel: str
    config: str
    config_index: int
    num_warps: int
    num_stages: int
    dtype: str
    arch: int
    variant: str
    signature: dict
    constexprs: dict
    attrs: dict
    choosable: bool = True
    smem_bound: int | None = None


@dataclass
class Result:
    job: Job
    ok: bool
    error: str = ""
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    wgmma: bool = False
    cp_async: bool = False
    tma: bool = False
    seconds: float = 0.0


# Kernels by name: compile workers are forked after collection and find them here.
_FNS: dict = {}


# ----------------------------------------------------------------------------- specialization
def _specializer(backend):
    """Triton's own launch-time specialization of one argument: (type, attribute)."""
    try:
        from triton._C.libtriton import native_specialize_impl

        return lambda value, param: native_specialize_impl(
            backend, value, param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment)
    except ImportError:  # Triton without the native binder: the same rules, written out
        def spec(value, param):
            if value is None:
                return "constexpr", None
            if isinstance(value, bool):
                return "u1", None
            if isinstance(value, int):
                if value == 1 and not param.do_not_specialize:
                    return "constexpr", 1
                ty = "i32" if -2**31 <= value < 2**31 else "i64"
                return ty, "D" if value % 16 == 0 and not param.do_not_specialize else ""
            if isinstance(value, float):
                return "fp32", None
            if isinstance(value, torch.Tensor):
                ty = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                      torch.int64: "*i64", torch.int32: "*i32"}[value.dtype]
                return ty, "D" if value.data_ptr() % 16 == 0 else ""
            raise TypeError(f"cannot specialize {type(value)}")
        return spec


def specialize(fn, bound: dict, backend):
    spec = _specializer(backend)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        value = bound[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, attr = spec(value, param)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = attr
        elif isinstance(attr, str):
            attrs[(i,)] = backend.parse_attr(attr)
    return signature, constexprs, attrs


# ----------------------------------------------------------------------------- compiling
def _ptxas(arch: int) -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(arch).path
    except TypeError:  # older Triton: no arch argument
        return nv.get_ptxas().path
    except AttributeError:  # pragma: no cover
        return shutil.which("ptxas") or "ptxas"


def _ptxas_extra_flags() -> list[str]:
    """The flags Triton's own ptxas call adds that change register allocation."""
    from triton.backends.nvidia import compiler as nv

    try:
        source = inspect.getsource(nv.CUDABackend.make_cubin)
    except (OSError, TypeError):  # pragma: no cover
        return []
    return [flag for flag in ("--regAllocOptLevel=2",) if flag in source]


def _run_ptxas(ptx: str, arch: int) -> tuple[int, str]:
    arch_name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([_ptxas(arch), "-v", *_ptxas_extra_flags(), f"--gpu-name={arch_name}", str(src),
                               "-o", str(Path(tmp) / "k.cubin")], capture_output=True, text=True)
    return proc.returncode, proc.stdout + proc.stderr


def compile_job(job: Job) -> Result:
    start = time.perf_counter()
    import contextlib
    import io

    from triton.compiler.compiler import ASTSource, make_backend

    target = GPUTarget("cuda", job.arch, 32)
    backend = make_backend(target)
    options = backend.parse_options({"num_warps": job.num_warps, "num_stages": job.num_stages})
    captured = io.StringIO()
    try:
        # Triton prints its own ptxas -v log when asked (a compile, not a cache hit): one ptxas run.
        with _ptxas_log_printed(), contextlib.redirect_stdout(captured):
            kernel = triton.compile(ASTSource(_FNS[job.tuning], job.signature, job.constexprs, job.attrs),
                                    target=target, options=options.__dict__)
    except Exception as err:  # noqa: BLE001 - every compiler error is a finding
        return Result(job, False, error=f"{type(err).__name__}: {str(err)[:1500]}", seconds=time.perf_counter() - start)
    ptx = kernel.asm["ptx"]
    result = Result(job, True, smem=int(kernel.metadata.shared), wgmma="wgmma.mma_async" in ptx,
                    cp_async=re.search(r"cp\.async\.c[ag]", ptx) is not None, tma="cp.async.bulk.tensor" in ptx)
    log = captured.getvalue()
    if "registers" not in log:
        rc, log = _run_ptxas(ptx, job.arch)
        if rc != 0:
            return Result(job, False, error=f"ptxas failed: {log[-1500:]}", seconds=time.perf_counter() - start)
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    result.registers = int(regs.group(1)) if regs else -1
    result.spill_stores, result.spill_loads = (int(spills.group(1)), int(spills.group(2))) if spills else (0, 0)
    result.seconds = time.perf_counter() - start
    return result


@contextlib.contextmanager
def _ptxas_log_printed():
    try:
        from triton import knobs
    except ImportError:  # older Triton: ptxas is run separately
        yield
        return
    old = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        knobs.nvidia.dump_ptxas_log = old


# ----------------------------------------------------------------------------- collecting launches
def collect_jobs(archs, dtypes, quick: bool = False) -> list[Job]:
    """Run the launchers on CPU tensors; every launch becomes one Job per (config, target).
    ``quick`` (CI): the aligned shape (the largest specialization) and, in fp16, the odd one; one
    activation; no compile of a config its prune removes unless its shared-memory bound needs
    checking (on the aligned launch)."""
    from odelta_fast.ops.backend import kernels

    common = kernels("common")
    mods = {name: kernels(name) for name in ("lora", "adapter", "bias", "merge", "multi_lora", "experts_lora")}
    jobs: list[Job] = []
    seen = set()
    state = {"dtype": None, "variant": None, "quick": quick}

    def intercept(tuning, grid, *args, **kwargs):
        fn = tuning.kernel
        for arch in archs:
            if arch < tuning.min_arch:
                continue  # never launched there (the launcher checks the capability)
            from triton.compiler.compiler import make_backend

            backend = make_backend(GPUTarget("cuda", arch, 32))
            choosable = set(range(len(tuning.gpu)))
            if tuning.prune is not None:
                choosable = _choosable(common, tuning, args, kwargs, arch)
            for index, config in enumerate(tuning.gpu):
                if quick and index not in choosable and (tuning.smem_bound is None or state["variant"] != "aligned"):
                    continue  # a pruned config's shared-memory bound is checked on the aligned launch
                bound = dict(zip(fn.arg_names, args))
                bound.update(kwargs)
                bound.update(config.kwargs)
                signature, constexprs, attrs = specialize(fn, bound, backend)
                key = (tuning.name, index, arch, tuple(sorted(signature.items())),
                       tuple(sorted((k, str(v)) for k, v in constexprs.items())),
                       tuple(sorted((k, str(v)) for k, v in attrs.items())), config.num_warps, config.num_stages)
                if key in seen:
                    continue
                seen.add(key)
                _FNS[tuning.name] = fn
                jobs.append(Job(
                    tuning=tuning.name, kernel=fn.fn.__name__, config=common.config_id(config), config_index=index,
                    num_warps=config.num_warps, num_stages=config.num_stages, dtype=state["dtype"], arch=arch,
                    variant=state["variant"], signature=signature, constexprs=constexprs, attrs=attrs,
                    choosable=index in choosable,
                    smem_bound=(tuning.smem_bound(config, dict(zip(fn.arg_names, args)), kwargs)
                                if tuning.smem_bound is not None else None),
                ))

    common.Tuning.launch = lambda self, grid, *a, **k: intercept(self, grid, *a, **k)
    for dname in dtypes:
        state["dtype"] = dname
        _drive(mods, DTYPES[dname], state)
    return jobs


def _choosable(common, tuning, args, kwargs, arch) -> set[int]:
    """Indices of the configs ``tuning.prune`` keeps on ``arch`` for some token count."""
    named = dict(zip(tuning.kernel.arg_names, args))
    kept = set()
    saved = common.max_shared_memory
    common.max_shared_memory = lambda device: SMEM_LIMIT[arch]
    try:
        for m_bucket in (16, 8192):
            if "M_BUCKET" in named:
                named["M_BUCKET"] = m_bucket
            for config in tuning.prune(tuning.gpu, named, **kwargs):
                kept.add(next(i for i, c in enumerate(tuning.gpu) if c is config))
    finally:
        common.max_shared_memory = saved
    return kept


def _drive(mods, dtype, state):
    """The launches to compile: the benchmark-like aligned shape (every size divisible by 16:
    the largest specialization), an odd shape, a single token (M = 1 becomes a constant) and the
    aligned shape at r = 16 (shared memory a small rank leaves to other uses, e.g. the dropout mask)."""
    lora, adapter, bias, merge, multi = (mods[n] for n in ("lora", "adapter", "bias", "merge", "multi_lora"))
    seed = torch.zeros(1, dtype=torch.int64)

    def rnd(*shape):
        return torch.randn(*shape).to(dtype)

    shapes = (("aligned", (256, 512, 512, 64)), ("odd", (130, 200, 100, 8)), ("M=1", (1, 512, 512, 64)),
              ("r=16", (256, 512, 512, 16)))
    if state["quick"]:
        # the aligned launch at r = 64 (the rank that takes the most registers and shared memory),
        # and in fp16 the odd one (no vectorised loads: where pipelined tiles spill)
        shapes = shapes[:2] if dtype == torch.float16 else shapes[:1]
    for variant, (M, K, N, r) in shapes:
        state["variant"] = variant
        x, w, b = rnd(M, K), rnd(N, K), rnd(N)
        a, bb = rnd(r, K), rnd(N, r)
        for p in (0.0, 0.1):
            for forward, backward in ((lora.fused_forward, lora.fused_backward),
                                      (lora.split_forward, lora.split_backward),
                                      (lora.persistent_forward, lora.persistent_backward)):
                y, xs, bits = forward(x, w, b, a, bb, 2.0, p, seed)
                bits = lora.new_bits(M, K, "cpu") if p > 0 else bits
                backward(rnd(M, N), x, w, a, bb, rnd(M, r), bits, 2.0, p, True, True, True)
        if variant in ("M=1", "r=16"):
            continue
        lora.lora_shrink_grouped_fwd(x, rnd(3, r, K), 0.1, seed)
        for bottleneck in (64, 256):
            wd, wu = rnd(bottleneck, K), rnd(K, bottleneck)
            pre = torch.randn(M, max(16, triton.next_power_of_2(bottleneck)))
            # gelu_new (tanh from exp) and gelu (erf) take the most registers of the activations.
            for act in ("gelu_new",) if state["quick"] else ("gelu_new", "gelu"):
                adapter.adapter_fwd(x, wd, wd[:, 0].contiguous(), wu, wu[:, 0].contiguous(), x, act, 1.0, True)
                adapter.adapter_bwd(rnd(M, K), x, pre, wd, wu, True, True, act, 1.0, True, True)
        bias.bias_add_fwd(rnd(M, N), rnd(N))
        bias.bias_grad(rnd(M, N), rnd(N))
        merge.lora_merge_(rnd(N, K), rnd(r, K), rnd(N, r), 1.0, False)
        merge.lora_merge_(rnd(N, K), rnd(64, K), rnd(N, 64), 1.0, False)
        D = 4
        ids = torch.arange(M) % D
        sa, sb = rnd(D, r, K), rnd(D, N, r)
        multi.shrink_rows(x, sa, ids, 2)
        multi.expand_rows(rnd(M, N), torch.randn(M, r), sb, ids, torch.ones(D))
        order, starts, counts = torch.arange(M), torch.zeros(D, dtype=torch.int64), torch.full((D,), M // D)
        multi.shrink_segments(x, sa, order, starts, counts)
        multi.expand_segments(rnd(M, N), torch.randn(M, r), sb, order, starts, counts, torch.ones(D))
        # MoE experts: the same segments, one (A, B) per expert, and the factor gradients
        experts = mods["experts_lora"]
        t = experts.shrink(x, sa, starts, counts)
        experts.expand_(rnd(M, N), t, sb, starts, counts, 2.0)
        experts.segment_outer(rnd(M, N), t, starts, counts)
        experts.segment_outer(rnd(M, N), x, starts, counts)
    state["variant"] = "aligned"
    lora.dropout_bits(seed, 64, 64, 0.1)


# ----------------------------------------------------------------------------- verdicts and table
# Spilling fails only the dtypes training runs in; an fp32 config that spills is listed, not failed
# (the fp32 kernels exist for exactness checks, not speed).
SPILL_CHECKED = ("fp16", "bf16")


def verdicts(results: list[Result]) -> tuple[list[str], list[str]]:
    """(problems that fail the check, notes that are only reported)."""
    problems, notes = [], []
    for res in results:
        job = res.job
        where = f"{job.kernel} [{job.config}] {job.dtype} sm_{job.arch} ({job.variant})"
        if not res.ok:
            problems.append(f"{where}: does not compile: {res.error}")
            continue
        if job.smem_bound is not None and res.smem > job.smem_bound:
            problems.append(f"{where}: {res.smem} B of shared memory exceeds the prune's bound {job.smem_bound} B")
        if not job.choosable:
            continue
        if res.smem > SMEM_LIMIT[job.arch]:
            problems.append(f"{where}: {res.smem} B of shared memory > {SMEM_LIMIT[job.arch]} B on "
                            f"{TARGET_NAME[job.arch]}, and the autotuner may choose it")
        if res.spill_stores or res.spill_loads:
            (problems if job.dtype in SPILL_CHECKED else notes).append(
                f"{where}: spills registers ({res.registers} registers, {res.spill_stores} B spill "
                f"stores, {res.spill_loads} B spill loads), and the autotuner may choose it")
    return problems, notes


def table(results: list[Result]) -> str:
    from triton.backends.nvidia import compiler as nv

    ptxas_versions = {}
    for arch in sorted({r.job.arch for r in results}):
        out = subprocess.run([_ptxas(arch), "--version"], capture_output=True, text=True).stdout.strip()
        ptxas_versions[arch] = out.splitlines()[-1] if out else "?"
    del nv
    lines = [
        "# Kernel resources per config (generated, do not edit)",
        "",
        "Generated by `python tests/ops/compile_for_gpu.py --table bench/results/kernel-resources.md`: every "
        "config of every Triton kernel, compiled without a GPU with the specialization a real launch gets "
        f"(Triton {triton.__version__}, torch {torch.__version__.split('+')[0]}; "
        + "; ".join(f"sm_{a}: ptxas {v}" for a, v in ptxas_versions.items()) + "). "
        "Shapes: `aligned` = every size a multiple of 16 (like the benchmark shapes: the largest "
        "specialization), `odd` = K and N not multiples of 16, `M=1` = one token (a constant), `r=16` = the "
        "aligned shape at rank 16 (the other variants use r = 64, which takes the most registers). "
        "Rows are the widest variant of each kernel, config, dtype and target (most registers; "
        "dropout, bias and activation variants folded). `choosable` = the autotuner may pick the "
        "config for that dtype on that target (others are pruned by shared memory or registers). "
        f"Limits: shared memory per block {SMEM_LIMIT[90]} B (H100), {SMEM_LIMIT[80]} B (A100); "
        "registers 255 per thread.",
        "",
        "| kernel | config | dtype | target | choosable | registers | spill stores / loads (B) | shared memory (B) "
        "| wgmma | cp.async | TMA | variants |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict = {}
    for res in results:
        j = res.job
        groups.setdefault((j.kernel, j.config_index, j.config, j.dtype, j.arch), []).append(res)
    order = {"fp16": 0, "bf16": 1, "fp32": 2}
    for key in sorted(groups, key=lambda k: (k[0], k[1], order.get(k[3], 9), -k[4])):
        rows = groups[key]
        worst = max(rows, key=lambda r: (not r.ok, r.spill_stores + r.spill_loads, r.registers, r.smem))
        j = worst.job
        variants = sorted({r.job.variant for r in rows})
        if not worst.ok:
            cells = ["compile error", "", "", "", "", ""]
        else:
            cells = [str(max(r.registers for r in rows)),
                     f"{max(r.spill_stores for r in rows)} / {max(r.spill_loads for r in rows)}",
                     str(max(r.smem for r in rows)), "yes" if any(r.wgmma for r in rows) else "no",
                     "yes" if any(r.cp_async for r in rows) else "no", "yes" if any(r.tma for r in rows) else "no"]
        lines.append(f"| {j.kernel} | {j.config} | {j.dtype} | sm_{j.arch} | {'yes' if j.choosable else 'pruned'} | "
                     + " | ".join(cells) + f" | {len(rows)} ({', '.join(variants)}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--table", default=None, help="write the resource table (markdown) here")
    parser.add_argument("--only", default=None, help="compile only the kernels whose name contains this")
    parser.add_argument("--quick", action="store_true",
                        help="CI: the aligned launch (and in fp16 the odd one), one activation, choosable configs "
                             "(plus every GEMM config's shared-memory bound); fp16/bf16/fp32 on sm_90, fp16/fp32 on sm_80")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.quick:
        jobs = [j for j in collect_jobs(args.arch, args.dtypes, quick=True)
                if not (j.arch == 80 and j.dtype == "bf16")]  # same tiles as fp16 there
    else:
        jobs = collect_jobs(args.arch, args.dtypes)
    if args.only:
        jobs = [j for j in jobs if args.only in j.kernel]
    print(f"{len(jobs)} compiles ({', '.join(f'sm_{a}' for a in args.arch)}; {', '.join(args.dtypes)})", flush=True)
    results = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for res in pool.map(compile_job, jobs):  # in order, printed as they finish
            results.append(res)
            j = res.job
            status = "ok  " if res.ok else "FAIL"
            print(f"{status} {j.kernel:28} {j.config:36} {j.dtype} sm_{j.arch} {j.variant:8} regs {res.registers:3} "
                  f"spill {res.spill_stores}/{res.spill_loads} smem {res.smem:6} wgmma {int(res.wgmma)} "
                  f"cp.async {int(res.cp_async)} tma {int(res.tma)} {res.seconds:5.1f} s {'' if j.choosable else '(pruned)'}", flush=True)
    problems, notes = verdicts(results)
    for line in notes:
        print("NOTE", line)
    for line in problems:
        print("PROBLEM", line)
    if args.table:
        Path(args.table).write_text(table(results))
        print("wrote", args.table)
    print(f"compiled {len(results)} variants in {time.perf_counter() - start:.0f} s; {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
