#!/usr/bin/env bash
# Session 9, call 11 (the last ~70 device-seconds, on call 10's warm machine): v31 with the
# wide shrink only up to 64 blocks; the variant sweep's default column alone.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda --rep-ms 10 \
  --json plots_gpu/bgmv_wide64_h200.json > $R/variants.log 2>&1
grep -v Warn $R/variants.log | tail -27
cp plots_gpu/bgmv_wide64_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
