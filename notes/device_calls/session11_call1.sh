#!/usr/bin/env bash
# Session 11, call 1: v38 (the shrink stages A in shared memory) against the register
# shrink in one sweep (cuda vs cuda_unstaged; mma with chunks as the drift check), the
# launch-floor probe, then every GPU test that the kernels touch, side by side: bgmv_cuda
# (4 shards: v36's unaligned-v test, v38's staged test), the robustness file's bgmv_cuda
# tests, test_engine (2 shards) and test_e2e (v36 and v38 change kernels the engine runs).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 70 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_unstaged cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_v38_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
timeout 40 python3 notes/probes/empty_floor_probe.py > $R/empty_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/empty_probe.log
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 250 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
MULTILORA_SHARD=0/1 timeout 250 $P tests/test_robustness.py -k "bgmv_cuda and not engine_load" > $R/t_robust.log 2>&1 &
for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout 250 $P tests/test_engine.py > $R/t_engine_$i.log 2>&1 &
done
timeout 250 $P tests/test_e2e.py > $R/t_e2e.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
