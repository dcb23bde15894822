#!/usr/bin/env bash
# Session 7, call 11: after removing tile rule "pairs" (the binding's shrink lost an
# argument, rule "mma" became index 3): the bgmv_cuda GPU tests of the tile rules, rule
# "mma", the chunks and the variants, in 4 shards (the kernels' SASS is unchanged).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 100 $P tests/test_bgmv_cuda.py -k "mma or chunks or tile_rule or variant or lora" \
    > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
