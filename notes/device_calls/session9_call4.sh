#!/usr/bin/env bash
# Session 9, call 4: ncu (full set, SASS-level stall samples) of the chunked mma shrink and
# expand at the distinct point, to see where the expand's 26.2 us (call 3; a pure read of
# its bytes ~17) go.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $?"
cat > /tmp/ncu_pair.py <<'PY'
import torch
from multilora_impl import make_lora_inputs, make_meta
from bgmv_cuda import bgmv_cuda as bc
T, L, r = 256, 128, 64
bc.ensure_loaded()
g = torch.Generator().manual_seed(0)
idx = torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)][:T].int().cuda()
meta = make_meta(idx)
s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda")
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, meta)
torch.cuda.synchronize()
PY
for k in expand shrink; do
  PYTHONPATH=$PWD timeout 120 ncu --set full --import-source yes --clock-control none -k regex:_bgmv_${k}_mma \
    --launch-skip 2 --launch-count 1 -o $R/ncu_$k python3 /tmp/ncu_pair.py > $R/ncu_$k.log 2>&1
  echo "$k rc $?"
  ncu --import $R/ncu_$k.ncu-rep --csv --page details > $R/ncu_$k.csv 2>/dev/null
  ncu --import $R/ncu_$k.ncu-rep --csv --page source --print-source sass > $R/ncu_src_$k.csv 2>/dev/null
  python3 -c "import csv,sys
for d in csv.DictReader(open(sys.argv[1])):
    if d['Metric Name'] in ('Duration','DRAM Throughput','Issue Slots Busy','Executed Instructions','L2 Hit Rate','Achieved Occupancy','Registers Per Thread','Eligible Warps Per Scheduler','Warp Cycles Per Issued Instruction'):
        print(d['Kernel Name'][:40], d['Metric Name'], d['Metric Value'])" $R/ncu_$k.csv
done
rm -f $R/*.ncu-rep; gzip $R/ncu_src_*.csv
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
