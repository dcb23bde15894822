#!/usr/bin/env bash
# Session 13, call 6 (correctness of the rank-major expand at the final kernel): the
# robustness file's bgmv_cuda random sweep (8 shards; 30% of its cases now store B
# rank-major), the rank-major tests with the CUDA-graph one, and compute-sanitizer
# memcheck + racecheck over the rank-major tests (graph-free ones), side by side.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 400 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "test_rank_major_B and not graph" > $R/memcheck.log 2>&1 &
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 400 compute-sanitizer --tool racecheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "test_rank_major_B and not graph and (mixed or unaligned or r128)" \
  > $R/racecheck.log 2>&1 &
for i in 0 1 2 3 4 5 6 7; do
  MULTILORA_SHARD=$i/8 timeout 300 $P tests/test_robustness.py -k "gpu_random_sweep and bgmv_cuda" \
    > $R/t_sweep_$i.log 2>&1 &
done
timeout 200 $P tests/test_bgmv_cuda.py -k "rank_major" > $R/t_rm.log 2>&1 &
wait
echo "all: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
for f in $R/memcheck.log $R/racecheck.log; do
  echo "== $(basename $f)"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|Terminated" $f | tail -3
done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
