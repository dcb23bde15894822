#!/usr/bin/env bash
# Session 12, call 5 (v42, diagnosis): the mixed-rank probe with the padded-storage layouts
# (all 8 / 16 in r_max 64 with the token list against their own-size storage) and the
# mixed_rank figure's batch.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 300 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
