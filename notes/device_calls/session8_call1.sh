#!/usr/bin/env bash
# Prepared in session 7 for the next device session (PERF_LOG "Next", target 2): does the
# size of each stream's DRAM request limit the chunked tensor-core expand?  Rule "mma_il"
# puts a block's 4 warps on consecutive B tiles (each block step asks for 8 KB at r 64
# instead of 4 separate 2 KB pieces).  GPU tests of the mma rules (mma_il bitwise equal to
# mma), memcheck, the variant sweep, ncu of both expands at the distinct point.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 200 $P tests/test_bgmv_cuda.py -k "mma or chunks or tile_rule" > $R/t_mma.log 2>&1
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 200 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/memcheck_mma.log 2>&1
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY" $f | head -8; done
timeout 120 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma_chunks cuda_mma_il_chunks \
  --rep-ms 20 --json plots_gpu/bgmv_mma_il_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -20
cp plots_gpu/bgmv_mma_il_h200.json $R/ 2>/dev/null
cat > /tmp/ncu_il.py <<'PY'
import sys
import torch
from multilora_impl import make_lora_inputs, make_meta
from bgmv_cuda import bgmv_cuda as bc
T, L, r = 256, 128, 64
bc.ensure_loaded()
idx = torch.arange(L).repeat(2)[torch.randperm(2 * L)][:T].int().cuda()
meta = make_meta(idx)
s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda")
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, meta, tiles=sys.argv[1])
torch.cuda.synchronize()
PY
for rule in mma mma_il; do
  PYTHONPATH=$PWD timeout 90 ncu --set full --clock-control none -k regex:expand_mma --launch-skip 2 \
    --launch-count 1 -o $R/ncu_$rule python3 /tmp/ncu_il.py $rule > $R/ncu_$rule.log 2>&1
  echo "$rule rc $?"
  ncu --import $R/ncu_$rule.ncu-rep --csv --page details > $R/ncu_$rule.csv 2>/dev/null
  python3 -c "import csv,sys
for d in csv.DictReader(open(sys.argv[1])):
    if d['Metric Name'] in ('Duration','DRAM Throughput','Issue Slots Busy','Executed Instructions','L2 Hit Rate'):
        print(d['Kernel Name'][:48], d['Metric Name'], d['Metric Value'])" $R/ncu_$rule.csv
done
rm -f $R/*.ncu-rep
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
