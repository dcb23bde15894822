#!/usr/bin/env bash
# Session 14, call 2: v49 (the rank-major expand's tail B prefetched into L2). GPU tests of
# the rank-major paths and v49's own, memcheck over v49's test, then the probe in
# rank-major storage with the prefetch on, off, on (A/B knob MULTILORA_RM_TAIL), and the
# wave sweep with it on.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 150 $P tests/test_bgmv_cuda.py -k "rank_major or rank_work or tile_rule" > $R/t_rm.log 2>&1
echo "tests: $(tail -1 $R/t_rm.log) ($(( $(date +%s) - T0 )) s)"; grep -E "^(FAILED|ERROR)" $R/t_rm.log | head -8
timeout 90 compute-sanitizer --tool memcheck --print-limit 20 $P tests/test_bgmv_cuda.py -k "tail_prefetch and one" > $R/memcheck.log 2>&1
echo "memcheck rc $?: $(grep -E 'ERROR SUMMARY' $R/memcheck.log | tail -1) ($(( $(date +%s) - T0 )) s)"
for tail in 1 0 1; do
  MULTILORA_RM_TAIL=$tail timeout 70 python3 notes/probes/mixed_rank_probe.py --storage rank-major > $R/probe_tail$tail.log 2>&1
  echo "probe tail=$tail rc $? ($(( $(date +%s) - T0 )) s)"; tail -10 $R/probe_tail$tail.log; cat $R/probe_tail$tail.log >> $R/probe_all.log
done
MULTILORA_RM_TAIL=1 timeout 80 python3 notes/probes/mixed_rank_probe.py --storage rank-major --wave > $R/wave_tail1.log 2>&1
echo "wave rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/wave_tail1.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
