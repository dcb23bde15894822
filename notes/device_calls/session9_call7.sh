#!/usr/bin/env bash
# Session 9, call 7: after v29, where rule "mma" with chunks beats rule "rank": the variant
# sweep (cuda = the default, cuda_rank, cuda_mma_chunks) over its points and Llama-3-8B's
# q/k/v, gate/up and down projections, to set the default's switch (mma_chunks_pay).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $?"; tail -1 $R/build.log
timeout 300 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_rank cuda_mma_chunks --rep-ms 20 \
  --json plots_gpu/bgmv_rule_h200.json > $R/variants.log 2>&1
grep -v Warn $R/variants.log | tail -30
cp plots_gpu/bgmv_rule_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
