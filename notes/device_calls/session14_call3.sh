#!/usr/bin/env bash
# Session 14, call 3: vLLM 0.33.0's Triton LoRA kernels (public_kernels.py, vllm_triton)
# beside SGLang's: their GPU tests, then the decode figure with --public (target 6's decode
# points) and the report. Run with .whl carried (SGLang's wheel, vLLM's four kernel files).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 public_kernels.py 2>&1 | tail -4
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_public_kernels.py > $R/t_public.log 2>&1
echo "public tests: $(tail -1 $R/t_public.log) ($(( $(date +%s) - T0 )) s)"; grep -E "^(FAILED|ERROR)" $R/t_public.log | head -8
timeout 330 python3 multilora_impl.py --public --figures decode --out-dir plots_gpu > $R/figures.log 2>&1
echo "figures rc $? ($(( $(date +%s) - T0 )) s)"
cp plots/prefill_*.json plots_gpu/ 2>/dev/null   # the report reads prefill from the committed JSON
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[[1236]\]" | tee $R/report.log
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | sed -n '/^uniform:/,$p' > $R/tables.log
rm -f plots_gpu/prefill_*.json
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
