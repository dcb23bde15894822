#!/usr/bin/env bash
# Prepared in session 6 (PERF_LOG v14): the folded gate/up kernel (stacked_silu_mul) over
# tile configs against expand + silu_mul, Llama-3-8B gate/up at T 64 (and 1, 256).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
timeout 240 python3 run_stacked_expand.py --T 1 64 256 --sites gate_up --folded --block-n 32 64 128 \
  --num-warps 4 8 --json plots_gpu/stacked_silu_sweep_h200.json > $R/silu.log 2>&1
echo "silu sweep rc $?"; grep -v Warn $R/silu.log | grep -E "expand\+|folded" | tail -24
cp plots_gpu/stacked_silu_sweep_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
