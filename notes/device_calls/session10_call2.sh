#!/usr/bin/env bash
# Session 10, call 2: why the cluster kernel (v32) is slower than the pair (call 1): graph
# timings with and without PDL and on a warm pool (notes/probes/cluster_probe.py), then
# ncu's launch, occupancy and warp-state sections of the cluster kernel at batch 64 u7; the
# fixed fallback test.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
python3 notes/probes/cluster_probe.py 2>&1 | grep -v Warn | tee $R/probe.log
timeout 120 ncu --kernel-name regex:cluster --launch-skip 3 --launch-count 1 --section LaunchStats \
  --section Occupancy --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
  python3 notes/probes/cluster_probe.py --ncu > $R/ncu_cluster_bs64.txt 2>&1
echo "ncu rc $? ($(( $(date +%s) - T0 )) s)"
grep -E "Duration|Cluster|cluster|Occupancy|Registers|Block Limit|Waves|Stall|Active Warps|Eligible|Issued|Throughput" $R/ncu_cluster_bs64.txt | head -60
timeout 100 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_bgmv_cuda.py -k "cluster_variant_runs" 2>&1 | tail -2
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
