#!/usr/bin/env bash
# Session 9, call 9 (the last device seconds): bgmv_cuda's robustness tests (random shape
# sweep, out-of-range idx, the 1,000-request engine load) under v29 and the default's new
# switch (48b5e3b's kernels and rule), alone on the GPU: call 8 ran them beside the other
# test files and its 240 s limit stopped them (40 passed, none failed).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
echo "build: $(( $(date +%s) - T0 )) s"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 200 python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/test_robustness.py -k "bgmv_cuda" > $R/t_robust_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
