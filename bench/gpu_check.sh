#!/usr/bin/env bash
# One bounded run on a GPU machine: install without touching the machine's packages, print the
# environment, run every test compiled on the GPU (no interpreter) and collect every failure,
# build the CUDA extension and run its tests, then benchmark the headline shapes, each kernel's
# output checked against eager before it is timed. Logs and results go to one folder.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]     (default: bench/results/gpu-check)
#
# The whole run is bounded (GPU_CHECK_BUDGET_S, default 480 s: 8 minutes on an H100/H200): every
# step gets at most what is left, tests autotune with one config per kernel (ODELTA_AUTOTUNE=quick:
# no benchmarking inside tests), test files run in parallel shards (Triton compiles on the CPU, one
# kernel at a time per process), and a step that runs out of time is reported, not silently lost.
# A failing step never stops the run: the summary at the end lists every failed test.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-480}
start=$(date +%s)
status=0

left() { echo $(( budget - ($(date +%s) - start) )); }

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $out/NAME.log, keep going
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  (( limit > remaining )) && limit=$remaining
  if (( limit <= 5 )); then
    echo "== $name: skipped, the run's ${budget} s budget is spent" | tee "$out/$name.log"
    status=1
    return 1
  fi
  echo "== $name (<= ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "   TIMED OUT after ${limit} s" >>"$out/$name.log"
  echo "   exit $rc ($(tail -n 1 "$out/$name.log"))"
  [ $rc -eq 0 ] || status=1
  return $rc
}

tests_shard() {  # tests_shard NAME SECONDS PATHS...: one pytest process, every failure collected
  local name=$1 limit=$2; shift 2
  step "$name" "$limit" env ODELTA_AUTOTUNE=quick "$py" -m pytest -q -rfE -p no:cacheprovider \
    --durations=10 --junitxml="$out/$name.xml" "$@"
}

step install 60 "$py" -m pip install --no-deps --no-build-isolation -e .
step env 20 "$py" -m odelta_fast.cli env

# The CUDA extension builds (nvcc, CPU) while the test shards compile Triton kernels (CPU) and run
# them (GPU); four processes share a 16-core machine.
step build-ext 150 "$py" -m odelta_fast.cli build-ext --verbose &
build_pid=$!
ops_a=(tests/ops/test_every_gpu_config.py tests/ops/test_op_lora.py)
ops_b=(tests/ops --ignore=tests/ops/test_every_gpu_config.py --ignore=tests/ops/test_op_lora.py
       --ignore=tests/ops/test_cuda_ops.py)
tests_shard tests-ops-a 240 "${ops_a[@]}" &
pid_a=$!
tests_shard tests-ops-b 240 "${ops_b[@]}" &
pid_b=$!
tests_shard tests-rest 240 tests --ignore=tests/ops &
pid_c=$!
for pid in $build_pid $pid_a $pid_b $pid_c; do wait "$pid" || status=1; done
tests_shard tests-cuda 60 tests/ops/test_cuda_ops.py tests/test_multi_delta.py

# Benchmarks: headline shapes only; each provider's output and gradients are compared with eager
# at the benchmark shape first, and a row that differs is marked invalid (its time is not a claim).
step bench 150 "$py" bench/run.py --headline --out "$out" --update-readme --write-dispatch
cp odelta_fast/ops/lora_dispatch.json "$out/" 2>/dev/null || true  # the table backend="auto" reads, to commit
step multi-delta 40 "$py" bench/multi_delta.py --out "$out"

# Every failed test of every shard, in one list.
"$py" - "$out" <<'EOF' | tee "$out/summary.txt"
import sys, pathlib, xml.etree.ElementTree as ET
out = pathlib.Path(sys.argv[1])
failed, counts = [], {}
for xml in sorted(out.glob("tests-*.xml")):
    root = ET.parse(xml).getroot()
    for suite in root.iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] = counts.get(key, 0) + int(suite.get(key, 0))
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            msg = (bad.get("message") or "").splitlines()[0][:200] if bad.get("message") else ""
            failed.append(f"{xml.stem}: {case.get('classname')}::{case.get('name')}: {msg}")
print(f"tests: {counts}")
print(f"{len(failed)} failed:" if failed else "no test failed")
for line in failed:
    print("  " + line)
invalid = []
for record in out.glob("*.json"):
    try:
        import json
        rows = json.loads(record.read_text()).get("rows", [])
    except Exception:
        continue
    invalid += [f"{r['suite']} {r['mode']} {r['provider']} {r['shape']}: {r['extra'].get('why_invalid')}"
                for r in rows if r.get("extra", {}).get("valid") is False]
print(f"{len(invalid)} benchmark rows invalid (output differs from eager):" if invalid else "every benchmark row valid")
for line in invalid:
    print("  " + line)
EOF
echo "total $(( $(date +%s) - start )) s of ${budget} s; logs in $out"
exit $status
