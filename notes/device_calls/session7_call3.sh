#!/usr/bin/env bash
# Prepared in session 6 (PERF_LOG v14): the folded gate/up kernel (stacked_silu_mul) over
# tile configs (columns, warps, token rows per program) against expand + silu_mul, and the
# expand's own configs at the two sites it still serves (q/k/v, gate/up), Llama-3-8B, T 64.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
timeout 280 python3 run_stacked_expand.py --T 64 --sites qkv gate_up --folded --block-n 32 64 128 \
  --num-warps 4 8 --block-t 0 16 32 --rep-ms 30 --json plots_gpu/stacked_rows_sweep_h200.json \
  > $R/silu.log 2>&1
echo "silu sweep rc $?"; grep -v Warn $R/silu.log | tail -60
cp plots_gpu/stacked_rows_sweep_h200.json $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
