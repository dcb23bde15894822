#!/usr/bin/env bash
# Session 13, call 5 (the final state): bgmv_cuda's GPU tests (4 shards), then the
# mixed_rank figure with the public kernels (run with .whl carried) and its report line.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R/plots
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 200 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
cp plots/decode_*.json plots/prefill_*.json $R/plots/
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl.py --public --figures mixed_rank --out-dir $R/plots > $R/mixed_fig.log 2>&1
echo "figure rc $? ($(( $(date +%s) - T0 )) s)"; tail -5 $R/mixed_fig.log
python3 multilora_impl.py --report --out-dir $R/plots 2>&1 | grep "^\[4\]"
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
