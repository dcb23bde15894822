#!/usr/bin/env bash
# Session 9, call 8: v29 and the default's new switch (mma_chunks_pay: >= 48 MB of
# per-token weight traffic). The GPU tests of bgmv_cuda, the engine, end to end and
# robustness (tests/gpu_run.sh), then every decode figure with the public kernels
# (multilora_impl.py's defaults) and the issue-3 report. Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
( OUT=$R PYTEST_ARGS="tests/test_bgmv_cuda.py tests/test_engine.py tests/test_e2e.py tests/test_robustness.py" \
  TESTS_TIMEOUT=240 bash tests/gpu_run.sh > $R/tests_summary.txt 2>&1 )
cat $R/tests_summary.txt; echo "tests: $(( $(date +%s) - T0 )) s"
export PYTHONPATH=/tmp/site       # gpu_run.sh installed the .whl packages there
timeout $(( 570 - ($(date +%s) - T0) )) python3 multilora_impl.py --public \
  --figures decode mixed_rank bandwidth punica --out-dir plots_gpu > $R/figures.log 2>&1
echo "figures rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/figures.log | grep -E "^\[|wrote" | tail -20
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | tee $R/report.log | tail -12
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
