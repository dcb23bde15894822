#!/usr/bin/env bash
# Session 9, call 3: the chunked mma pair's halves at the distinct point, graph-timed
# (notes/probes/pair_breakdown.py), against call 2's pure-read pair (33 us for 2 x 64 MB).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
python3 notes/probes/pair_breakdown.py 2>&1 | tee $R/breakdown.log
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
