#!/usr/bin/env bash
# Session 10, call 6: the final state's end-to-end GPU tests (v33 changed the expands that
# the engine runs): test_engine (2 shards) and test_e2e, side by side.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout 200 $P tests/test_engine.py > $R/t_engine_$i.log 2>&1 &
done
timeout 200 $P tests/test_e2e.py > $R/t_e2e.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
