#!/usr/bin/env bash
# Prepared in session 6 (PERF_LOG v13): the shrink split in 2 along h_in against the
# default and the shape rule, at every variant point, all with tile rule "rank".
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
timeout 200 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_split cuda_split2 cuda_nopdl \
  --rep-ms 20 --json plots_gpu/bgmv_split2_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -22
cp plots_gpu/bgmv_split2_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
