#!/usr/bin/env bash
# Session 13, call 4 (v47: the rank-major expand's post-wait path; A/B of its rows per warp,
# MULTILORA_RM_ROWS=8 (default) against 4): the rank-major tests under both, the probe in
# both storages at 8 and in rank-major storage at 4.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 120 $P tests/test_bgmv_cuda.py -k "rank_major or rank_work" > $R/t_rm8.log 2>&1
echo "tests rows 8: $(tail -1 $R/t_rm8.log)"; grep -E "^(FAILED|ERROR)" $R/t_rm8.log | head -8
MULTILORA_RM_ROWS=4 timeout 120 $P tests/test_bgmv_cuda.py -k "rank_major" > $R/t_rm4.log 2>&1
echo "tests rows 4: $(tail -1 $R/t_rm4.log)"; grep -E "^(FAILED|ERROR)" $R/t_rm4.log | head -8
timeout 150 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe_rows8.log 2>&1
echo "probe rows 8 rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe_rows8.log
MULTILORA_RM_ROWS=4 timeout 120 python3 notes/probes/mixed_rank_probe.py --storage rank-major \
  > $R/mixed_probe_rows4.log 2>&1
echo "probe rows 4 rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe_rows4.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
