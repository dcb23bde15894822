"""Validate the Triton BGMV kernels against the float64 reference at Llama-3-8B shapes, then
time the plain and split-K shrink, the expand and the whole bgmv_lora on the GPU.

Every timed point is validated first on the very inputs that are timed (each shrink
variant through a full shrink + expand); a failing point is reported and not timed.
Timing: triton.testing.do_bench medians with a p20-p80 band, of a CUDA graph holding one
call (so Python and custom-op dispatch do not hide microsecond kernels; do_bench still
flushes L2 between runs, so the adapter weights come from HBM as in a decode step).
GB/s = bytes that must move (distinct adapters' A and B at their rank, x, y read and
written) / median. Without CUDA the kernels run in the Triton interpreter at tiny shapes
and timing is skipped.
"""
import argparse
import json
import os
import subprocess
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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(args: argparse.Namespace) -> list:
    import torch
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")     # before the kernels are imported
    import triton
    import triton.testing
    from multilora_impl import (DTYPES, TOLERANCE, lora_reference, make_lora_inputs,
                                make_workload, relative_error)
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
    e = torch.empty((), dtype=dtype).element_size()

    copy_gbs = None
    if timing:
        src = torch.empty(1 << 28, dtype=torch.uint8, device=device)   # 256 MiB
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), rep=rep, quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        copy_gbs = 2 * src.numel() / ms / 1e6
        del src, dst
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu (Triton interpreter)"
    print(f"bgmv_triton on {name}: dtype {args.dtype}, L={L}, r_max={r_max}"
          f"{' mixed ranks' if ranks_l else ''}, workload {args.workload}, -1 share "
          f"{args.no_lora_share}, SMs {num_sms}, layers {layers}, T {tokens}"
          + (f", copy {copy_gbs:.0f} GB/s" if copy_gbs else ", no timing"))

    def bench(fn):
        """(median, p20, p80) in µs of fn, through a CUDA graph of one call unless --no-graph."""
        fn()                                              # JIT compile, workspace sizes
        torch.cuda.synchronize()
        call = fn
        if not args.no_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            call = graph.replay
        q = triton.testing.do_bench(call, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return tuple(1e3 * t for t in q)

    results = []
    for layer in layers:
        h_in, h_outs = shapes[layer]
        S, h_out = len(h_outs), sum(h_outs)
        for T in tokens:
            inp = make_lora_inputs(T, h_in, h_outs if S > 1 else h_outs[0], L, r_max, dtype,
                                   device, ranks=ranks_l, seed=args.seed + T)
            idx = make_workload(args.workload, T, L, args.no_lora_share,
                                seed=args.seed + T).to(device)
            x, A, B, scale, ranks = (inp[k] for k in ("x", "A", "B", "scale", "ranks"))
            y0 = inp["y"]
            auto = pick_split_k(T, S, h_in, r_max, num_sms)
            splits = sorted(set(args.split_k) | {1, auto})
            ref = lora_reference(y0, x, A, B, idx, scale, ranks)

            # Validate every variant that will be timed (shrink + expand, -1 rows intact).
            variants = {f"s={k}": dict(split_k=k, atomic=False) for k in splits}
            if max(splits) > 1:
                variants[f"atomic s={max(auto, max(splits))}"] = dict(
                    split_k=max(auto, max(splits)), atomic=True)
            errs, skip = {}, idx < 0
            for key, kw in variants.items():
                y = y0.clone()
                v = bgmv_shrink(x, A, idx, ranks, split_k=kw["split_k"], atomic=kw["atomic"])
                bgmv_expand(y, v, B, idx, scale, ranks)
                ok_rows = torch.equal(y[skip], y0[skip])
                errs[key] = relative_error(y, ref) if ok_rows else float("inf")
            y = y0.clone()
            bgmv_lora(y, x, A, B, idx, scale, ranks)
            errs["lora"] = relative_error(y, ref) if torch.equal(y[skip], y0[skip]) \
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
                # Bytes that must move: distinct adapters' A and B at their rank, x, y r+w.
                used = idx[idx >= 0].unique().tolist()
                r_sum = sum(ranks_l[i] for i in used) if ranks_l else len(used) * r_max
                nbytes = e * (r_sum * (S * h_in + h_out) + T * h_in + 2 * T * h_out)
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
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        meta = dict(gpu=name, torch=torch.__version__, triton=triton.__version__,
                    cuda=torch.version.cuda, commit=git_commit(), config=vars(args),
                    copy_gbs=copy_gbs, num_sms=num_sms, ranks=ranks_l)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, points=results), f, indent=1)
        print(f"wrote {args.json}")
    if failed:
        sys.exit(1)
    return results


if __name__ == "__main__":
    main(build_parser().parse_args())
