#!/usr/bin/env bash
# Session 11, call 3: v39, one shared-memory carveout for every launch of the pair
# (MULTILORA_CARVEOUT 0 / 14 / 28 percent) against the default; mma with chunks as the
# drift check.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_carve0 cuda_carve14 cuda_carve28 cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_v39_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
