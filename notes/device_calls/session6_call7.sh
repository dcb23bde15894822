#!/usr/bin/env bash
# Session 6, call 7 (the last device seconds): bgmv_cuda's robustness tests (random shape
# sweep, out-of-range idx, the 1,000-request engine load) with tile rule "rank" as the
# default (6de2350), which call 5's bgmv_cuda tests cover only at fixed shapes.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
echo "build: $(( $(date +%s) - T0 )) s"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 130 python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/test_robustness.py -k "bgmv_cuda" > $R/t_robust_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/r.tgz -C $OUT r; rm -rf $R
