#!/usr/bin/env bash
# Prepared in session 6: PERF_LOG v13 (the shrink split in 2 along h_in) and v15 (tile
# rule "pairs": two tokens of one adapter per expand block). GPU tests of "pairs" (every
# rule bitwise equal, its edge cases, the launched kernels) and memcheck of its edge
# cases, then the variant sweep with both, all against the default (tile rule "rank").
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 200 $P tests/test_bgmv_cuda.py -k "pairs or tile_rule" > $R/t_pairs.log 2>&1 &
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "pairs_rule" > $R/memcheck_pairs.log 2>&1 &
wait
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
timeout 200 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_split cuda_split2 cuda_pairs \
  cuda_nopdl --rep-ms 20 --json plots_gpu/bgmv_split2_pairs_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -22
cp plots_gpu/bgmv_split2_pairs_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
