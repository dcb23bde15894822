#!/usr/bin/env bash
# Session 13, call 1 (v45: rank-major B): bgmv_cuda's GPU tests (4 shards; they also cover
# 823e401 / ae6b406 / f38ad0f, not GPU-run in session 12), then the mixed-rank probe with
# B in both storages.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 200 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
left=$(( 540 - ($(date +%s) - T0) ))
timeout $left python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
