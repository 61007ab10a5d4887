#!/usr/bin/env bash
# One run on a GPU machine: install without touching the machine's packages, print the
# environment, run the whole test suite compiled on the GPU (no interpreter), build the CUDA
# extension and run its tests, then the benchmark suite. Logs and results go to one folder.
#
#   bash bench/gpu_check.sh [OUTPUT_DIR]     (default: bench/results/gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu-check}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
py=${PYTHON:-python3}
status=0
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember failures, keep going
  local name=$1; shift
  echo "== $name: $*"
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc ($(tail -n 1 "$out/$name.log"))"
  [ $rc -eq 0 ] || status=1
}
step install "$py" -m pip install --no-deps --no-build-isolation -e .
step env "$py" -m odelta_fast.cli env
step tests "$py" -m pytest -q -x --durations=20 -p no:cacheprovider
step build-ext "$py" -m odelta_fast.cli build-ext --verbose
step cuda-tests "$py" -m pytest -q tests/test_cuda_ops.py tests/test_multi_delta.py -p no:cacheprovider
step bench "$py" bench/run.py --out "$out" --update-readme
step multi-delta "$py" bench/multi_delta.py --out "$out"
exit $status
