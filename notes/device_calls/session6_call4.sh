#!/usr/bin/env bash
# Prepared in session 5 for the next device session: the bgmv_cuda changes made without a
# GPU (PERF_LOG v10: tile rule "rank"; v11: the J = 1 expand's B load before the PDL wait).
# GPU tests + memcheck of tests/test_bgmv_cuda.py in parallel; then, alone on the GPU, the
# variant sweep (cuda = residency + v11, cuda_rank = v10) and the mixed-rank figure with
# rule "rank", then the standard decode figure with the current default.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu plots_gpu/rank
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
pids=()
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout 240 $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 & pids+=($!)
  MULTILORA_SHARD=$i/4 PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck \
    --error-exitcode 99 --print-limit 50 --target-processes all $P tests/test_bgmv_cuda.py \
    -k "not graph and not pdl and not compile and not timing and not raw_ops and not mirrored_kernel and not script_runs" \
    > $R/memcheck_bgmv_cuda_$i.log 2>&1 & pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
timeout 150 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_nopdl cuda_tiles cuda_rank \
  --rep-ms 20 --json plots_gpu/bgmv_rank_j1_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; tail -22 $R/variants.log
MULTILORA_EXPAND_TILES=rank timeout 60 python3 multilora_impl.py --public --figures mixed_rank \
  --out-dir plots_gpu/rank > $R/mixed_rank.log 2>&1
echo "mixed rank rc $? ($(( $(date +%s) - T0 )) s)"; tail -6 $R/mixed_rank.log
left=$(( 575 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl.py --public --figures decode --out-dir plots_gpu > $R/decode.log 2>&1
echo "decode rc $? ($(( $(date +%s) - T0 )) s)"; tail -12 $R/decode.log
tar czf $OUT/r.tgz -C $OUT r; tar czf $OUT/plots_gpu.tgz plots_gpu; rm -rf $R
