"""Time the chunked mma pair's halves at the distinct point (PERF_LOG v28's baseline).

bf16, h 4096 -> 4096, r 64, 128 adapters used twice each, batch 256 (run_bgmv_cuda's
"distinct128 r64 bs256"): the pair as bgmv_lora runs it, the shrink alone and the expand
alone (on a v from the shrink), each timed as bench_utils.time_graph (back-to-back calls
in one CUDA graph over a cold pool), us per call; and the bytes each half must move.

    python notes/probes/pair_breakdown.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import bench_utils as bu
from bgmv_cuda import bgmv_cuda as bc
from multilora_impl import make_lora_inputs, make_meta


def main() -> None:
    T, h, L, r = 256, 4096, 128, 64
    dev, dtype = "cuda", torch.bfloat16
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)][:T].int().to(dev)
    meta = make_meta(idx)
    chunks = meta.chunks
    n_split = bc.mma_split(chunks.shape[0], 1, r, h, bc._num_sms(idx.device))
    nbytes = bu.lora_bytes(idx, h, [h], r, dtype, None)
    n_sets = bu.pool_size(nbytes, max_sets=32)
    sets = [make_lora_inputs(T, h, h, L, r, dtype, dev, seed=k) for k in range(n_sets)]
    vs = [bc.bgmv_shrink(s["x"], s["A"], idx, split_k=n_split, chunks=chunks) for s in sets]
    copy = bu.copy_bandwidth_gbs(dev, nbytes=2 * 2**29)
    a_bytes = L * r * h * 2 + T * h * 2
    b_bytes = L * r * h * 2 + 2 * T * h * 2

    def pair(k):
        s = sets[k]
        bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], None, meta)

    def shrink(k):
        s = sets[k]
        bc.bgmv_shrink(s["x"], s["A"], idx, v=vs[k], split_k=n_split, chunks=chunks)

    def expand(k):
        s = sets[k]
        bc.bgmv_expand(s["y"], vs[k], s["B"], idx, s["scale"], tiles="mma", chunks=chunks)

    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s, n_split {n_split}, "
          f"{chunks.shape[0]} chunks, {n_sets} input sets")
    for name, fn, b in (("pair", pair, nbytes), ("shrink", shrink, a_bytes), ("expand", expand, b_bytes)):
        us = bu.time_graph(fn, n_sets, rep_ms=100)[0]
        print(f"{name:7} {us:7.2f} us  {b / 1e6:6.1f} MB  {b / us / 1e3:6.0f} GB/s  "
              f"{b / us / 1e3 / copy:.2f} of copy")


if __name__ == "__main__":
    main()
