#!/usr/bin/env bash
# Session 7, PERF_LOG v20 (rule "mma": the expand's per-tile instructions cut; chunked shrink and expand per chunk
# of tokens of one adapter on the tensor cores): GPU tests of rule "mma" and every tile
# rule, memcheck of the chunked edge cases, the variant sweep against the default (rule
# "rank"), and ncu of the chunked kernels at the points of targets 1, 2 and 4.
set -u
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
R=$OUT/r; mkdir -p $R plots_gpu
python3 bgmv_cuda/bgmv_cuda.py > $R/build.log 2>&1
P="python3 -m pytest -m gpu -q -rA -p no:cacheprovider"
timeout 240 $P tests/test_bgmv_cuda.py -k "mma or chunks or tile_rule" > $R/t_mma.log 2>&1 &
PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 240 compute-sanitizer --tool memcheck --error-exitcode 99 \
  --print-limit 50 $P tests/test_bgmv_cuda.py -k "mma_chunks" > $R/memcheck_mma.log 2>&1 &
wait
for f in $R/t_*.log $R/memcheck_*.log; do echo "== $(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)|ERROR SUMMARY|Error|assert" $f | head -12; done
timeout 150 python3 bgmv_cuda/run_bgmv_cuda.py --variants --only cuda cuda_mma cuda_mma_chunks \
  --rep-ms 20 --json plots_gpu/bgmv_mma_v20_h200.json > $R/variants.log 2>&1
echo "variants rc $?"; grep -v Warn $R/variants.log | tail -22
cp plots_gpu/bgmv_mma_v20_h200.json $R/ 2>/dev/null
cat > /tmp/split_sweep.py <<'PY'
# The distinct point (128 adapters twice, r 64, bs 256) under rule "mma" with chunks, the
# chunked shrink's split fixed to k (mma_split picks 3 here), CUDA-graph replay over a pool.
import torch
import bench_utils as bu
from multilora_impl import make_lora_inputs, make_meta
from bgmv_cuda import bgmv_cuda as bc
T, L, r = 256, 128, 64
g = torch.Generator().manual_seed(0)
idx = torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)].int().cuda()
meta = make_meta(idx)
nbytes = bu.lora_bytes(idx, 4096, [4096], r, torch.bfloat16, None)
n_sets = bu.pool_size(nbytes, max_sets=32)
sets = [make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda", seed=k) for k in range(n_sets)]
copy = bu.copy_bandwidth_gbs("cuda", nbytes=2 * 2**29)
print(f"copy {copy:.0f} GB/s, {nbytes / 1e6:.1f} MB per call, mma_split picks",
      bc.mma_split(meta.chunks.shape[0], 1, r, 4096, torch.cuda.get_device_properties(0).multi_processor_count))
for k in (1, 2, 3, 4, 6, 8):
    def call(i, k=k):
        s = sets[i]
        bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, meta, variant="split",
                     split_k=k, tiles="mma")
    us = bu.time_graph(call, n_sets, rep_ms=20)[0]
    print(f"split {k}: {us:.2f} us, {nbytes / us / 1e3 / copy:.2f} of copy")
PY
PYTHONPATH=$PWD timeout 100 python3 /tmp/split_sweep.py > $R/split_sweep.log 2>&1; echo "split sweep rc $?"; grep -v Warn $R/split_sweep.log | tail -8
cat > /tmp/ncu_mma.py <<'PY'
import sys
import torch
from multilora_impl import make_lora_inputs, make_meta, make_workload
from bgmv_cuda import bgmv_cuda as bc
name = sys.argv[1]
T, L, r, ranks, kind = {"mixed_bs64": (64, 32, 64, [8, 16, 32, 64] * 8, "uniform"),
                        "u7_bs64": (64, 7, 16, None, "uniform"),
                        "distinct128_r64_bs256": (256, 128, 64, None, "twice")}[name]
bc.ensure_loaded()
if kind == "twice":
    idx = torch.arange(L).repeat(2)[torch.randperm(2 * L)][:T].int().cuda()
else:
    idx = make_workload(kind, T, L, seed=T).cuda()
s = make_lora_inputs(T, 4096, 4096, L, r, torch.bfloat16, "cuda", ranks=ranks)
meta = make_meta(idx)
for _ in range(3):
    bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], meta, tiles="mma")
torch.cuda.synchronize()
PY
for p in distinct128_r64_bs256; do
  PYTHONPATH=$PWD timeout 90 ncu --set full --clock-control none -k regex:bgmv --launch-skip 4 \
    --launch-count 2 -o $R/mma_$p python3 /tmp/ncu_mma.py $p > $R/ncu_mma_$p.log 2>&1
  echo "$p rc $?"
  ncu --import $R/mma_$p.ncu-rep --csv --page details > $R/mma_$p.csv 2>/dev/null
  python3 -c "import csv,sys
for d in csv.DictReader(open(sys.argv[1])):
    if d['Metric Name'] in ('Duration','DRAM Throughput','Issue Slots Busy','Registers Per Thread','Executed Instructions'):
        print(d['Kernel Name'][:48], d['Metric Name'], d['Metric Value'])" $R/mma_$p.csv
done
tar czf $OUT/$(basename $0 .sh).tgz -C $OUT r; rm -rf $R
