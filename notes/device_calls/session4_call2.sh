#!/usr/bin/env bash
# Session 4 call 2 (timing, alone on the GPU): v5 tiles and v7 grouped expand (branch
# trees in _br/), the SGMV prefill tile sweep, e2e per branch option; racecheck at the end.
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
for b in v5 grp; do (cd _br/$b && python3 bgmv_cuda/bgmv_cuda.py > $R/${b}_build.log 2>&1) & done
python3 bgmv_cuda/bgmv_cuda.py > $R/main_build.log 2>&1 &
wait
echo "build: $(( $(date +%s) - T0 )) s"
(cd _br/v5 && timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_tiles --rep-ms 20 --json $R/bgmv_tiles_h200.json > $R/v5_variants.log 2>&1)
echo "v5: $(( $(date +%s) - T0 )) s"; tail -30 $R/v5_variants.log
(cd _br/grp && timeout 120 python3 bgmv_cuda/run_bgmv_cuda.py --grouped --rep-ms 20 --json $R/bgmv_grouped_h200.json > $R/grp_grouped.log 2>&1)
echo "grp: $(( $(date +%s) - T0 )) s"; tail -30 $R/grp_grouped.log
timeout 90 python3 sgmv_triton/run_sgmv_shrink.py --proj o --block-m 16 32 64 --split-k 1 2 4 --num-requests 8 --tokens-per-request 64 512 2048 --out-dir $R > $R/sgmv_shrink.log 2>&1
timeout 60 python3 sgmv_triton/run_sgmv_expand.py --proj o --block-m 16 32 64 --block-n 64 128 256 --num-requests 8 --tokens-per-request 64 512 2048 --out-dir $R > $R/sgmv_expand.log 2>&1
echo "sgmv: $(( $(date +%s) - T0 )) s"; tail -32 $R/sgmv_shrink.log; tail -32 $R/sgmv_expand.log
A="--model-config llama3-8b --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --modes bgmv_cuda --no-progress --fused-elementwise --attention triton"
for g in 1 4 8; do
  (cd _br/grp && MULTILORA_EXPAND_GROUP=$g timeout 80 python3 benchmark_inference_multilora.py $A --out-dir $R/e2e_g$g > $R/e2e_group$g.log 2>&1)
  echo "== group $g ($(( $(date +%s) - T0 )) s)"; grep -E "^bgmv_cuda " $R/e2e_group$g.log
done
(cd _br/v5 && MULTILORA_EXPAND_TILES=residency timeout 80 python3 benchmark_inference_multilora.py $A --out-dir $R/e2e_tiles > $R/e2e_tiles.log 2>&1)
echo "== tiles residency ($(( $(date +%s) - T0 )) s)"; grep -E "^bgmv_cuda " $R/e2e_tiles.log
left=$(( 570 - ($(date +%s) - T0) ))
echo "racecheck budget $left s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $left compute-sanitizer --tool racecheck --kernel-name-exclude kns=cudnn \
  --error-exitcode 99 --print-limit 50 --target-processes all python3 -m pytest -m gpu -q -p no:cacheprovider \
  tests/test_engine_kernels.py tests/test_engine.py -k "gpu_fused_kernels or gpu_decode_attention or gpu_sampler_triton_equals" > $R/racecheck.log 2>&1
echo "racecheck rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "RACECHECK SUMMARY|passed|failed|rror" $R/racecheck.log | tail -5
tar czf $OUT/r.tgz -C $OUT r && rm -rf $R
