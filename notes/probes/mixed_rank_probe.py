"""Where the mixed-rank point's time goes (issue 3, target 4; PERF_LOG session 12).

bf16, h 4096 -> 4096, batch 64 uniform over 32 adapters (run_bgmv_cuda's "mixed{8..64}
bs64" workload, and the mixed_rank figure's batch), several rank layouts: mixed {8, 16, 32,
64} in r_max 64 storage, every adapter at 32 / 16 / 8 in r_max 64 storage (ranks given:
the token list; half or more of the x = T grids' blocks empty) and in storage of their own
size (ranks=None: no empty blocks), and all at 64.
For each: the pair under rule "rank" on the full grid (x = T) and with make_meta's token
list (PERF_LOG v41), the default pair (bgmv_lora with meta), the chunked mma pair, and rule
"rank"'s shrink alone and expand alone (no PDL), on the full grid and with the list
(where the ranks are given), each timed as
bench_utils.time_graph (back-to-back calls in one CUDA graph over a cold pool), us per
call, beside the bytes that must move and the sum of the tokens' ranks.
Each layout runs with B in the row layout and stored rank-major (to_rank_major; PERF_LOG
v45: rank-major B has its own expand, which every rule then runs), unless --storage says
otherwise.

With --wave (PERF_LOG session 14): instead, rank-major B with every adapter at rank 32
in r_max 64 storage at batch 48..96 (the rank-major expand's token list: 8 blocks of 32 KB
of B per token; 528 = 132 SMs x 4 fit one wave on the H200), and the figure's batch (546
blocks): does the expand's time jump where its grid passes one wave?

    python notes/probes/mixed_rank_probe.py [--storage row rank-major] [--wave]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import bench_utils as bu
from bgmv_cuda import bgmv_cuda as bc
from multilora_impl import make_lora_inputs, make_meta, make_workload


LAYOUTS = [  # (name, r_max, ranks or None, idx seed)
    ("mixed{8..64} r_max 64", 64, [8, 16, 32, 64] * 8, 64),
    ("mixed, figure's batch", 64, [8, 16, 32, 64] * 8, 0),   # multilora_impl's mixed_rank
    ("all 32, r_max 64", 64, [32] * 32, 64),
    ("all 32, r_max 32", 32, None, 64),
    ("all 16, r_max 64", 64, [16] * 32, 64),
    ("all 16, r_max 16", 16, None, 64),
    ("all 8, r_max 64", 64, [8] * 32, 64),
    ("all 8, r_max 8", 8, None, 64),
    ("all 64, ranks given", 64, [64] * 32, 64),
    ("padded 64", 64, None, 64),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", nargs="+", default=["row", "rank-major"],
                    choices=["row", "rank-major"], help="B storage(s) to run every layout in")
    ap.add_argument("--wave", action="store_true", help="the batch sweep above instead")
    args = ap.parse_args()
    storages = args.storage
    T, h, L = 64, 4096, 32
    dev, dtype = "cuda", torch.bfloat16
    bc.ensure_loaded()
    copy = bu.copy_bandwidth_gbs(dev, nbytes=2 * 2**29)
    print(f"{torch.cuda.get_device_name()}: copy {copy:.0f} GB/s; bs {T} uniform over {L} "
          f"adapters (idx seed 64 as run_bgmv_cuda's point, 0 as the mixed_rank figure's); "
          f"us per call")
    cols = ["rank", "rank+list", "default", "mma_ch", "shrink", "shrink+l", "expand", "expand+l"]
    print(f"{'layout (RM: rank-major B)':27} {'MB':>5} {'rank_sum':>8} " + " ".join(f"{c:>9}" for c in cols))
    runs = [(*lay, rm, T) for rm in storages for lay in LAYOUTS]
    if args.wave:
        runs = [(f"all 32, r_max 64, bs {n}", 64, [32] * 32, 64, "rank-major", n)
                for n in (48, 56, 60, 64, 66, 68, 70, 72, 80, 96)]
        runs.append(LAYOUTS[1] + ("rank-major", T))
    for name, r_max, ranks, seed, rm, T in runs:
        rank_major = rm == "rank-major"
        name = name + (" RM" if rank_major else "")
        idx = make_workload("uniform", T, L, seed=seed).to(dev)
        set0 = make_lora_inputs(T, h, h, L, r_max, dtype, dev, ranks=ranks, seed=0,
                                rank_major=rank_major)
        meta = make_meta(idx, ranks=set0["ranks"])
        nbytes = bu.lora_bytes(idx, h, [h], r_max, dtype, set0["ranks"])
        n_sets = bu.pool_size(nbytes, max_sets=32)
        sets = [set0] + [make_lora_inputs(T, h, h, L, r_max, dtype, dev, ranks=ranks, seed=k,
                                          rank_major=rank_major)
                         for k in range(1, n_sets)]
        vs = [bc.bgmv_shrink(s["x"], s["A"], idx, s["ranks"], pdl=False) for s in sets]

        work = meta.rank_work

        def rank(k):
            s = sets[k]
            bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], tiles="rank")

        def rank_list(k):
            s = sets[k]
            bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], meta,
                         tiles="rank")

        def default(k):
            s = sets[k]
            bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], meta)

        def mma_chunks(k):
            s = sets[k]
            bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], meta,
                         tiles="mma")

        def shrink(k):
            s = sets[k]
            bc.bgmv_shrink(s["x"], s["A"], idx, s["ranks"], v=vs[k], pdl=False)

        def shrink_list(k):
            s = sets[k]
            bc.bgmv_shrink(s["x"], s["A"], idx, s["ranks"], v=vs[k], pdl=False, work=work)

        def expand(k):
            s = sets[k]
            bc.bgmv_expand(s["y"], vs[k], s["B"], idx, s["scale"], s["ranks"], tiles="rank")

        def expand_list(k):
            s = sets[k]
            bc.bgmv_expand(s["y"], vs[k], s["B"], idx, s["scale"], s["ranks"], tiles="rank",
                           work=work)

        fns = [rank, rank_list, default, mma_chunks, shrink, shrink_list, expand, expand_list]
        us = [bu.time_graph(fn, n_sets, rep_ms=50)[0]
              if work is not None or fn not in (shrink_list, expand_list) else float("nan")
              for fn in fns]
        rank_sum = getattr(meta, "rank_sum", None) or T * r_max
        print(f"{name:27} {nbytes / 1e6:5.1f} {rank_sum:8d} " + " ".join(f"{u:9.2f}" for u in us)
              + (f"  (rank-major expand: {rank_sum // 4} blocks)" if args.wave else ""), flush=True)
        sets = vs = None
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
