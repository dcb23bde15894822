#!/usr/bin/env bash
# Session 12, call 6 (v43: the token list's blocks tile by tile): the mixed-rank probe, the
# mixed_rank figure alone (the only figure whose points pass ranks) and its report line,
# then bgmv_cuda's GPU tests (4 shards). Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
timeout 150 python3 multilora_impl.py --public --figures mixed_rank --out-dir plots_gpu > $R/figures.log 2>&1
echo "figure rc $? ($(( $(date +%s) - T0 )) s)"
cp plots/decode_lora_*.json plots/decode_bandwidth_*.json plots/decode_punica_*.json plots/prefill_*.json plots_gpu/ 2>/dev/null
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[4\]" | tee $R/report.log
left=$(( 560 - ($(date +%s) - T0) ))
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout $left $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
cp plots_gpu/decode_mixed_rank.* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
