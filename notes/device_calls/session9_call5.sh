#!/usr/bin/env bash
# Session 9, call 5: v28, the mma expand's B through a cp.async ring (PERF_LOG v28). Its GPU
# tests (mma rules and chunks), memcheck and racecheck of the chunked path, the pair's
# halves with and without the ring (MULTILORA_MMA_RING=0), the variant sweep both ways.
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
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/memcheck_ring.log 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 compute-sanitizer --tool racecheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/racecheck_ring.log 2>&1
for f in $R/t_*.log $R/memcheck_*.log $R/racecheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY|RACECHECK SUMMARY" $f | head -8; done
echo "-- ring"; python3 notes/probes/pair_breakdown.py 2>&1 | tee $R/breakdown_ring.log
echo "-- registers"; MULTILORA_MMA_RING=0 python3 notes/probes/pair_breakdown.py 2>&1 | tee $R/breakdown_regs.log
timeout 120 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks --rep-ms 20 \
  --json plots_gpu/bgmv_ring_h200.json > $R/variants_ring.log 2>&1
MULTILORA_MMA_RING=0 timeout 120 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks --rep-ms 20 \
  --json plots_gpu/bgmv_regs_h200.json > $R/variants_regs.log 2>&1
for f in ring regs; do echo "== $f"; grep -v Warn $R/variants_$f.log | tail -20; done
cp plots_gpu/bgmv_ring_h200.json plots_gpu/bgmv_regs_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
