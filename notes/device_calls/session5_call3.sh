#!/usr/bin/env bash
# Session 5 call 3: the stacked expand's tile sweep at T 64 (for the next tuning step),
# then issue 5's run with every mode (targets 1-3 from one run), then, in the time left,
# the decode figures with the residency tile default.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
timeout 80 python3 run_stacked_expand.py --T 64 --json plots_gpu/stacked_expand_sweep_h200.json > $R/stacked_sweep.log 2>&1
echo "sweep rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/stacked_sweep.log | grep -v Warn | tail -30
timeout 440 python3 benchmark_inference_multilora.py --model-config llama3-8b --batch-size 64 --max-new-tokens 512 \
  --prompt-len 32 --num-adapters 7 --targets --out-dir plots_gpu --no-progress > $R/e2e.log 2>&1
echo "e2e rc $? ($(( $(date +%s) - T0 )) s)"; tail -30 $R/e2e.log
left=$(( 585 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl.py --public --figures mixed_rank bandwidth punica --out-dir plots_gpu > $R/decode.log 2>&1
echo "decode rc $? ($(( $(date +%s) - T0 )) s)"; tail -12 $R/decode.log
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu.tgz plots_gpu; rm -rf $R
