"""Settle the small-batch BGMV variants on the GPU in one short run (--variants).

For each point, every variant (bgmv_cuda default, with make_meta's meta as the registry runs
it (chunks, rank token list; before session 12 without meta) / the same without PDL / split-K by shape /
split-K in 2 (`cuda_split2`: one 16-byte step of x and A per shrink thread at h_in 4096,
one DRAM round trip instead of two; PERF_LOG v13, measured slower in session 7) / fused /
with the "classic", the "residency" and the "rank" expand tile rule, bgmv_triton default) is
validated against multilora_impl.lora_reference on the very inputs it is timed on (idx = -1
rows checked bit-exactly; a failing variant is not timed), then timed with
bench_utils.time_graph: back-to-back calls in one CUDA graph over a pool of input sets
(bench_utils.pool_size: several times the L2, so the adapters come from HBM), us per call.
Points (bf16): h 4096 -> 4096, r 16, uniform over 7 adapters, bs 1, 4, 8, 16, 32, 64, 128,
256; bs 256 distinct, 128 adapters used twice each, r 64; bs 64 mixed ranks {8, 16, 32, 64}
over 32 adapters vs the same adapters all at rank 64 (ratio); 4096 -> 11008, r 16, uniform
over 7 adapters, bs 1, 8, 16, 64, and one adapter for all at bs 64; Llama-3-8B's q/k/v
(3 slices), gate/up (2 slices) and down projections, r 16, uniform over 7 adapters, bs
16-256. Prints the ceilings first, the table last (with the expand's outputs per lane J
and blocks under each tile rule where `cuda_tiles` runs); writes JSON.

    python bgmv_cuda/run_bgmv_cuda.py --variants --json plots/bgmv_variants_h200.json
    python bgmv_cuda/run_bgmv_cuda.py --variants --only cuda_classic cuda_tiles --rep-ms 20
    python bgmv_cuda/run_bgmv_cuda.py --variants --only cuda_tiles cuda_rank --rep-ms 20

`cuda_classic`, `cuda_tiles`, `cuda_rank` and `cuda_mma` fix the expand's tile rule
("classic", "residency", "rank": residency's J with each token's lane groups sized by its
adapter's rank, PERF_LOG v10; "mma": the bf16 expand on the tensor cores, PERF_LOG v16,
and `cuda_mma_chunks` the
same with make_meta's chunks, both kernels per chunk of tokens of one adapter, v17;
see bgmv_cuda.expand_outs) whatever MULTILORA_EXPAND_TILES says; the other CUDA variants,
`cuda` included, follow it (unset: "rank", the default since PERF_LOG v10; "residency"
before it, from v5). In plots/bgmv_tiles_h200.json `cuda` is the classic rule, in
plots/bgmv_rank_j1_h200.json the residency rule.

--table: the CUDA-vs-Triton decode grid instead (bf16, uniform over 7 adapters, batch 1, 4,
16, 64, 256 x h_in = h_out in {4096, 14336} x r in {16, 64}; variants cuda, cuda_nopdl,
triton by default), printed as one table with the winner per point:

    python bgmv_cuda/run_bgmv_cuda.py --table --json plots/bgmv_cuda_vs_triton_h200.json
"""
import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

VARIANT_NAMES = ["cuda", "cuda_nopdl", "cuda_split", "cuda_split2", "cuda_fused", "cuda_classic",
                 "cuda_tiles", "cuda_rank", "cuda_mma", "cuda_mma_chunks",
                 "triton"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", action="store_true",
                   help="run the variant sweep (small-batch points, targets of issue 3)")
    p.add_argument("--table", action="store_true",
                   help="run the CUDA-vs-Triton grid instead: batch 1..256 x h 4096 / 14336 "
                        "x r 16 / 64 (default variants: cuda, cuda_nopdl, triton)")
    p.add_argument("--only", nargs="+", choices=VARIANT_NAMES, default=None,
                   help="variants to run (default: all for --variants, cuda cuda_nopdl triton "
                        "for --table)")
    p.add_argument("--rep-ms", type=int, default=40, help="do_bench repetition time per point (ms)")
    p.add_argument("--json", default=None, help="write config and per-point results here")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and workloads")
    return p


def table_points() -> list:
    """--table: (name, T, h, h, 7, r, None, "uniform") over batch x h x r."""
    return [(f"h{h} r{r} bs{T}", T, h, h, 7, r, None, "uniform")
            for h in (4096, 14336) for r in (16, 64) for T in (1, 4, 16, 64, 256)]


def points() -> list:
    """(name, T, h_in, h_out, L, r_max, ranks or None, idx kind)."""
    pts = [(f"u7 bs{T}", T, 4096, 4096, 7, 16, None, "uniform")
           for T in (1, 4, 8, 16, 32, 64, 128, 256)]
    pts.append(("distinct128 r64 bs256", 256, 4096, 4096, 128, 64, None, "twice"))
    pts.append(("mixed{8..64} bs64", 64, 4096, 4096, 32, 64, [8, 16, 32, 64] * 8, "uniform"))
    pts.append(("padded64 bs64", 64, 4096, 4096, 32, 64, None, "uniform"))
    pts += [(f"punica 11008 bs{T}", T, 4096, 11008, 7, 16, None, "uniform")
            for T in (1, 8, 16, 64)]
    pts.append(("punica 11008 identical bs64", 64, 4096, 11008, 7, 16, None, "identical"))
    # Llama-3-8B's projections at r 16 over 7 adapters (the end-to-end benchmark's shapes),
    # where the default's choice between the rules must hold too.
    pts += [(f"8b qkv bs{T}", T, 4096, [4096, 1024, 1024], 7, 16, None, "uniform") for T in (64, 256)]
    pts += [(f"8b gate_up bs{T}", T, 4096, [14336, 14336], 7, 16, None, "uniform")
            for T in (16, 64, 256)]
    pts += [(f"8b down bs{T}", T, 14336, 4096, 7, 16, None, "uniform") for T in (64, 256)]
    return pts


def main(args: argparse.Namespace) -> list:
    import time
    import torch
    import bench_utils as bu
    from multilora_impl import (TOLERANCE, lora_reference, make_lora_inputs, make_meta, make_workload,
                                relative_error)
    from bgmv_cuda import bgmv_cuda as bc
    from bgmv_triton import bgmv_triton as bt

    t_start = time.time()
    dev, dtype = "cuda", torch.bfloat16
    bc.ensure_loaded()                                     # build first (cached afterwards)
    fns = {"cuda": lambda *a, meta=None: bc.bgmv_lora(*a, meta),   # as the registry runs it
           "cuda_classic": lambda *a, meta=None: bc.bgmv_lora(*a, tiles="classic"),
           "cuda_nopdl": lambda *a, meta=None: bc.bgmv_lora(*a, meta, pdl=False),
           "cuda_split": lambda *a, meta=None: bc.bgmv_lora(*a, variant="split"),
           "cuda_split2": lambda *a, meta=None: bc.bgmv_lora(*a, variant="split", split_k=2),
           "cuda_fused": lambda *a, meta=None: bc.bgmv_lora(*a, variant="fused"),
           "cuda_tiles": lambda *a, meta=None: bc.bgmv_lora(*a, tiles="residency"),
           "cuda_rank": lambda *a, meta=None: bc.bgmv_lora(*a, tiles="rank"),
           "cuda_mma": lambda *a, meta=None: bc.bgmv_lora(*a, tiles="mma"),
           "cuda_mma_chunks": lambda *a, meta=None: bc.bgmv_lora(*a, meta, tiles="mma"),
           "triton": lambda *a, meta=None: bt.bgmv_lora(*a)}
    only = args.only or (["cuda", "cuda_nopdl", "triton"] if args.table else VARIANT_NAMES)
    fns = {k: fns[k] for k in only}
    copy = bu.copy_bandwidth_gbs(dev, nbytes=2 * 2**29)
    empty = bu.empty_graph_us(dev)
    gemm = bu.base_gemm_us(64, 4096, 4096, dtype, dev, rep_ms=args.rep_ms)[0]
    print(f"{torch.cuda.get_device_name()} bf16: copy {copy:.0f} GB/s, empty kernel in graph "
          f"{empty:.2f} us, base GEMM 64x4096x4096 {gemm:.1f} us (build {time.time() - t_start:.0f} s)")

    results = []
    for name, T, h_in, h_out, L, r_max, ranks, kind in (table_points() if args.table else points()):
        if kind == "twice":                                 # each adapter used by 2 tokens
            g = torch.Generator().manual_seed(args.seed)
            idx_h = torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)][:T].int()
        else:
            idx_h = make_workload(kind, T, L, seed=args.seed + T)
        idx = idx_h.to(dev)
        set0 = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, dev, ranks=ranks, seed=args.seed)
        # host-built once per batch, with the ranks as the modes' make_meta builds it
        # (cuda_mma_chunks reads its chunks)
        meta = make_meta(idx, ranks=set0["ranks"])
        h_outs = list(h_out) if isinstance(h_out, list) else [h_out]
        nbytes = bu.lora_bytes(idx, h_in, h_outs, r_max, dtype, set0["ranks"])
        n_sets = bu.pool_size(nbytes, max_sets=32)
        # pool: each set its own weights (cold cache), x, y; set 0 is the validated one
        sets = [set0] + [make_lora_inputs(T, h_in, h_out, L, r_max, dtype, dev, ranks=ranks,
                                          seed=args.seed + k) for k in range(1, n_sets)]
        ref = lora_reference(set0["y"], set0["x"], set0["A"], set0["B"], idx, set0["scale"],
                             set0["ranks"])
        Bs = [set0["B"]] if isinstance(set0["B"], torch.Tensor) else list(set0["B"])
        expand_j = {rule: bc.expand_outs(Bs, T, r_max, k)                 # (J, blocks)
                    for k, rule in enumerate(bc.EXPAND_TILE_RULES)}
        row = dict(point=name, T=T, h_in=h_in, h_out=h_out, L=L, r_max=r_max, ranks=ranks,
                   bytes=nbytes, floor_us=max(nbytes / copy / 1e3, empty), n_sets=n_sets,
                   expand_j=expand_j, us={}, err={})
        for vname, fn in fns.items():
            y = set0["y"].clone()
            try:
                fn(y, set0["x"], set0["A"], set0["B"], idx, set0["scale"], set0["ranks"], meta=meta)
                torch.cuda.synchronize()
                err = relative_error(y, ref)
            except Exception as e:                          # report, do not time
                print(f"  {name} {vname}: {type(e).__name__}: {str(e)[:200]}")
                err = float("inf")
            row["err"][vname] = err
            if not err < TOLERANCE[dtype]:
                continue
            ys = [s["y"].clone() for s in sets]

            def call(k, fn=fn):
                s = sets[k]
                fn(ys[k], s["x"], s["A"], s["B"], idx, s["scale"], s["ranks"], meta=meta)
            row["us"][vname] = bu.time_graph(call, n_sets, rep_ms=args.rep_ms)
        results.append(row)
        sets = None       # free the input sets before the next point
        torch.cuda.empty_cache()

    by = {r["point"]: r for r in results}
    w = 11
    print(f"\nus per call (median; CUDA graph over a cold pool), bf16; floor = max(bytes / copy, "
          f"empty kernel); total run {time.time() - t_start:.0f} s")
    print(f"{'point':24} {'floor':>6} " + " ".join(f"{v:>{w}}" for v in fns) + "   best")
    for r in results:
        cells = [f"{r['us'][v][0]:>{w}.2f}" if v in r["us"] else f"{'FAIL':>{w}}" for v in fns]
        best = min(r["us"], key=lambda v: r["us"][v][0]) if r["us"] else "-"
        extra = ""
        if r["point"].startswith("distinct") and r["us"]:
            extra = f"  ({r['bytes'] / r['us'][best][0] / 1e3 / copy:.2f} of copy)"
        if r["point"].startswith("punica") and r["us"]:
            extra = f"  ({r['us'][best][0] / r['floor_us']:.1f}x floor)"
        if "cuda_tiles" in fns:
            extra += "  expand J/blocks " + ", ".join(
                f"{rule} {j}/{n}" for rule, (j, n) in r["expand_j"].items())
        print(f"{r['point']:24} {r['floor_us']:>6.2f} " + " ".join(cells) + f"   {best}{extra}")
    mixed, padded = by.get("mixed{8..64} bs64"), by.get("padded64 bs64")
    if mixed and padded:
        ratio = " ".join(f"{v}={mixed['us'][v][0] / padded['us'][v][0]:.2f}"
                         for v in fns if v in mixed["us"] and v in padded["us"])
        print(f"mixed / padded (target <= 0.65): {ratio}")
    print(f"bs64 u7 target <= 0.4 x GEMM = {0.4 * gemm:.1f} us; distinct target >= 0.75 of copy; "
          f"punica target <= 2x floor")
    if args.json:
        bu.write_json(args.json, dict(meta=dict(**bu.env_info(), copy_gbs=copy, empty_us=empty,
                                                gemm_us=gemm, config=vars(args)),
                                      points=results))
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
