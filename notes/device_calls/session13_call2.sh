#!/usr/bin/env bash
# Session 13, call 2 (v46: rank-major expand at 4 blocks / SM): its GPU tests and the
# token list's, the mixed-rank probe (both storages), then the mixed_rank figure (with the
# public kernels: run with .whl carried).
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 150 $P tests/test_bgmv_cuda.py -k "rank_major or rank_work or matches_reference" > $R/t_rm.log 2>&1
echo "tests: $(( $(date +%s) - T0 )) s: $(tail -1 $R/t_rm.log)"; grep -E "^(FAILED|ERROR)" $R/t_rm.log | head -8
timeout 150 python3 notes/probes/mixed_rank_probe.py > $R/mixed_probe.log 2>&1
echo "probe rc $? ($(( $(date +%s) - T0 )) s)"; cat $R/mixed_probe.log
mkdir -p $R/plots; cp plots/decode_*.json plots/prefill_*.json $R/plots/
left=$(( 560 - ($(date +%s) - T0) ))
timeout $left python3 multilora_impl.py --public --figures mixed_rank --out-dir $R/plots > $R/mixed_fig.log 2>&1
echo "figure rc $? ($(( $(date +%s) - T0 )) s)"; tail -30 $R/mixed_fig.log
python3 multilora_impl.py --report --out-dir $R/plots 2>&1 | grep "^\[4\]"
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
