#!/usr/bin/env bash
# Session 4 call 3: GPU tests of the new SGMV tiles and engine defaults, then issue 5's
# e2e run (new defaults: fused elementwise + Triton decode attention), then the prefill
# figure with --public (new SGMV tiles).
set -u
T0=$(date +%s)
R=$OUT/r; mkdir -p $R plots_gpu
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
pids=()
for f in tests/test_sgmv_triton.py tests/test_engine.py; do for i in 0 1; do
  MULTILORA_SHARD=$i/2 timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider $f > $R/tests_$(basename $f .py)_$i.log 2>&1 & pids+=($!)
done; done
timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_benchmark_e2e.py > $R/tests_benchmark_e2e.log 2>&1 & pids+=($!)
for p in "${pids[@]}"; do wait $p; done
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/tests_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head; done
timeout 330 python3 benchmark_inference_multilora.py --model-config llama3-8b --batch-size 64 --max-new-tokens 512 \
  --prompt-len 32 --num-adapters 7 --out-dir plots_gpu --no-progress > $R/e2e.log 2>&1
echo "e2e rc $? ($(( $(date +%s) - T0 )) s)"; tail -22 $R/e2e.log
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl_prefill.py --public --out-dir plots_gpu > $R/prefill.log 2>&1
echo "prefill rc $? ($(( $(date +%s) - T0 )) s)"; tail -30 $R/prefill.log
tar czf $OUT/r.tgz -C $OUT r plots_gpu 2>/dev/null || tar czf $OUT/r.tgz -C $OUT r
tar czf $OUT/plots_gpu.tgz plots_gpu
