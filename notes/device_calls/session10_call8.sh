#!/usr/bin/env bash
# Session 10, call 8 (the last ~450 device-seconds): v36, the FMA expand's work after the
# wait trimmed. The sweep (default, without PDL, mma with chunks as the untouched drift
# check), bgmv_cuda's GPU tests (4 shards) beside the robustness file's bgmv_cuda tests,
# then the decode figures with the public kernels and the report. Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 60 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_nopdl cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_v36_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 110 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
MULTILORA_SHARD=0/1 timeout 110 $P tests/test_robustness.py -k "bgmv_cuda and not engine_load" > $R/t_robust.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
left=$(( 420 - ($(date +%s) - T0) ))
if [ $left -gt 190 ]; then
  timeout $left python3 multilora_impl.py --public --figures decode mixed_rank bandwidth punica --out-dir plots_gpu > $R/figures.log 2>&1
  echo "figures rc $? ($(( $(date +%s) - T0 )) s)"
  python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[" | grep -v "^\[5\] [a-z]* *bs=" | tee $R/report.log
fi
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
