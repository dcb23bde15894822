#!/usr/bin/env bash
# Session 10, call 5: data for targets 1 and 5 at the current code. (1) The split-K
# variants against the default after v31 / v33 (the last split numbers at small batch
# predate v11-v33). (2) ncu, full set with SASS-level stall samples, of rule "rank"'s
# shrink and expand at batch 64 uniform over 7 adapters (eager, each kernel alone): the
# samples PERF_LOG's "Next (after session 9)" asked for.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_split cuda_split2 --rep-ms 10 \
  --json plots_gpu/bgmv_split_h200.json > $R/variants.log 2>&1
echo "variants rc $? ($(( $(date +%s) - T0 )) s)"; grep -v Warn $R/variants.log | tail -29
cat > /tmp/ncu_pair.py <<'PY'
import torch
from multilora_impl import make_lora_inputs, make_workload
from bgmv_cuda import bgmv_cuda as bc
T, L, r = 64, 7, 16
bc.ensure_loaded()
idx = make_workload("uniform", T, L, seed=T).cuda()
s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda")
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, tiles="rank")
torch.cuda.synchronize()
PY
for k in shrink expand; do
  PYTHONPATH=$PWD timeout 100 ncu --set full --import-source yes --clock-control none -k regex:_bgmv_${k}_kernel \
    --launch-skip 2 --launch-count 1 -o $R/ncu_$k python3 /tmp/ncu_pair.py > $R/ncu_$k.log 2>&1
  echo "$k rc $? ($(( $(date +%s) - T0 )) s)"
  ncu --import $R/ncu_$k.ncu-rep --csv --page details > $R/ncu_$k.csv 2>/dev/null
  ncu --import $R/ncu_$k.ncu-rep --csv --page source --print-source sass > $R/ncu_src_$k.csv 2>/dev/null
  python3 -c "import csv,sys
for d in csv.DictReader(open(sys.argv[1])):
    if d['Metric Name'] in ('Duration','DRAM Throughput','Issue Slots Busy','Executed Instructions','L2 Hit Rate','Achieved Occupancy','Registers Per Thread','Eligible Warps Per Scheduler','Warp Cycles Per Issued Instruction','Grid Size'):
        print(d['Kernel Name'][:40], d['Metric Name'], d['Metric Value'])" $R/ncu_$k.csv
done
rm -f $R/*.ncu-rep; gzip $R/ncu_src_*.csv
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
