#!/usr/bin/env bash
# Session 13, call 3 (data, no change): ncu of the mixed-rank point's kernels with rank-major
# B (notes/probes/rm_expand_ncu.py: the list shrink and the rank-major expand, mixed ranks
# and all at 64, the last of 4 launches of each).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
S="--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats"
S="$S --section SchedulerStats --section MemoryWorkloadAnalysis"
timeout 400 ncu $S --kernel-name regex:"shrink|expand" python3 notes/probes/rm_expand_ncu.py \
  > $R/ncu.log 2>&1
echo "ncu rc $? ($(( $(date +%s) - T0 )) s)"
grep -E "^  _bgmv|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit|Warp Cycles Per Issued|Issue Slots Busy|L2 Hit|Stall|No Eligible" $R/ncu.log | head -150
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
