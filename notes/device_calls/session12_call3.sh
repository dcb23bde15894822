#!/usr/bin/env bash
# Session 12, call 3: v41 with its own kernel instances (WORK), after call 2 found the shared-instance version slower and wrong in fp32 (rule "rank" with a rank-sorted token list): the mixed-rank probe
# (full grid against the list), the variant sweep (`cuda` now passes make_meta's meta, as
# the registry does), alone on the GPU; then bgmv_cuda's GPU tests (4 shards, the new
# token-list tests among them) beside the robustness file's bgmv_cuda tests (8 shards:
# the random sweep's mixed ranks run the list through check_mode).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"; tail -5 $R/build.log
timeout 150 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_rank cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_variants_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; tail -28 $R/variants.log
left=$(( 575 - ($(date +%s) - T0) ))
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout $left $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
for i in 0 1 2 3 4 5 6 7; do
  MULTILORA_SHARD=$i/8 timeout $left $P tests/test_robustness.py -k "bgmv_cuda and not engine_load" > $R/t_robust_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
grep -h -A25 "^_____" $R/t_bgmv_cuda_*.log | head -80
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
