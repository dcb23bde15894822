#!/usr/bin/env bash
# Session 6, call 6 (what the device budget left): ncu of bgmv_cuda's shrink and expand
# (default rule "rank") at the issue-3 points that fail: uniform 7 batch 64 (target 1),
# mixed ranks batch 64 (target 4), 128 distinct r 64 batch 256 (target 2). Eager calls,
# each kernel alone (ncu serialises, so no PDL overlap): which half to work on next.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
cat > /tmp/ncu_points.py <<'PY'
import torch
from multilora_impl import make_lora_inputs, make_workload
from bgmv_cuda import bgmv_cuda as bc
bc.ensure_loaded()
for name, T, L, r, ranks in (("u7 bs64", 64, 7, 16, None), ("mixed bs64", 64, 32, 64, [8, 16, 32, 64] * 8),
                             ("distinct128 r64 bs256", 256, 128, 64, None)):
    idx = (torch.arange(L).repeat(2)[torch.randperm(2 * L)][:T].int() if L == 128
           else make_workload("uniform", T, L, seed=T)).cuda()
    s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda", ranks=ranks)
    for _ in range(3):      # the third call is the one read (-s 2 per point below)
        torch.cuda.nvtx.range_push(name)
        bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"])
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
PY
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__waves_per_multiprocessor,lts__t_sector_hit_rate.pct
PYTHONPATH=$PWD timeout 200 ncu --clock-control none -k regex:bgmv --metrics $M --csv python3 /tmp/ncu_points.py > $R/ncu.csv 2> $R/ncu.err
echo "ncu rc $?"; python3 - <<'PY'
import csv, os
rows = list(csv.DictReader(l for l in open(os.environ["OUT"] + "/r/ncu.csv") if l.startswith('"')))
for r in rows:
    print(r["ID"], r["Kernel Name"][:40], r["Metric Name"], r["Metric Value"])
PY
tar czf $OUT/r.tgz -C $OUT r; rm -rf $R
