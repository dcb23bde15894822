#!/usr/bin/env bash
# Session 6, call 5: tile rule "rank" is the bgmv_cuda default now (call 4: faster at 12
# of 15 points, the other 3 within 0.06 us). Its GPU tests, then every decode figure with
# it (multilora_impl.py's defaults: decode, mixed_rank, bandwidth, punica).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 150 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
timeout $(( 540 - ($(date +%s) - T0) )) python3 multilora_impl.py --public --figures decode mixed_rank bandwidth punica \
  --out-dir plots_gpu > $R/figures.log 2>&1
echo "figures rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/figures.log | grep -E "^\[|wrote|bs=  64|bs= 256" | tail -40
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu.tgz plots_gpu; rm -rf $R
