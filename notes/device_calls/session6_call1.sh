#!/usr/bin/env bash
# Prepared in session 5 for the next device session (PERF_LOG "Next", a): the v9c / v9d
# GPU tests (folded stacked expands; all of test_engine.py) with memcheck, beside the robustness sweep's
# sgmv_triton chunks (which ran out of time twice in session 5); then, alone on the GPU,
# the folded-vs-pair microbenchmark and stacked end to end, folded against the default.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
pids=()
timeout 300 $P tests/test_engine_kernels.py -k "stacked or fused" > $R/t_kernels.log 2>&1 & pids+=($!)
for i in 0 1; do   # all of it: the RoPE kernel every mode's fused step uses changed (v9d)
  MULTILORA_SHARD=$i/2 timeout 300 $P tests/test_engine.py > $R/t_engine_$i.log 2>&1 & pids+=($!)
done
timeout 300 $P "tests/test_robustness.py::test_gpu_engine_load[stacked]" > $R/t_load_stacked.log 2>&1 & pids+=($!)
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 300 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 --target-processes all $P tests/test_engine_kernels.py -k "stacked or fused" \
  > $R/memcheck_kernels.log 2>&1 & pids+=($!)
for i in 0 1 2 3 4 5 6 7; do
  timeout 330 $P "tests/test_robustness.py::test_gpu_random_sweep[sgmv_triton-$i]" > $R/t_sweep_sgmv_$i.log 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -12; done
timeout 120 python3 run_stacked_expand.py --T 64 --folded --block-n 32 64 128 --num-warps 4 \
  --json plots_gpu/stacked_folded_h200.json > $R/folded.log 2>&1
echo "folded rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/folded.log | tail -24
A="--model-config llama3-8b --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --no-progress --out-dir plots_gpu"
MULTILORA_STACKED_EXPAND=triton_folded timeout 90 python3 benchmark_inference_multilora.py $A --modes none stacked \
  --profile 3 --name e2e_stacked_folded > $R/e2e_folded.log 2>&1
echo "e2e folded rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "^(none|stacked) |LoRA|base GEMMs|_stacked|_add_rms" $R/e2e_folded.log | head -20
timeout 60 python3 benchmark_inference_multilora.py $A --modes stacked --name e2e_stacked_default \
  > $R/e2e_separate.log 2>&1
echo "e2e separate rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "^stacked " $R/e2e_separate.log
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu.tgz plots_gpu; rm -rf $R
