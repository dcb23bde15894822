#!/usr/bin/env bash
# Session 14, call 6: the Punica grid figure (target 5) with --public in a process of its own
# (call 5's run measured the launch floor after the mixed-rank figure: 1.25 us instead of
# 0.93; main() now measures it first, after a copy), and the engine's GPU tests that run
# sgmv_triton (v50 changed what its halves pass). Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 200 python3 multilora_impl.py --public --figures punica --out-dir plots_gpu > $R/figures.log 2>&1
echo "punica rc $? ($(( $(date +%s) - T0 )) s)"; grep -E "copy bandwidth" $R/figures.log
python3 multilora_impl.py --report --out-dir plots_gpu 2>&1 | grep -E "^\[5\] worst" | tee $R/report.log
timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_engine.py tests/test_e2e.py -k "sgmv" > $R/t_engine_sgmv.log 2>&1
echo "engine sgmv tests: $(tail -1 $R/t_engine_sgmv.log) ($(( $(date +%s) - T0 )) s)"; grep -E "^(FAILED|ERROR)" $R/t_engine_sgmv.log | head -8
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
