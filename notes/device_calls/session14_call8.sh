#!/usr/bin/env bash
# Session 14, call 8: the public kernels' GPU tests after the review (both loaders behind
# _load_once). Run with .whl carried.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null && export PYTHONPATH=/tmp/site
timeout 150 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_public_kernels.py > $R/t_public.log 2>&1
echo "public tests: $(tail -1 $R/t_public.log) ($(( $(date +%s) - T0 )) s)"; grep -E "^(FAILED|ERROR)" $R/t_public.log | head -8
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
