#!/usr/bin/env bash
# Prepared in session 6 for the next device session (PERF_LOG "Next"): why bgmv_cuda's
# kernels run far under the copy rate at the issue-3 points that fail. ncu's full set
# (stall reasons, memory chart, occupancy) on one shrink + expand pair per point, the
# third call of each (warm code, cold-ish data), eager, each kernel alone.
# Points: uniform 7 bs 64 (target 1), mixed ranks bs 64 (target 4), 128 distinct r 64
# bs 256 (target 2), identical 4096 -> 11008 bs 64 (target 5's worst).
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
cat > /tmp/ncu_point.py <<'PY'
import sys
import torch
from multilora_impl import make_lora_inputs, make_workload
from bgmv_cuda import bgmv_cuda as bc
name = sys.argv[1]
T, h_out, L, r, ranks, kind = {"u7_bs64": (64, 4096, 7, 16, None, "uniform"),
                               "mixed_bs64": (64, 4096, 32, 64, [8, 16, 32, 64] * 8, "uniform"),
                               "distinct128_r64_bs256": (256, 4096, 128, 64, None, "twice"),
                               "punica_identical_bs64": (64, 11008, 7, 16, None, "identical")}[name]
bc.ensure_loaded()
if kind == "twice":
    idx = torch.arange(L).repeat(2)[torch.randperm(2 * L)][:T].int().cuda()
else:
    idx = make_workload(kind, T, L, seed=T).cuda()
s = make_lora_inputs(T, 4096, h_out, L, r, torch.bfloat16, "cuda", ranks=ranks)
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"])
torch.cuda.synchronize()
PY
for p in u7_bs64 mixed_bs64 distinct128_r64_bs256 punica_identical_bs64; do
  PYTHONPATH=$PWD timeout 120 ncu --set full --clock-control none -k regex:bgmv --launch-skip 4 \
    --launch-count 2 -o $R/$p python3 /tmp/ncu_point.py $p > $R/ncu_$p.log 2>&1
  echo "$p rc $?"
  ncu --import $R/$p.ncu-rep --csv --page details > $R/$p.csv 2>/dev/null
  grep -E "Duration|DRAM Throughput|Achieved Occupancy|Stall|Registers Per|Waves Per" $R/$p.csv | cut -c1-200 | head -40
done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
