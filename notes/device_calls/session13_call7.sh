#!/usr/bin/env bash
# Session 13, call 7 (v48: L2 prefetch of B by the rank-major expand's first blocks; A/B
# MULTILORA_RM_PREFETCH=1 (default) against 0): the rank-major tests, then the probe in
# rank-major storage with the prefetch on and off.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 120 $P tests/test_bgmv_cuda.py -k "rank_major or rank_work" > $R/t_rm.log 2>&1
echo "tests: $(tail -1 $R/t_rm.log)"; grep -E "^(FAILED|ERROR)" $R/t_rm.log | head -8
for pf in 1 0 1; do
  MULTILORA_RM_PREFETCH=$pf timeout 100 python3 notes/probes/mixed_rank_probe.py --storage rank-major \
    > $R/mixed_probe_pf${pf}_$(date +%s).log 2>&1
  echo "probe prefetch $pf rc $? ($(( $(date +%s) - T0 )) s)"
done
for f in $R/mixed_probe_pf*.log; do echo "== $(basename $f)"; cat $f; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
