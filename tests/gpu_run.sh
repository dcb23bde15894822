#!/usr/bin/env bash
# Everything GPU-side in one device call. Runs from the repo root on the GPU machine.
#   bash tests/gpu_run.sh                 GPU tests (pytest -m gpu) only
#   BENCH=1 bash tests/gpu_run.sh         then the run_*.py checks and microbenchmarks
#   E2E=1 bash tests/gpu_run.sh           then the end-to-end benchmark
#   SANITIZE=1 bash tests/gpu_run.sh      also compute-sanitizer memcheck over the kernel and
#                                         robustness tests, racecheck over a subset, beside
#                                         the GPU tests (logs/sanitizer_{memcheck,racecheck}.log)
#   ENGINE_AB=1 bash tests/gpu_run.sh     then the engine options against the default
#                                         (e2e b 64, 512 tokens; PERF_LOG v6)
#   TABLE=1 bash tests/gpu_run.sh         then the CUDA-vs-Triton decode grid
#                                         (bgmv_cuda/run_bgmv_cuda.py --table)
#   TESTS=0 skips the GPU tests; PYTEST_ARGS: test files (default all; one pytest process
#   per file, in parallel); SANITIZE_FILES; TESTS_TIMEOUT / SANITIZE_TIMEOUT (s); MULTILORA_GPU_CASES
#   (random cases per mode in the GPU sweep); DECODE_ARGS / PREFILL_ARGS / E2E_ARGS
#   (extra arguments of the benchmark scripts)
# The sanitizer runs beside the GPU tests (both check correctness only); the timed runs
# (BENCH, E2E) come after, alone on the GPU.
# Logs go to $OUT/logs (tarred to $OUT/logs.tgz at the end), plots and JSON to
# $OUT/plots_gpu.tgz: the device returns at most 8 files.
# A copied tree has no .git: pass MULTILORA_COMMIT=<short hash> so the JSON records it.
set -uo pipefail
OUT=${OUT:-$PWD/out}
LOG="$OUT/logs"
mkdir -p "$LOG" plots_gpu
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Small packages missing on the GPU image travel as wheels in .whl (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
PYTEST_ARGS=${PYTEST_ARGS:-}
status=0
{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"; } > "$LOG/env.txt" 2>&1
# Long files run as several pytest processes side by side (MULTILORA_SHARD in conftest.py).
shards() {
  case "$(basename "$1")" in
    test_robustness.py) echo 8 ;;
    test_bgmv_cuda.py) echo 4 ;;
    test_bgmv_triton.py|test_public_kernels.py|test_engine.py) echo 2 ;;
    *) echo 1 ;;
  esac
}
sanitize() {
  san_status=0
  # memcheck over the kernel GPU tests (bgmv_triton, sgmv_triton, bgmv_cuda, engine_kernels) and the
  # robustness cases, out-of-range idx with checking off included; racecheck over a smaller
  # subset. The 1,000-request engine load, the thousands-of-cases sweep and the timing /
  # compile / graph tests are left out (minutes under the sanitizer; they run unsanitized
  # above). Narrow or widen with SANITIZE_K / RACECHECK_K (pytest -k expressions).
  # Triton's own launcher and torch's caching allocator hide some errors from memcheck:
  # PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every allocation its own, so OOB reads show; it
  # also makes any allocation inside a CUDA-graph capture fail (cudaMalloc while capturing,
  # error 900), so tests that capture graphs (graph, pdl, compile, and the scripts' runs,
  # which time in graphs) are left out here; so is the test that reads the launched kernel
  # from torch.profiler (CUPTI does not start under the sanitizer).
  # One sanitizer process per test file, in parallel (the sanitizer is CPU-bound).
  SAN_FILES=${SANITIZE_FILES:-"tests/test_bgmv_triton.py tests/test_sgmv_triton.py tests/test_bgmv_cuda.py tests/test_robustness.py tests/test_engine_kernels.py"}
  SAN_K=${SANITIZE_K:-"not bench and not compile and not graph and not engine_load and not gpu_random_sweep and not e2e and not timing and not raw_ops and not broken_source and not pdl and not script_runs and not mirrored_kernel"}
  RACE_K=${RACECHECK_K:-"out_of_range_idx_unchecked or debug_flag or (test_matches_reference and bf16)"}
  pids=()
  for f in $SAN_FILES; do
    n=$(shards "$f")
    for ((i = 0; i < n; i++)); do
      MULTILORA_SHARD=$i/$n PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-1500} \
        compute-sanitizer --tool memcheck --error-exitcode 99 --print-limit 50 --target-processes all \
        python3 -m pytest -m gpu -q -p no:cacheprovider "$f" -k "$SAN_K" \
        > "$LOG/sanitizer_memcheck_$(basename "$f" .py)_$i.log" 2>&1 &
      pids+=($!)
    done
  done
  # cuDNN's own SDPA kernel (the engine's sdpa path, the reference of the attention tests)
  # reports shared-memory hazards under racecheck on the H200 image (session 4, 10 reports,
  # all inside cudnn_generated_fort_native_sdpa_sm90_*); it is not ours, so it is excluded.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-1500} \
    compute-sanitizer --tool racecheck --kernel-name-exclude kns=cudnn \
    --error-exitcode 99 --print-limit 50 --target-processes all \
    python3 -m pytest -m gpu -q -p no:cacheprovider $SAN_FILES -k "$RACE_K" \
    > "$LOG/sanitizer_racecheck.log" 2>&1 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait $pid || san_status=1; done
  for f in "$LOG"/sanitizer_*.log; do
    echo "== $(basename "$f") (exit != 0 or ERROR SUMMARY > 0 = sanitizer errors)"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Terminated" "$f" | tail -3
  done
  return $san_status
}
# Build the CUDA extension once, before jobs that would all wait for the same build lock.
python3 bgmv_cuda/bgmv_cuda.py > "$LOG/build.log" 2>&1 || { echo "bgmv_cuda build failed"; tail -30 "$LOG/build.log"; }
# The sanitizer jobs (correctness only) run in the background, beside the GPU tests; the
# timed runs (BENCH, E2E) come after both, alone on the GPU.
san_pid=
if [ "${SANITIZE:-0}" = 1 ]; then
  sanitize > "$LOG/sanitize_summary.log" 2>&1 &
  san_pid=$!
fi
if [ "${TESTS:-1}" = 1 ]; then
  # One pytest process per test file, in parallel (correctness only; 16 cores, one GPU).
  TEST_FILES=${PYTEST_ARGS:-$(grep -l "mark.gpu" tests/test_*.py)}
  pids=()
  for f in $TEST_FILES; do
    n=$(shards "$f")
    for ((i = 0; i < n; i++)); do
      MULTILORA_SHARD=$i/$n timeout ${TESTS_TIMEOUT:-3000} \
        python3 -m pytest -m gpu -q -rA -p no:cacheprovider "$f" \
        > "$LOG/gpu_tests_$(basename "$f" .py)_$i.log" 2>&1 &
      pids+=($!)
    done
  done
  for pid in "${pids[@]}"; do wait $pid; rc=$?; [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1; done
  for f in "$LOG"/gpu_tests_*.log; do
    echo "== $(basename "$f"): $(tail -1 "$f")"
    grep -E "^(FAILED|ERROR)" "$f" | head -20
  done
fi
if [ -n "$san_pid" ]; then
  wait $san_pid || status=1
  cat "$LOG/sanitize_summary.log"
fi
if [ "${BENCH:-0}" = 1 ]; then
  { python3 bgmv_triton/run_bgmv.py && python3 sgmv_triton/run_sgmv_shrink.py \
      && python3 sgmv_triton/run_sgmv_expand.py; } 2>&1 | tee "$LOG/run_checks.log" | tail -40
  python3 multilora_impl.py --public --out-dir plots_gpu ${DECODE_ARGS:-} 2>&1 | tee "$LOG/decode.log" | tail -60
  python3 multilora_impl_prefill.py --public --out-dir plots_gpu ${PREFILL_ARGS:-} 2>&1 | tee "$LOG/prefill.log" | tail -30
  python3 multilora_impl_prefill.py --public --out-dir plots_gpu --ragged ${PREFILL_ARGS:-} 2>&1 | tee -a "$LOG/prefill.log" | tail -20
fi
if [ "${TABLE:-0}" = 1 ]; then
  python3 bgmv_cuda/run_bgmv_cuda.py --table --rep-ms 20 --json plots_gpu/bgmv_cuda_vs_triton_h200.json \
    2>&1 | tee "$LOG/table.log" | tail -25
fi
if [ "${ENGINE_AB:-0}" = 1 ]; then
  # The engine options (PERF_LOG v6) against the default path (fused elementwise kernels
  # and Triton decode attention on a GPU), issue 5's run (b 64, 512 tokens, L7 r16): the
  # path before them, each one off, the split sampler, and the default with a profile.
  A="--model-config llama3-8b --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --modes none bgmv_cuda --no-progress --out-dir plots_gpu"
  for extra in "" "--fused-elementwise off --attention sdpa" "--fused-elementwise off" \
               "--attention sdpa" "--sampler triton_split" "--profile 3"; do
    echo "== engine options: ${extra:-default}"
    python3 benchmark_inference_multilora.py $A $extra 2>&1 | tee -a "$LOG/engine_ab.log" \
      | grep -E "^(none|bgmv_cuda) |group|us/step" | head -40
  done
fi
if [ "${E2E:-0}" = 1 ]; then
  python3 benchmark_inference_multilora.py --out-dir plots_gpu ${E2E_ARGS:-} 2>&1 | tee "$LOG/e2e.log" | tail -40
fi
tar czf "$OUT/plots_gpu.tgz" plots_gpu 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$LOG"
exit $status
