#!/usr/bin/env bash
# Session 8, call 7: the final code (v26 kept; v23-v25, v27 reverted) against every GPU test
# of bgmv_cuda (4 shards) and the robustness tests of bad idx and the debug flag with
# make_meta's metas (its chunk rows changed shape in v26).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 240 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
timeout 240 $P tests/test_robustness.py -k "gpu_out_of_range or gpu_debug_flag" > $R/t_robustness.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
