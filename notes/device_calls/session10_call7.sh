#!/usr/bin/env bash
# Session 10, call 7: v35 (the shrink's parameters read before the PDL wait). The sweep's
# default with and without PDL against call 5, then ncu's stall samples of the shrink at
# bs 64 u7 again (its "imc" share), then bgmv_cuda's GPU tests if time is left.
set -u
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1; echo "build rc $? ($(( $(date +%s) - T0 )) s)"
timeout 100 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_nopdl cuda_mma_chunks --rep-ms 10 \
  --json plots_gpu/bgmv_v35_h200.json > $R/variants.log 2>&1
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
PYTHONPATH=$PWD timeout 60 ncu --set full --import-source yes --clock-control none -k regex:_bgmv_shrink_kernel \
  --launch-skip 2 --launch-count 1 -o $R/ncu_shrink python3 /tmp/ncu_pair.py > $R/ncu_shrink.log 2>&1
echo "ncu rc $? ($(( $(date +%s) - T0 )) s)"
ncu --import $R/ncu_shrink.ncu-rep --csv --page source --print-source sass > $R/ncu_src_shrink.csv 2>/dev/null
python3 - $R/ncu_src_shrink.csv <<'PY'
import csv, sys
f = open(sys.argv[1]); f.readline()
rows = list(csv.DictReader(f))
tot = sum(float(r["Warp Stall Sampling (All Samples)"] or 0) for r in rows)
imc = sum(float(r["stall_imc"] or 0) for r in rows if r["stall_imc"] not in ("", "-"))
print(f"shrink stall samples {tot:.0f}, imc {imc / tot * 100:.1f}%")
PY
rm -f $R/*.ncu-rep; gzip $R/ncu_src_*.csv
left=$(( 280 - ($(date +%s) - T0) ))
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
for i in 0 1 2 3; do
  MULTILORA_SHARD=$i/4 timeout $left $P tests/test_bgmv_cuda.py > $R/t_bgmv_cuda_$i.log 2>&1 &
done
wait
for f in $R/t_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -8; done
cp plots_gpu/* $R/ 2>/dev/null
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
