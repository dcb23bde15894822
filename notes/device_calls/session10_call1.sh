#!/usr/bin/env bash
# Session 10, call 1: v32, the cluster kernel (bgmv_lora(variant="cluster")). bgmv_cuda's
# GPU tests (4 shards: the cluster variant's, and the untested odd_h case and binding
# refactor of session 9), memcheck over the cluster tests, then the variant sweep of the
# default against the cluster kernel.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
tail -3 $R/build.log
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 170 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 170 compute-sanitizer --tool memcheck --error-exitcode 9 \
  $P tests/test_bgmv_cuda.py -k "cluster and not graph" > $R/memcheck_cluster.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log $R/memcheck_cluster.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
timeout 200 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_cluster --rep-ms 10 \
  --json plots_gpu/bgmv_cluster_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -30
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
