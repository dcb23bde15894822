#!/usr/bin/env bash
# Session 14, call 5: v50 (sgmv_triton's expand adds the shrink's split-K partials). Its GPU
# tests, the prefill figures (regular: targets 3 and 6; ragged) with --public, the report;
# then, with the time left, the other decode figures (mixed_rank, bandwidth, punica) with
# vLLM's kernels added. Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 120 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_sgmv_triton.py > $R/t_sgmv.log 2>&1
echo "sgmv tests: $(tail -1 $R/t_sgmv.log) ($(( $(date +%s) - T0 )) s)"; grep -E "^(FAILED|ERROR)" $R/t_sgmv.log | head -8
timeout 150 python3 multilora_impl_prefill.py --public --out-dir plots_gpu > $R/prefill.log 2>&1
echo "prefill rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "req=  8 tok/req=  512" $R/prefill.log
timeout 150 python3 multilora_impl_prefill.py --public --ragged --out-dir plots_gpu > $R/prefill_ragged.log 2>&1
echo "ragged rc $? ($(( $(date +%s) - T0 )) s)"
cp plots/decode_lora*.json plots_gpu/ 2>/dev/null   # the report reads decode from the committed JSON
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[[36]\]" | tee $R/report.log
rm -f plots_gpu/decode_lora*.json
left=$(( 570 - ($(date +%s) - T0) ))
if [ $left -gt 150 ]; then
  timeout $left python3 multilora_impl.py --public --figures mixed_rank bandwidth punica --out-dir plots_gpu > $R/figures.log 2>&1
  echo "figures rc $? ($(( $(date +%s) - T0 )) s)"
fi
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
