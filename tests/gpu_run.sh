#!/usr/bin/env bash
# Everything GPU-side in one device call. Runs from the repo root on the GPU machine.
#   bash tests/gpu_run.sh                 GPU tests (pytest -m gpu) only
#   BENCH=1 bash tests/gpu_run.sh         then the run_*.py checks and microbenchmarks
#   E2E=1 bash tests/gpu_run.sh           then the end-to-end benchmark
#   SANITIZE=1 bash tests/gpu_run.sh      then compute-sanitizer memcheck over the kernel tests
# Logs, JSON and PNGs go under $OUT (plots as one tarball: $OUT keeps few files).
# A copied tree has no .git: pass MULTILORA_COMMIT=<short hash> so the JSON records it.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" plots_gpu
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# Small packages missing on the GPU image travel as wheels in .whl (see README).
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
PYTEST_ARGS=${PYTEST_ARGS:-}
status=0
{ nvidia-smi; python3 -c "import torch, triton, transformers; print(torch.__version__, torch.version.cuda, triton.__version__, transformers.__version__)"; } > "$OUT/env.txt" 2>&1
if [ "${TESTS:-1}" = 1 ]; then
  python3 -m pytest -m gpu -q -rA $PYTEST_ARGS 2>&1 | tee "$OUT/gpu_tests.log" | grep -v PASSED
  status=$?
fi
if [ "${SANITIZE:-0}" = 1 ]; then
  compute-sanitizer --tool memcheck --print-limit 20 python3 -m pytest -m gpu -q -x \
    -k "${SANITIZE_K:-sanitize}" 2>&1 | tee "$OUT/sanitizer.log" | tail -15
fi
if [ "${BENCH:-0}" = 1 ]; then
  { python3 bgmv_triton/run_bgmv.py && python3 sgmv_triton/run_sgmv_shrink.py \
      && python3 sgmv_triton/run_sgmv_expand.py; } 2>&1 | tee "$OUT/run_checks.log" | tail -40
  python3 multilora_impl.py --out-dir plots_gpu ${DECODE_ARGS:-} 2>&1 | tee "$OUT/decode.log" | tail -60
  python3 multilora_impl_prefill.py --out-dir plots_gpu ${PREFILL_ARGS:-} 2>&1 | tee "$OUT/prefill.log" | tail -30
  python3 multilora_impl_prefill.py --out-dir plots_gpu --ragged ${PREFILL_ARGS:-} 2>&1 | tee -a "$OUT/prefill.log" | tail -20
fi
if [ "${E2E:-0}" = 1 ]; then
  python3 benchmark_inference_multilora.py --out-dir plots_gpu ${E2E_ARGS:-} 2>&1 | tee "$OUT/e2e.log" | tail -40
fi
tar czf "$OUT/plots_gpu.tgz" plots_gpu 2>/dev/null
exit $status
