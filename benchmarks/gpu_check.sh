#!/usr/bin/env bash
# The one GPU check, run on a lent device machine in a single call:
#   builds the extension against the machine's torch, runs the test suite on
#   the GPU, measures accuracy, runs the benchmarks, and prints a short table last.
# Everything worth keeping lands in $OUT (default: benchmarks/results/gpu-run).
# Each step has its own time limit so that a hang in one still leaves the rest.
# To fit a short lease, narrow it: GPU_CHECK_TESTS (pytest paths, default tests),
# GPU_CHECK_BENCH (default benchmarks), GPU_CHECK_EXTRAS=0 (skip diagnose/tune/accuracy).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TESTS="${GPU_CHECK_TESTS:-tests}"
BENCH="${GPU_CHECK_BENCH:-benchmarks}"
EXTRAS="${GPU_CHECK_EXTRAS:-1}"

step() {  # step NAME SECONDS CMD...: runs CMD with a limit, logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/steps.txt"
  tail -n 25 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/steps.txt"
$PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/steps.txt"

# sm_90 only: this machine's GPU; the default list (8.0;9.0+PTX) would double the compile.
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 MONOLOSS_FORCE_CUDA=1
step build 150 $PY -m pip install --no-build-isolation --no-deps -v -e .
if ! $PY -c "import monoloss_kernels._C" 2>/dev/null; then  # an older pip/setuptools: build in place
  step build_inplace 150 $PY setup.py build_ext --inplace
fi
[ "$EXTRAS" = 1 ] && step diagnose 60 $PY benchmarks/diagnose_cuda.py
# xdist: a crashing test fails alone instead of ending the run; -v names every test.
step tests 210 $PY -m pytest $TESTS -v -n 8 -rfEs -p no:cacheprovider
step bench 180 $PY -m pytest $BENCH --benchmark-only -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/benchmark.json"
for summary in benchmarks/results/*/summary.json; do  # this GPU's, not the committed CPU one
  case "$summary" in *"/cpu-"*) ;; *) cp "$summary" "$OUT/" ;; esac
done
if [ "$EXTRAS" = 1 ]; then
  step tune 60 $PY benchmarks/tune_triton.py
  step accuracy 30 $PY benchmarks/measure_accuracy.py --large
fi

grep -q "build rc=0" "$OUT/steps.txt" && rm -f "$OUT/build.log"  # at most 8 files come back

echo "=== summary"
cat "$OUT/steps.txt"
grep -E "^(FAILED|ERROR)|passed|failed|crashed" "$OUT/tests.log" | tail -n 25
if [ "$EXTRAS" = 1 ]; then
  tail -n 6 "$OUT/diagnose.log"
  grep -E "cuda" "$OUT/accuracy.log" | sort -k6 -g | tail -n 4
fi
sed -n '/speedup/,$p' "$OUT/bench.log" | tail -n 40
[ "$EXTRAS" = 1 ] && tail -n 14 "$OUT/tune.log"
true
