#!/usr/bin/env bash
# Session 10, call 4: v34, each half's rule apart (no kernel change): the variant sweep of
# the default (rule "rank" without meta), mma with chunks, and the two mixed pairs.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks cuda_rank_mma cuda_mma_rank \
  --rep-ms 10 --json plots_gpu/bgmv_halves_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
