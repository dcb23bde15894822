#!/usr/bin/env bash
# Session 5 call 1: GPU tests of the code changed after session 4's last device call (the
# deterministic SGMV split 29aaeca, the residency tile default ab8e386, mode "stacked" and
# its Triton expand) with memcheck over the three kernel files, in parallel; then, alone on
# the GPU, stacked against none and bgmv_cuda (issue 5's shape) with both stacked expands.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
( OUT=$OUT/t TESTS_TIMEOUT=290 SANITIZE=1 SANITIZE_TIMEOUT=290 \
  SANITIZE_FILES="tests/test_sgmv_triton.py tests/test_bgmv_cuda.py tests/test_engine_kernels.py" \
  PYTEST_ARGS="tests/test_sgmv_triton.py tests/test_bgmv_cuda.py tests/test_engine_kernels.py tests/test_engine.py tests/test_robustness.py tests/test_benchmark_e2e.py" \
  bash tests/gpu_run.sh > $OUT/tests_summary.txt 2>&1 )
echo "correctness phase: $(( $(date +%s) - T0 )) s" | tee -a $OUT/tests_summary.txt
mkdir -p $OUT/r plots_gpu
export PYTHONPATH=/tmp/site
A="--model-config llama3-8b --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --no-progress --out-dir plots_gpu"
left=$(( 570 - ($(date +%s) - T0) ))
timeout $left python3 benchmark_inference_multilora.py $A --modes none bgmv_cuda stacked --profile 3 > $OUT/r/e2e_stacked.log 2>&1
echo "e2e stacked rc $? ($(( $(date +%s) - T0 )) s)"
grep -E "^(none|bgmv_cuda|stacked) |tok/s" $OUT/r/e2e_stacked.log | head -20
left=$(( 575 - ($(date +%s) - T0) ))
MULTILORA_STACKED_EXPAND=torch timeout $left python3 benchmark_inference_multilora.py $A --modes stacked --name stacked_torch_expand > $OUT/r/e2e_stacked_torch.log 2>&1
echo "e2e stacked torch rc $? ($(( $(date +%s) - T0 )) s)"
tail -12 $OUT/r/e2e_stacked_torch.log
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu2.tgz plots_gpu; rm -rf $OUT/r
ls -R $OUT | head -20
