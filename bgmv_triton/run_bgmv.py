"""Validate the Triton BGMV kernels against the float64 reference at Llama-3-8B shapes, then
time the plain and split-K shrink, the expand and the whole bgmv_lora on the GPU.

Every timed point is validated first on the very inputs that are timed (each shrink
variant through a full shrink + expand); a failing point is reported and not timed.
Timing (bench_utils.time_graph, one call per graph): do_bench medians with a p20-p80
band of a CUDA graph holding one call (so Python and custom-op dispatch do not hide
microsecond kernels; do_bench flushes L2 between replays, so the adapter weights come from
HBM as in a decode step). GB/s = bench_utils.lora_bytes (distinct adapters' A and B at
their rank, x and y rows with an adapter, y read and written) / median. Without CUDA the kernels run in the Triton interpreter at tiny shapes
and timing is skipped.
"""
import argparse
import os
import sys

# Run as a script, sys.path[0] is this folder, where bgmv_triton.py would shadow the
# bgmv_triton namespace package: put the repository root there instead.
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:] = [ROOT] + [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

from multilora_impl import LLAMA3_8B_LAYERS  # noqa: E402  (q/k/v and gate/up fused)

# Interpreter shapes (CPU): not multiples of any block, same slice structure.
TINY = {
    "qkv": (72, [40, 24, 24]),
    "o": (40, [56]),
    "gate_up": (72, [88, 88]),
    "down": (88, [40]),
}

EPILOG = """examples:
  python bgmv_triton/run_bgmv.py --quick                 # seconds: qkv + down, T 1 and 4
  python bgmv_triton/run_bgmv.py --dtype fp16 --rank 64 --mixed-ranks
  python bgmv_triton/run_bgmv.py --layers down --tokens 1 2 4 8 16 32 --split-k 1 2 4 8 16 32
  python bgmv_triton/run_bgmv.py --json plots/bgmv_triton_h200.json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto = cuda when available; cpu runs the Triton interpreter at tiny "
                        "shapes, validation only")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="bf16",
                   help="dtype of x, y, A, B")
    p.add_argument("--layers", nargs="+", choices=list(LLAMA3_8B_LAYERS),
                   default=list(LLAMA3_8B_LAYERS),
                   help="Llama-3-8B projections to run (qkv and gate_up are fused slices)")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 4, 16, 64, 256, 4096],
                   help="batch sizes T (tokens, one per request in decode)")
    p.add_argument("--rank", type=int, default=16, help="r_max, 1..128")
    p.add_argument("--mixed-ranks", action="store_true",
                   help="adapter ranks drawn from 1..rank (padded to rank, pads are NaN)")
    p.add_argument("--num-adapters", type=int, default=64, help="L adapters in the stack")
    p.add_argument("--workload", choices=["distinct", "uniform", "skewed", "identical"],
                   default="uniform", help="adapter popularity (distinct needs L >= T)")
    p.add_argument("--no-lora-share", type=float, default=0.0,
                   help="share of tokens with idx = -1 (0..1)")
    p.add_argument("--split-k", nargs="+", type=int, default=[1, 4, 16],
                   help="shrink split factors to time besides the automatic pick (1 = plain)")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--no-graph", action="store_true",
                   help="time the eager calls instead of a CUDA graph of each call")
    p.add_argument("--quick", action="store_true",
                   help="layers qkv and down, the first two --tokens, 20 ms timing: runs in seconds")
    p.add_argument("--json", default=None, help="write config and per-point results here")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and workloads")
    return p


def main(args: argparse.Namespace) -> list:
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are imported
    import bench_utils as bu
    from multilora_impl import (DTYPES, TOLERANCE, lora_reference, make_lora_inputs,
                                make_workload, poison_skip_rows, relative_error,
                                skip_rows_untouched)
    from bgmv_triton.bgmv_triton import (bgmv_expand, bgmv_lora, bgmv_shrink, pick_split_k,
                                         _num_sms)

    dtype = DTYPES[args.dtype]
    shapes = LLAMA3_8B_LAYERS if device == "cuda" else TINY
    layers, tokens, rep = args.layers, args.tokens, args.rep_ms
    if args.quick:
        layers = [x for x in ("qkv", "down") if x in layers] or layers[:1]
        tokens, rep = tokens[:2], 20
    if device == "cpu":
        tokens = sorted({min(t, 33) for t in tokens})      # the interpreter is slow
    timing = device == "cuda"
    num_sms = _num_sms(torch.device(device))
    L, r_max = args.num_adapters, args.rank
    gen = torch.Generator().manual_seed(args.seed)
    ranks_l = torch.randint(1, r_max + 1, (L,), generator=gen).tolist() \
        if args.mixed_ranks else None

    copy_gbs = bu.copy_bandwidth_gbs() if timing else None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"bgmv_triton on {name}: dtype {args.dtype}, L={L}, r_max={r_max}"
          f"{' mixed ranks' if ranks_l else ''}, workload {args.workload}, -1 share "
          f"{args.no_lora_share}, SMs {num_sms}, layers {layers}, T {tokens}"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else ", no timing"))

    def bench(fn):
        """(median, p20, p80) in µs of fn: a CUDA graph of one call replayed under do_bench
        (which flushes L2 between replays), or the eager call with --no-graph."""
        if args.no_graph:
            return bu.time_fn(fn, rep_ms=rep)
        return bu.time_graph(lambda k: fn(), n_sets=1, calls_per_graph=1, rep_ms=rep)

    results = []
    for layer in layers:
        h_in, h_outs = shapes[layer]
        S = len(h_outs)
        for T in tokens:
            inp = make_lora_inputs(T, h_in, h_outs if S > 1 else h_outs[0], L, r_max, dtype,
                                   device, ranks=ranks_l, seed=args.seed + T)
            idx = make_workload(args.workload, T, L, args.no_lora_share,
                                seed=args.seed + T).to(device)
            x, A, B, scale, ranks = (inp[k] for k in ("x", "A", "B", "scale", "ranks"))
            y0 = poison_skip_rows(inp["y"], idx)      # -1 rows as -0.0, compared bitwise
            auto = pick_split_k(T, S, h_in, r_max, num_sms)
            splits = sorted(set(args.split_k) | {1, auto})
            ref = lora_reference(y0, x, A, B, idx, scale, ranks)

            # Validate every variant that will be timed (shrink + expand, -1 rows intact).
            variants = {f"s={k}": dict(split_k=k, atomic=False) for k in splits}
            if max(splits) > 1:
                variants[f"atomic s={max(auto, max(splits))}"] = dict(
                    split_k=max(auto, max(splits)), atomic=True)
            errs = {}
            for key, kw in variants.items():
                y = y0.clone()
                v = bgmv_shrink(x, A, idx, ranks, split_k=kw["split_k"], atomic=kw["atomic"])
                bgmv_expand(y, v, B, idx, scale, ranks)
                ok_rows = skip_rows_untouched(y, y0, idx)
                errs[key] = relative_error(y, ref) if ok_rows else float("inf")
            y = y0.clone()
            bgmv_lora(y, x, A, B, idx, scale, ranks)
            errs["lora"] = relative_error(y, ref) if skip_rows_untouched(y, y0, idx) \
                else float("inf")
            err = max(errs.values())
            ok = err < TOLERANCE[dtype]
            point = dict(layer=layer, T=T, h_in=h_in, h_outs=h_outs, auto_split=auto,
                         errors=errs, ok=ok)

            if timing and ok:
                v = torch.empty(T, S, r_max, dtype=torch.float32, device=device)
                times = {}
                for key, kw in variants.items():
                    times[key] = bench(lambda kw=kw: bgmv_shrink(x, A, idx, ranks, v=v, **kw))
                bgmv_shrink(x, A, idx, ranks, v=v)
                y = y0.clone()
                times["expand"] = bench(lambda: bgmv_expand(y, v, B, idx, scale, ranks))
                times["lora"] = bench(lambda: bgmv_lora(y, x, A, B, idx, scale, ranks))
                nbytes = bu.lora_bytes(idx, h_in, h_outs, r_max, dtype, ranks)
                point.update(times_us=times, bytes=nbytes,
                             lora_gbs=nbytes / times["lora"][0] / 1e3)
            results.append(point)

    # Table: errors always; medians (µs) when timed. "best" = fastest shrink variant.
    split_keys = sorted({k for p in results for k in p.get("times_us", {})
                         if k not in ("expand", "lora")},
                        key=lambda k: (k.startswith("atomic"), int(k.split("=")[1])))
    head = f"{'layer':8} {'T':>5} {'max err':>8} {'auto':>4}"
    if timing:
        head += "".join(f" {k:>11}" for k in split_keys)
        head += f" {'best':>11} {'expand':>7} {'lora':>7} {'GB/s':>6}"
    print(head + ("   (shrink / expand / lora: median µs)" if timing else ""))
    for p in results:
        err = max(p["errors"].values())
        row = f"{p['layer']:8} {p['T']:>5} {err:>8.1e} {p['auto_split']:>4}"
        if "times_us" in p:
            t = p["times_us"]
            row += "".join(f" {t[k][0]:>11.1f}" if k in t else f" {'-':>11}" for k in split_keys)
            best = min((k for k in t if k not in ("expand", "lora")), key=lambda k: t[k][0])
            row += f" {best:>11} {t['expand'][0]:>7.1f} {t['lora'][0]:>7.1f} {p['lora_gbs']:>6.0f}"
        elif not p["ok"]:
            row += "   FAILED validation: not timed"
        print(row)
    failed = [p for p in results if not p["ok"]]
    print(f"{len(results) - len(failed)}/{len(results)} points within tolerance "
          f"{TOLERANCE[dtype]:.1e}")

    if args.json:
        meta = dict(bu.env_info(), config=vars(args), copy_gbs=copy_gbs, num_sms=num_sms,
                    ranks=ranks_l)
        bu.write_json(args.json, dict(meta=meta, points=results))
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
