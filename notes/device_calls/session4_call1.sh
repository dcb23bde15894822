#!/usr/bin/env bash
# Session 4 call 1: correctness of main's engine kernels (+ memcheck/racecheck), issue 6's
# engine load for sgmv_triton, both branches' bgmv_cuda GPU tests, all in parallel; then
# the ENGINE_AB timing alone on the GPU.
set -u
T0=$(date +%s)
ROOT=$PWD
mkdir -p $OUT/br
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
for b in v5 grp; do (cd _br/$b && python3 bgmv_cuda/bgmv_cuda.py > $OUT/br/${b}_build.log 2>&1) & done
wait
( OUT=$OUT/main TESTS_TIMEOUT=300 SANITIZE=1 SANITIZE_TIMEOUT=300 \
  SANITIZE_FILES="tests/test_engine_kernels.py tests/test_engine.py" \
  SANITIZE_K="(gpu_decode_attention or gpu_fused_kernels or gpu_sampler) and not timing" \
  RACECHECK_K="gpu_fused_kernels or gpu_decode_attention" \
  PYTEST_ARGS="tests/test_engine_kernels.py tests/test_engine.py" \
  bash tests/gpu_run.sh > $OUT/main_summary.txt 2>&1 ) &
( timeout 300 python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/test_robustness.py \
    -k "engine_load and sgmv" > $OUT/br/engine_load_sgmv.log 2>&1 ) &
for b in v5 grp; do
  for i in 0 1 2 3; do
    ( cd _br/$b && MULTILORA_SHARD=$i/4 timeout 300 python3 -m pytest -m gpu -q -rA \
        -p no:cacheprovider tests/test_bgmv_cuda.py > $OUT/br/${b}_tests_$i.log 2>&1 ) &
  done
done
wait
echo "correctness phase: $(( $(date +%s) - T0 )) s" | tee $OUT/br/times.txt
for f in $OUT/br/*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head; done
left=$(( 575 - ($(date +%s) - T0) ))
echo "ENGINE_AB budget $left s" | tee -a $OUT/br/times.txt
mkdir -p $OUT/ab/logs
( OUT=$OUT/ab TESTS=0 ENGINE_AB=1 timeout $left bash tests/gpu_run.sh > $OUT/ab_summary.txt 2>&1 )
echo "end: $(( $(date +%s) - T0 )) s" | tee -a $OUT/br/times.txt
tar czf $OUT/br.tgz -C $OUT br && rm -rf $OUT/br
[ -f $OUT/ab/plots_gpu.tgz ] || tar czf $OUT/ab_plots.tgz plots_gpu
[ -d $OUT/ab/logs ] && tar czf $OUT/ab_logs.tgz -C $OUT/ab logs && rm -rf $OUT/ab/logs
ls -R $OUT | head -30
