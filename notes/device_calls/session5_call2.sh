#!/usr/bin/env bash
# Session 5 call 2: GPU tests of the v9b stacked expand (kernel, engine, memcheck) and the
# robustness tests call 1 left unfinished (the sgmv_triton sweeps, the four engine loads),
# in parallel; then, alone on the GPU: none / bgmv_cuda / stacked at issue 5's shape with a
# profile, and the prefill figures (deterministic SGMV split), regular and ragged.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
pids=()
timeout 280 $P tests/test_engine_kernels.py -k stacked > $R/t_stacked_kernel.log 2>&1 & pids+=($!)
timeout 280 $P tests/test_engine.py -k stacked > $R/t_engine_stacked.log 2>&1 & pids+=($!)
for i in 0 1 2 3; do
  timeout 280 $P "tests/test_robustness.py::test_gpu_random_sweep[sgmv_triton-$i]" > $R/t_sweep_sgmv_$i.log 2>&1 & pids+=($!)
done
for m in bgmv_triton bgmv_cuda sgmv_triton stacked; do
  timeout 280 $P "tests/test_robustness.py::test_gpu_engine_load[$m]" > $R/t_load_$m.log 2>&1 & pids+=($!)
done
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 280 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 --target-processes all $P tests/test_engine_kernels.py -k "stacked" > $R/memcheck_stacked.log 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -12; done
A="--model-config llama3-8b --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --no-progress --out-dir plots_gpu"
timeout 150 python3 benchmark_inference_multilora.py $A --modes none bgmv_cuda stacked --profile 3 > $R/e2e_stacked.log 2>&1
echo "e2e rc $? ($(( $(date +%s) - T0 )) s)"
grep -E "^(none|bgmv_cuda|stacked) |_stacked_expand|LoRA|base GEMMs" $R/e2e_stacked.log | head -20
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl_prefill.py --public --out-dir plots_gpu > $R/prefill.log 2>&1
echo "prefill rc $? ($(( $(date +%s) - T0 )) s)"; tail -14 $R/prefill.log
left=$(( 570 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl_prefill.py --public --ragged --out-dir plots_gpu > $R/prefill_ragged.log 2>&1
echo "ragged rc $? ($(( $(date +%s) - T0 )) s)"; tail -8 $R/prefill_ragged.log
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu.tgz plots_gpu; rm -rf $R
