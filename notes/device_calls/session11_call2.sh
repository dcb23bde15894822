#!/usr/bin/env bash
# Session 11, call 2: v38b, is v38's loss the shared-memory carveout? The staged shrink and
# the register shrink, each with and without one carveout (100: max shared) on every launch
# (MULTILORA_CARVEOUT), mma with chunks as the drift check; then the launch-floor probe
# with bench_utils.empty_graph_us's new copy burst.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 90 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda_unstaged cuda_staged_carve cuda_unstaged_carve cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_v38b_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
timeout 60 python3 notes/probes/empty_floor_probe.py > $R/empty_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/empty_probe.log
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
