#!/usr/bin/env bash
# Session 14, call 1 (data, no kernel change): target 5's floor at batch 1 (the skeletons of
# notes/probes/chain_floor_probe.py beside bgmv_cuda), and the rank-major expand's time
# against its grid's waves (mixed_rank_probe.py --wave).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 200 python3 notes/probes/chain_floor_probe.py > $R/chain_floor.log 2>&1
echo "chain probe rc $? ($(( $(date +%s) - T0 )) s)"; tail -5 $R/chain_floor.log
timeout 150 python3 notes/probes/mixed_rank_probe.py --storage rank-major --wave > $R/wave_probe.log 2>&1
echo "wave probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/wave_probe.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
