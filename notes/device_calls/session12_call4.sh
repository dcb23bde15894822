#!/usr/bin/env bash
# Session 12, call 4 (final state, v41): the decode figures with the public kernels and the
# report, then the GPU tests side by side: bgmv_cuda (4 shards), the robustness file's
# bgmv_cuda tests (8 shards: random sweeps with mixed ranks run the token list), test_engine
# (2 shards), test_e2e, test_multilora_impl. Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 260 python3 multilora_impl.py --public --figures decode mixed_rank bandwidth punica --out-dir plots_gpu > $R/figures.log 2>&1
echo "figures rc $? ($(( $(date +%s) - T0 )) s)"
cp plots/prefill_*.json plots_gpu/ 2>/dev/null   # the report reads prefill from the committed JSON
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[" | grep -v "^\[5\] [a-z]* *bs=" | tee $R/report.log
grep -E "mixed|padded" $R/figures.log | head -6
left=$(( 570 - ($(date +%s) - T0) ))
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout $left $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
for i in 0 1 2 3 4 5 6 7; do
  MULTILORA_SHARD=$i/8 timeout $left $P tests/test_robustness.py -k "bgmv_cuda and not engine_load" > $R/t_robust_$i.log 2>&1 &
done
for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout $left $P tests/test_engine.py > $R/t_engine_$i.log 2>&1 &
done
timeout $left $P tests/test_e2e.py tests/test_multilora_impl.py > $R/t_e2e_impl.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
rm -f plots_gpu/prefill_*.json
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
