#!/usr/bin/env bash
# Session 8, call 6 (PERF_LOG v27: the chunked shrink at 8 blocks per SM, 2 splits at the distinct point):
# the mma / chunks GPU tests (4 shards), memcheck of the chunked path, the variant sweep
# (default, rule "rank", rule "mma" with chunks), then the bandwidth figure (target 2) with
# the public kernels, as multilora_impl.py's defaults run it.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 150 $P tests/test_bgmv_cuda.py -k "mma or chunks or tile_rule" > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
echo "tests: $(( $(date +%s) - T0 )) s"
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/memcheck_mma.log 2>&1
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
timeout 60 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_rank cuda_mma_chunks \
  --rep-ms 20 --json plots_gpu/bgmv_shrink8_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -20
timeout $(( 470 - ($(date +%s) - T0) )) python3 multilora_impl.py --public --figures bandwidth \
  --out-dir plots_gpu > $R/figures.log 2>&1
echo "figures rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/figures.log | tail -12
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep "^\[2\]"
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
