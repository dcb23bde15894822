#!/usr/bin/env bash
# Session 8, call 3: variant "cluster" revised (8 warps, clusters of 8 or 16; PERF_LOG v24b).
# Its GPU tests, memcheck and racecheck (the shared-memory ring and DSMEM), the variant
# sweep against the two-launch kernels, ncu of the cluster kernel at the distinct point.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $?"; tail -3 $R/build.log
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 200 $P tests/test_bgmv_cuda.py -k "cluster" > $R/t_cluster.log 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "cluster_variant_matches and (uniform or ranks or slices or bad_idx or h11008)" > $R/memcheck_cluster.log 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 150 compute-sanitizer --tool racecheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "cluster_variant_matches and (ranks or h11008)" > $R/racecheck_cluster.log 2>&1
for f in $R/t_*.log $R/memcheck_*.log $R/racecheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY|RACECHECK SUMMARY|Error" $f | head -8; done
timeout 150 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks cuda_cluster8 cuda_cluster16 \
  --rep-ms 20 --json plots_gpu/bgmv_cluster_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -20
cp plots_gpu/bgmv_cluster_h200.json $R/ 2>/dev/null
cat > /tmp/ncu_cluster.py <<'PY'
import sys
import torch
from multilora_impl import make_lora_inputs, make_meta
from bgmv_cuda import bgmv_cuda as bc
T, L, r = (256, 128, 64) if sys.argv[1] == "distinct" else (64, 7, 16)
bc.ensure_loaded()
idx = (torch.arange(L).repeat(2)[torch.randperm(2 * L)][:T] if L == 128 else torch.randint(0, L, (T,))).int().cuda()
meta = make_meta(idx)
s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda")
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, meta, variant="cluster")
torch.cuda.synchronize()
PY
for pt in distinct u7; do
  PYTHONPATH=$PWD timeout 90 ncu --set full --clock-control none -k regex:cluster --launch-skip 2 \
    --launch-count 1 -o $R/ncu_$pt python3 /tmp/ncu_cluster.py $pt > $R/ncu_$pt.log 2>&1
  echo "$pt rc $?"
  ncu --import $R/ncu_$pt.ncu-rep --csv --page details > $R/ncu_$pt.csv 2>/dev/null
  ncu --import $R/ncu_$pt.ncu-rep --csv --page source --print-source sass > $R/ncu_src_$pt.csv 2>/dev/null
  python3 -c "import csv,sys
for d in csv.DictReader(open(sys.argv[1])):
    if d['Metric Name'] in ('Duration','DRAM Throughput','Issue Slots Busy','Executed Instructions','L2 Hit Rate','Achieved Occupancy','Registers Per Thread','Eligible Warps Per Scheduler'):
        print(d['Kernel Name'][:40], d['Metric Name'], d['Metric Value'])" $R/ncu_$pt.csv
done
rm -f $R/*.ncu-rep
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
