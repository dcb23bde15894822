#!/usr/bin/env bash
# Session 11, call 5: the prefill figures at the final state (last drawn in session 5, at
# 465f983, before sessions 7-10 changed bgmv_cuda), regular and ragged, with the public
# kernels; then, with the time left, the robustness file's sgmv tests (v40). Run with .whl.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 230 python3 multilora_impl_prefill.py --public --out-dir plots_gpu > $R/prefill.log 2>&1
echo "prefill rc $? ($(( $(date +%s) - T0 )) s)"; tail -14 $R/prefill.log
left=$(( 530 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl_prefill.py --public --ragged --out-dir plots_gpu > $R/prefill_ragged.log 2>&1
echo "ragged rc $? ($(( $(date +%s) - T0 )) s)"; tail -8 $R/prefill_ragged.log
left=$(( 560 - ($(date +%s) - T0) ))
if [ $left -gt 30 ]; then
  MULTILORA_SHARD=0/1 timeout $left python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_robustness.py \
    -k "sgmv and not engine_load" > $R/t_robust_sgmv.log 2>&1
  echo "== t_robust_sgmv: $(tail -1 $R/t_robust_sgmv.log)"; grep -E "^(FAILED|ERROR)" $R/t_robust_sgmv.log | head -8
fi
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
