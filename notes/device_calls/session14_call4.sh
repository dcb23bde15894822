#!/usr/bin/env bash
# Session 14, call 4: the prefill figures (regular: target 6's prefill points, and ragged)
# with --public, now with vLLM's kernels beside SGLang's; then the report. Run with .whl.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 280 python3 multilora_impl_prefill.py --public --out-dir plots_gpu > $R/prefill.log 2>&1
echo "prefill rc $? ($(( $(date +%s) - T0 )) s)"; tail -4 $R/prefill.log
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl_prefill.py --public --ragged --out-dir plots_gpu > $R/prefill_ragged.log 2>&1
echo "ragged rc $? ($(( $(date +%s) - T0 )) s)"; tail -4 $R/prefill_ragged.log
cp plots/decode_*.json plots_gpu/ 2>/dev/null   # the report reads decode from the committed JSON
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[[36]\]" | tee $R/report.log
rm -f plots_gpu/decode_*.json
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
