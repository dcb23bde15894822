#!/usr/bin/env bash
# Session 13, call 8 (the review's bgmv_work_block refactor; the rank-major list instances'
# SASS changed in register allocation only): the rank-major and token-list GPU tests, then
# the probe in rank-major storage (timing check against call 4 / call 7's prefetch-off run).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 150 $P tests/test_bgmv_cuda.py -k "rank_major or rank_work or tile_rule" > $R/t_rm.log 2>&1
echo "tests: $(tail -1 $R/t_rm.log)"; grep -E "^(FAILED|ERROR)" $R/t_rm.log | head -8
timeout 100 python3 notes/probes/mixed_rank_probe.py --storage rank-major > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
