#!/usr/bin/env bash
# Session 9, call 6: v29, the mma expand's lean prologue (PERF_LOG v29). Its GPU tests
# (mma rules and chunks), memcheck of the chunked path, the pair's halves, the variant sweep.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $?"; tail -2 $R/build.log
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout 150 $P tests/test_bgmv_cuda.py -k "mma_rule or mma_chunks" > $R/t_mma_$i.log 2>&1 &
done
wait
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/memcheck_mma.log 2>&1
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
python3 notes/probes/pair_breakdown.py 2>&1 | tee $R/breakdown.log
timeout 120 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks --rep-ms 20 \
  --json plots_gpu/bgmv_lean_h200.json > $R/variants.log 2>&1
grep -v Warn $R/variants.log | tail -20
cp plots_gpu/bgmv_lean_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
