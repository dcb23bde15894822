#!/usr/bin/env bash
# Session 6, call 3: issue 5 target 5 (64 adapters, distinct against identical) with mode
# stacked beside bgmv_cuda, and the batch sweep (target 4) with stacked, alone on the GPU.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R/plots
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
timeout 200 python3 benchmark_inference_multilora.py --model-config llama3-8b --batch-size 64 --prompt-len 32 \
  --num-adapters 64 --workloads distinct identical --modes none stacked bgmv_cuda --max-new-tokens 256 \
  --targets --no-validate --no-progress > $R/workloads.log 2>&1
echo "workloads rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/workloads.log | tail -16
timeout $(( 585 - ($(date +%s) - T0) )) python3 benchmark_inference_multilora.py --model-config llama3-8b \
  --batch-sizes 1 2 4 8 16 32 64 128 256 --max-new-tokens 128 --prompt-len 32 --num-adapters 7 \
  --modes none stacked bgmv_cuda bgmv_triton sgmv_triton --no-progress > $R/sweep.log 2>&1
echo "sweep rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/sweep.log | tail -24
cp plots/e2e_workloads_llama3-8b_b64_L64_r16_n256_distinct-identical.* plots/e2e_sweep_llama3-8b_L7_r16_n128_uniform.* $R/plots/ 2>/dev/null
tar czf $OUT/r.tgz -C $OUT r; rm -rf $R
