#!/usr/bin/env bash
# Session 8, call 8: after the review's test refactor (_mma_case_idx, _assert_mma_output)
# and make_meta's single host read of idx, the mma / chunks GPU tests again.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider \
    tests/test_bgmv_cuda.py -k "mma_rule or mma_chunks" > $R/t_mma_$i.log 2>&1 &
done
wait
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
