#!/usr/bin/env bash
# The one GPU run, on a lent device machine in a single call (<= 600 s): builds the
# extension against the machine's torch, then runs the speedup report with
# `--profile full` (scaling sweep N = 2^10..2^20, both SAE settings, fp32 and bf16,
# plus the issue targets), and prints a short table last.
#
#   bash benchmarks/gpu_check.sh                       # build + full report: ~8-9 min on an H100/H200
#   GPU_CHECK_TESTS=tests GPU_CHECK_PROFILE=quick bash benchmarks/gpu_check.sh   # + the test suite
#   # first run of the fused GPU backward kernels (never run on a GPU yet): their tests + MonoLoss timings
#   GPU_CHECK_TESTS="tests/test_autograd.py tests/test_backward.py tests/test_loss.py" \
#     GPU_CHECK_BENCH=benchmarks/test_bench_monoloss.py GPU_CHECK_PROFILE=quick bash benchmarks/gpu_check.sh
#   # run 8 (results/NVIDIA-H200/run8-suite, 348 s): the whole suite, then MonoScore and MonoLoss timings
#   GPU_CHECK_TESTS=tests GPU_CHECK_TESTS_S=240 \
#     GPU_CHECK_BENCH="benchmarks/test_bench_monoscore.py benchmarks/test_bench_monoloss.py" \
#     GPU_CHECK_PROFILE=quick GPU_CHECK_BENCH_S=170 bash benchmarks/gpu_check.sh
#   # next: where the SAE step's MonoLoss time goes (the refinement's backward, run 8's README)
#   GPU_CHECK_PROBE=1 GPU_CHECK_PROBE_ARGS=--profile-loss GPU_CHECK_BENCH=benchmarks/test_bench_monoloss.py \
#     GPU_CHECK_PROFILE=quick GPU_CHECK_BENCH_S=120 bash benchmarks/gpu_check.sh
#
# Everything worth keeping lands in $OUT (default benchmarks/results/gpu-run):
# steps.txt, bench.log, benchmark.json (pytest-benchmark's own) and <device>/ with
# summary.json and the scaling plots: 8 files with build.log removed, the most a
# device call brings back. Each step has its own time limit; the report step is
# stopped with SIGINT, so pytest still prints its tables and writes its results,
# and the sweep keeps to its own time budget (test_bench_scaling.PLANS) well before.
# Knobs: GPU_CHECK_PROFILE (full), GPU_CHECK_BENCH (pytest paths, default benchmarks),
# GPU_CHECK_BENCH_S (report limit, default 480), GPU_CHECK_TESTS_S (tests limit, default 210), GPU_CHECK_TESTS (pytest paths; empty:
# no tests, the default, as tests and the full report do not both fit one call),
# GPU_CHECK_EXTRAS=1 (diagnose/tune/accuracy scripts), GPU_CHECK_PROBE=1 (probe_split_gemm.py, with
# GPU_CHECK_PROBE_ARGS, e.g. --profile-loss:
# split-precision cuBLAS products and a profile of MonoLoss steps).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-run}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
PROFILE="${GPU_CHECK_PROFILE:-full}"
BENCH="${GPU_CHECK_BENCH:-benchmarks}"
BENCH_S="${GPU_CHECK_BENCH_S:-480}"
TESTS="${GPU_CHECK_TESTS:-}"
EXTRAS="${GPU_CHECK_EXTRAS:-0}"
PROBE="${GPU_CHECK_PROBE:-0}"

step() {  # step NAME SECONDS CMD...: runs CMD with a limit (SIGINT, then KILL 30 s later), logs to $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "=== $name"
  local t0=$SECONDS
  timeout -s INT -k 30 "$limit" "$@" > "$OUT/$name.log" 2>&1
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
[ "$PROBE" = 1 ] && step probe 90 $PY benchmarks/probe_split_gemm.py ${GPU_CHECK_PROBE_ARGS:-}
# xdist: a crashing test fails alone instead of ending the run; -v names every test.
[ -n "$TESTS" ] && step tests "${GPU_CHECK_TESTS_S:-210}" $PY -m pytest $TESTS -v -n 8 -rfEs -p no:cacheprovider
step bench "$BENCH_S" $PY -m pytest $BENCH --benchmark-only -q -p no:cacheprovider --profile "$PROFILE" \
  --results-dir "$OUT" --benchmark-json="$OUT/benchmark.json"
if [ "$EXTRAS" = 1 ]; then
  step tune 60 $PY benchmarks/tune_triton.py
  step accuracy 30 $PY benchmarks/measure_accuracy.py --large
  step ill_conditioned 60 $PY benchmarks/measure_accuracy.py --ill-conditioned  # g of each GPU kernel
fi

grep -q "build rc=0" "$OUT/steps.txt" && rm -f "$OUT/build.log"  # at most 8 files come back

echo "=== summary"
cat "$OUT/steps.txt"
[ -n "$TESTS" ] && grep -E "^(FAILED|ERROR)|passed|failed|crashed" "$OUT/tests.log" | tail -n 25
[ "$PROBE" = 1 ] && grep -A 10 "== products" "$OUT/probe.log"
if [ "$EXTRAS" = 1 ]; then
  tail -n 6 "$OUT/diagnose.log"
  grep -E "cuda" "$OUT/accuracy.log" | sort -k6 -g | tail -n 4
  grep -E "backend|cuda" "$OUT/ill_conditioned.log"
fi
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/bench.log" | tail -n 15
# The tables and plots written, without the list of points not run (it is in bench.log).
awk '/MonoScore speedups/ {on = 1} /^-+ benchmark / {on = 0} on' "$OUT/bench.log" | grep -v -E "^  scaling-.*: " \
  | tail -n 90
[ "$EXTRAS" = 1 ] && tail -n 14 "$OUT/tune.log"
true
