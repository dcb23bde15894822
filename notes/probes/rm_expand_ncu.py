"""Kernels of the mixed-rank point for ncu (PERF_LOG session 13): bf16, h 4096, batch 64
over 32 adapters (the mixed_rank figure's batch, idx seed 0), B rank-major. Runs, in order,
for the mixed ranks {8..64} and for every adapter at 64: rule "rank"'s shrink with the
token list, then the rank-major expand (with the list where ranks are given), each WARM
times then once more (the profiled launch), no PDL. Profile with, e.g.:

    ncu --kernel-name regex:"shrink|expand" --launch-skip 3 --launch-count 1 ...
    python notes/probes/rm_expand_ncu.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

from bgmv_cuda import bgmv_cuda as bc
from multilora_impl import make_lora_inputs, make_meta, make_workload

WARM = 3


def main() -> None:
    T, h, L = 64, 4096, 32
    idx = make_workload("uniform", T, L, seed=0).to("cuda")
    for ranks in ([8, 16, 32, 64] * 8, None):
        s = make_lora_inputs(T, h, h, L, 64, torch.bfloat16, "cuda", ranks=ranks, seed=0,
                             rank_major=True)
        work = make_meta(idx, ranks=s["ranks"]).rank_work if ranks else None
        v = bc.bgmv_shrink(s["x"], s["A"], idx, s["ranks"], pdl=False, work=work)
        for _ in range(WARM + 1):
            bc.bgmv_shrink(s["x"], s["A"], idx, s["ranks"], v=v, pdl=False, work=work)
        for _ in range(WARM + 1):
            bc.bgmv_expand(s["y"], v, s["B"], idx, s["scale"], s["ranks"], tiles="rank",
                           work=work)
        torch.cuda.synchronize()
        print("done", "mixed" if ranks else "padded")


if __name__ == "__main__":
    main()
