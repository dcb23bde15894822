#!/usr/bin/env bash
# Session 6, call 2: call 1 measured the all-folded stacked expand slower end to end (the
# per-token RoPE programs re-read B: 32.6 us per layer) but o / down folded into
# add_rms_norm faster (4.90 against 6.60 us for the pair); "triton_norm" (those two only)
# is now the CUDA default. GPU tests of it, then issue 5's full run alone on the GPU.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 200 $P tests/test_engine.py -k "stacked or peft" > $R/t_engine_stacked.log 2>&1 &
timeout 200 $P tests/test_engine_kernels.py -k "stacked_fused_elementwise" > $R/t_kernels.log 2>&1 &
wait
echo "tests: $(( $(date +%s) - T0 )) s"
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -12; done
timeout $(( 590 - ($(date +%s) - T0) )) python3 benchmark_inference_multilora.py --model-config llama3-8b \
  --batch-size 64 --max-new-tokens 512 --prompt-len 32 --num-adapters 7 --targets > $R/e2e_issue5.log 2>&1
echo "e2e rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/e2e_issue5.log | tail -30
mkdir -p $R/plots; cp plots/e2e_llama3-8b_b64_L7_r16_n512.* $R/plots/ 2>/dev/null
tar czf $OUT/r.tgz -C $OUT r; rm -rf $R
