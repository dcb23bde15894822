#!/usr/bin/env bash
# Session 12, call 1: the review's FMA-expand refactor (437ea76, kVecV / vec_v) on the GPU:
# timings first, alone on the GPU (the variant sweep as the timing check; the mixed-rank
# probe, notes/probes/mixed_rank_probe.py, for target 4), then bgmv_cuda's GPU tests
# (4 shards) beside the robustness file's bgmv_cuda and sgmv_triton tests (8 shards, as
# tests/gpu_run.sh runs them).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_nopdl cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_variants_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; tail -30 $R/variants.log
timeout 120 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
left=$(( 570 - ($(date +%s) - T0) ))
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout $left $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
for i in 0 1 2 3 4 5 6 7; do
  MULTILORA_SHARD=$i/8 timeout $left $P tests/test_robustness.py -k "(bgmv_cuda or sgmv) and not engine_load" > $R/t_robust_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
