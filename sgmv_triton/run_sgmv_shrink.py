"""Validate and time the SGMV shrink kernel (sgmv_shrink_triton.py) on prefill batches.

    v[rows of segment g, s, :r] = x[rows] @ A[s, seg_adapter[g], :r].T      (fp32)

For every projection of Llama-3-8B (q/k/v fused, o, gate/up fused, down) and every batch
(requests x tokens per request, equal or ragged lengths, adapters from a Punica workload):
run the kernel on each input set of a pool, compare v with the float64 per-segment loop
(sgmv_torch_sequential.py, itself checked against multilora_impl.lora_reference by
tests/test_sgmv_triton.py), refuse to time a failing point, then on a GPU time one CUDA
graph that runs the kernel once per pool set (the pool spans > 3x L2 so weights and
activations come from HBM, as in a real forward) with triton.testing.do_bench
quantiles (0.5, 0.2, 0.8), divided by the pool size. On the CPU the kernel runs in the
Triton interpreter and timing is skipped.

GB/s counts the bytes that must move: x rows with an adapter, the used rank rows of the
distinct adapters' A, v written (T * S * r_max * 4); the copy bandwidth measured in the
same run and the base layer's GEMM (x @ W.T) are printed beside.

Timing, pool sizing, copy bandwidth, GEMM and JSON come from bench_utils.py (the shared
timing module); the helpers here (flags, batches, table) are shared with run_sgmv_expand.py.
"""
import argparse
import itertools
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from multilora_impl import LLAMA3_8B_LAYERS  # noqa: E402

# Llama-3-8B linear layers (q/k/v and gate/up fused), plus awkward tiny ones for --quick / CPU
PROJECTIONS = {**LLAMA3_8B_LAYERS, "tiny": (200, [72, 24, 24])}

EPILOG = """examples:
  python sgmv_triton/run_sgmv_shrink.py                          # Llama-3-8B, bf16, r=16, 8x512
  python sgmv_triton/run_sgmv_shrink.py --num-requests 4 16 --tokens-per-request 64 512 --ragged
  python sgmv_triton/run_sgmv_shrink.py --proj qkv --rank 8 64 128 --block-m 0 16 32 --split-k 1 2 4
  python sgmv_triton/run_sgmv_shrink.py --quick --device cpu     # tiny shapes, interpreter
"""


# ---------------------------------------------------------------------------------------
# Shared with run_sgmv_expand.py
# ---------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--proj", nargs="+", default=["qkv", "o", "gate_up", "down"],
                   choices=list(PROJECTIONS), help="projection shapes (Llama-3-8B; tiny for tests)")
    p.add_argument("--dtype", default="bf16", choices=["fp16", "bf16", "fp32"],
                   help="x/A/B/y dtype")
    p.add_argument("--rank", nargs="+", type=int, default=[16], help="r_max of the adapters")
    p.add_argument("--mixed-ranks", action="store_true",
                   help="per-adapter ranks random in 1..r_max (NaN in the padding)")
    p.add_argument("--num-adapters", type=int, default=16, help="L, adapters in the stack")
    p.add_argument("--num-requests", nargs="+", type=int, default=[8], help="requests per batch")
    p.add_argument("--tokens-per-request", nargs="+", type=int, default=[512],
                   help="prompt tokens per request (the mean when --ragged)")
    p.add_argument("--ragged", action="store_true",
                   help="request lengths uniform in 1 .. 2*tokens-1 instead of all equal")
    p.add_argument("--workload", default="uniform",
                   choices=["distinct", "uniform", "skewed", "identical"],
                   help="adapter popularity across requests (Punica)")
    p.add_argument("--no-lora-share", type=float, default=0.0,
                   help="fraction of requests without an adapter (idx = -1)")
    p.add_argument("--block-m", nargs="+", type=int, default=[0],
                   help="tokens per program, a sweep (0 = default: 16/32/64 by segment length)")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and batches")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes and 2 small batches: a smoke test in seconds (CPU too)")
    p.add_argument("--out-dir", default=None, help="write <script>.json here (default: none)")


def apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.proj, args.num_requests, args.tokens_per_request = ["tiny"], [3, 5], [13]
        args.num_adapters, args.rank, args.ragged, args.mixed_ranks = 4, [16], True, True
        args.no_lora_share = max(args.no_lora_share, 0.3)


def setup_device(args: argparse.Namespace) -> str:
    """Pick the device; on the CPU the kernels need the interpreter, set before triton loads."""
    import torch
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return dev


def make_batches(args: argparse.Namespace, device: str) -> list:
    """[(label, idx [T] int32)] for every (requests, tokens per request) pair."""
    import torch
    from multilora_impl import make_workload
    out = []
    for n_req in args.num_requests:
        for n_tok in args.tokens_per_request:
            g = torch.Generator().manual_seed(args.seed + 7919 * n_req + n_tok)
            if args.ragged:
                lens = torch.randint(1, 2 * n_tok, (n_req,), generator=g)
            else:
                lens = torch.full((n_req,), n_tok)
            ad = make_workload(args.workload, n_req, args.num_adapters, args.no_lora_share,
                               seed=args.seed + n_req)
            idx = torch.repeat_interleave(ad, lens).to(device)                     # [T]
            out.append((f"{n_req}x{n_tok}{'r' if args.ragged else ''}", idx))
    return out


def adapter_ranks(args: argparse.Namespace, r_max: int):
    """Per-adapter ranks (list) or None."""
    import torch
    if not args.mixed_ranks:
        return None
    g = torch.Generator().manual_seed(args.seed + r_max)
    return torch.randint(1, r_max + 1, (args.num_adapters,), generator=g).tolist()


def sgmv_pool_size(set_bytes: int, device: str) -> int:
    """Input sets so that one pass spans several times the L2 (bench_utils.pool_size)."""
    if device == "cpu":
        return 1
    import bench_utils as bu
    return bu.pool_size(set_bytes, max_sets=16)


def time_calls(calls: list) -> tuple[float, float, float]:
    """(median, p20, p80) µs per call: the calls back to back in one CUDA graph, replayed
    under do_bench (bench_utils.time_graph)."""
    import bench_utils as bu
    return bu.time_graph(lambda k: calls[k](), len(calls), calls_per_graph=len(calls))


def write_json(args: argparse.Namespace, name: str, extra: dict, rows: list) -> None:
    """<out-dir>/<name>.json: environment, config, points (NaN / inf, i.e. not measured or
    failed, become null so the file is strict JSON)."""
    if not args.out_dir:
        return
    import bench_utils as bu

    def clean(o):
        if isinstance(o, float) and not math.isfinite(o):
            return None
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        return [clean(v) for v in o] if isinstance(o, (list, tuple)) else o

    bu.write_json(os.path.join(args.out_dir, f"{name}.json"),
                  clean(dict(env=bu.env_info(), config=vars(args), **extra, points=rows)))


TIME_COLS = [("µs", "us", "{:.1f}"), ("p20-p80 µs", "band", "{}"), ("GB/s", "gbps", "{:.0f}"),
             ("of copy", "copy_frac", "{:.0%}"), ("TFLOP/s", "tflops", "{:.1f}"),
             ("base GEMM µs", "base_gemm_us", "{:.1f}")]


def timing_fields(times: tuple, bytes_moved: int, flops: float, copy: float, base_us: float,
                  n_sets: int) -> dict:
    """The timing columns of one row (NaN where not timed)."""
    med, p20, p80 = times
    gbps = bytes_moved / (med * 1e-6) / 1e9
    return dict(us=med, p20=p20, p80=p80, band=f"{p20:.1f}-{p80:.1f}", gbps=gbps,
                copy_frac=gbps / copy, tflops=flops / (med * 1e-6) / 1e12, base_gemm_us=base_us,
                pool=n_sets, bytes=bytes_moved, flops=flops)


def finish(args: argparse.Namespace, name: str, rows: list, cols: list, timing: bool,
           copy: float, failed: int) -> int:
    """Print the table and the copy rate, write <name>.json; exit status 1 on a failure."""
    print_table(rows, cols + (TIME_COLS if timing else []))
    if timing:
        print(f"copy bandwidth {copy:.0f} GB/s; µs per call from CUDA-graph replay of one "
              f"pass over the input pool")
    write_json(args, name, dict(copy_gbps=copy), rows)
    if failed:
        print(f"FAILED: {failed} point(s) above the {args.dtype} bound, not timed")
    return 1 if failed else 0


def print_table(rows: list, cols: list) -> None:
    """cols: [(header, key, format)]; one line per row."""
    widths = [max(len(h), *(len(fmt.format(r[k])) for r in rows)) for h, k, fmt in cols]
    print("  ".join(h.rjust(w) for (h, _, _), w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt.format(r[k]).rjust(w) for (_, k, fmt), w in zip(cols, widths)))


# ---------------------------------------------------------------------------------------
# The shrink benchmark
# ---------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    apply_quick(args)
    device = setup_device(args)
    import torch
    from multilora_impl import DTYPES, TOLERANCE, make_lora_inputs, make_meta, relative_error
    from sgmv_triton.sgmv_shrink_triton import sgmv_shrink
    from sgmv_triton.sgmv_torch_sequential import sgmv_shrink_sequential

    dtype = DTYPES[args.dtype]
    esize = torch.empty(0, dtype=dtype).element_size()
    timing = device != "cpu"
    print(f"sgmv_shrink: device={device} dtype={args.dtype} L={args.num_adapters} "
          f"ranks={args.rank}{' mixed' if args.mixed_ranks else ''} workload={args.workload} "
          f"no_lora={args.no_lora_share} block_m={args.block_m} split_k={args.split_k}"
          + ("" if timing else "  (CPU: Triton interpreter, timing skipped)"))
    copy = float("nan")
    if timing:
        import bench_utils as bu
        copy = bu.copy_bandwidth_gbs(device)
    rows, failed = [], 0
    for proj in args.proj:
        h_in, h_outs = PROJECTIONS[proj]
        S = len(h_outs)
        for label, idx in make_batches(args, device):
            T = idx.numel()
            meta = make_meta(idx)
            lora_rows = idx >= 0
            base_us = bu.base_gemm_us(T, h_in, sum(h_outs), dtype, device)[0] if timing \
                else float("nan")
            for r_max in args.rank:
                ranks = adapter_ranks(args, r_max)
                rk = torch.tensor(ranks) if ranks else torch.full((args.num_adapters,), r_max)
                tok_rank = torch.where(lora_rows.cpu(), rk[idx.long().cpu().clamp(min=0)], 0)
                used = torch.unique(idx[lora_rows]).cpu()
                bytes_moved = (int(lora_rows.sum()) * h_in * esize
                               + int(rk[used].sum()) * S * h_in * esize + T * S * r_max * 4)
                flops = 2 * int(tok_rank.sum()) * h_in * S
                set_bytes = T * h_in * esize + args.num_adapters * S * r_max * h_in * esize \
                    + T * S * r_max * 4
                n_sets = sgmv_pool_size(set_bytes, device)
                sets = [make_lora_inputs(T, h_in, h_outs if S > 1 else h_outs[0],
                                         args.num_adapters, r_max, dtype, device, ranks,
                                         seed=args.seed + 101 * i) for i in range(n_sets)]
                for p in sets:
                    del p["y"], p["B"]                         # only x, A are read here
                    p["v"] = torch.empty(T, S, r_max, dtype=torch.float32, device=device)
                for block_m, split_k in itertools.product(args.block_m, args.split_k):
                    kw = dict(max_seg_len=meta.max_seg_len, split_k=split_k,
                              block_m=block_m, block_k=args.block_k)
                    err = 0.0
                    for p in sets:                 # validate every set that will be timed
                        p["v"].fill_(float("nan"))
                        sgmv_shrink(p["x"], p["A"], meta.seg_starts, meta.seg_adapter,
                                    p["ranks"], v=p["v"], **kw)
                        ref = sgmv_shrink_sequential(p["x"], p["A"], meta.seg_starts,
                                                     meta.seg_adapter, p["ranks"], torch.float64)
                        err = max(err, relative_error(p["v"], ref))
                    ok = err < TOLERANCE[dtype]
                    failed += not ok
                    times = (float("nan"),) * 3
                    if timing and ok:
                        calls = [lambda p=p: sgmv_shrink(p["x"], p["A"], meta.seg_starts,
                                                         meta.seg_adapter, p["ranks"],
                                                         v=p["v"], **kw) for p in sets]
                        times = time_calls(calls)
                    rows.append(dict(proj=proj, batch=label, T=T, segments=meta.num_segments,
                                     r_max=r_max, block_m=block_m or "auto",
                                     split_k=split_k or "auto",
                                     err=err, ok=ok, **timing_fields(times, bytes_moved, flops,
                                                                     copy, base_us, n_sets)))
    return finish(args, "sgmv_shrink", rows,
                  [("proj", "proj", "{}"), ("batch", "batch", "{}"), ("T", "T", "{}"),
                   ("segs", "segments", "{}"), ("r", "r_max", "{}"),
                   ("BLOCK_M", "block_m", "{}"), ("splitK", "split_k", "{}"),
                   ("rel err", "err", "{:.1e}")], timing, copy, failed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--split-k", nargs="+", type=int, default=[0],
                   help="h_in splits (>1: partial sums added in a fixed order; 0 = the "
                        "default, picked from T and the columns)")
    p.add_argument("--block-k", type=int, default=0, help="h_in per K step (0 = default)")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
