"""Prefill microbenchmark (many tokens per request, each request's tokens contiguous).

Validates every mode against the float64 reference on the exact inputs it times, then
times it (CUDA-graph replay over a pool of input sets, or do_bench for host-syncing modes)
beside the base layer's GEMM (all T tokens x W), and plots two sweeps:
  - time vs tokens per request (fixed number of requests),
  - time vs number of requests (fixed tokens per request),
optionally with ragged lengths. Implementations come from multilora_impl.py.

    python multilora_impl_prefill.py                      # the standard figure, H200 ~minutes
    python multilora_impl_prefill.py --plot-only          # redraw from plots/*.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import torch

import bench_utils as bu
from multilora_impl import (DTYPES, WORKLOADS, bench_point, make_workload,
                            register_public_modes)

PREFILL_FIG = "prefill_lora_loop_vs_cheat_bmm_vs_gbmm_vs_bgmv_cuda_triton_vs_sgmv_triton"
PREFILL_MODES = ["loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "none"]


def request_lengths(num_requests: int, tokens: int, ragged: bool, seed: int) -> list[int]:
    """Tokens of each request: all equal, or ragged, uniform in [tokens/2, 3 tokens/2]."""
    if not ragged:
        return [tokens] * num_requests
    g = torch.Generator().manual_seed(seed)
    lo, hi = max(1, tokens // 2), max(2, 3 * tokens // 2)
    return torch.randint(lo, hi + 1, (num_requests,), generator=g).tolist()


def prefill_idx(adapters: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """Per-token idx [T]: request r's adapter repeated over its contiguous tokens."""
    return torch.repeat_interleave(adapters, torch.tensor(lengths)).to(torch.int32)


def run_point(args, num_requests: int, tokens: int, seed: int) -> dict:
    dtype = DTYPES[args.dtype]
    L = num_requests if args.workload == "distinct" else args.num_adapters
    adapters = make_workload(args.workload, num_requests, L, args.no_lora_share, seed=seed)
    lengths = request_lengths(num_requests, tokens, args.ragged, seed)
    idx = prefill_idx(adapters, lengths)
    pt = bench_point(args.modes, idx, L, args.h_in, [args.h_out], args.rank, dtype,
                     seed=seed, device=args.device)
    pt.update(num_requests=num_requests, tokens_per_request=tokens, lengths=lengths, L=L,
              gemm=bu.base_gemm_us(idx.numel(), args.h_in, args.h_out, dtype, args.device))
    flops = 2 * idx.numel() * args.rank * (args.h_in + args.h_out)
    for rec in pt["modes"].values():
        if "median_us" in rec:
            rec["tflops"] = flops / (rec["median_us"] * 1e-6) / 1e12
    line = "  ".join(f"{m}={r['median_us']:.1f}" for m, r in pt["modes"].items()
                     if "median_us" in r)
    print(f"  req={num_requests:3d} tok/req={tokens:5d} T={idx.numel():6d} "
          f"gemm={pt['gemm'][0]:.1f}us  {line}")
    return pt


def run(args) -> dict:
    copy_gbs, empty_us = bu.ceilings(args.device)    # the floor first: `none`'s column
    data = {"env": bu.env_info(), "config": {
        k: getattr(args, k) for k in ("dtype", "h_in", "h_out", "rank", "num_adapters",
                                      "workload", "no_lora_share", "ragged", "modes",
                                      "tokens_per_request", "num_requests",
                                      "fixed_requests", "fixed_tokens", "seed")},
        "copy_gbs": copy_gbs, "empty_graph_us": empty_us, "sweep_tokens": [], "sweep_requests": []}
    data["config"]["command"] = " ".join(sys.argv)
    print(f"copy bandwidth {copy_gbs:.0f} GB/s, empty graph kernel {empty_us:.2f} us")
    print(f"sweep: tokens per request, {args.fixed_requests} requests")
    for tok in args.tokens_per_request:
        data["sweep_tokens"].append(run_point(args, args.fixed_requests, tok, args.seed + tok))
    print(f"sweep: number of requests, {args.fixed_tokens} tokens each")
    for n in args.num_requests:
        data["sweep_requests"].append(run_point(args, n, args.fixed_tokens, args.seed + 7 * n))
    return data


def plot(data: dict, path: str) -> None:
    plt = bu.pyplot()
    cfg = data["config"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    for ax, key, xkey, xlabel in (
            (axes[0], "sweep_tokens", "tokens_per_request",
             f"tokens per request ({cfg['fixed_requests']} requests)"),
            (axes[1], "sweep_requests", "num_requests",
             f"number of requests ({cfg['fixed_tokens']} tokens each)")):
        pts = data[key]
        xs = [p[xkey] for p in pts]
        from multilora_impl import _series
        bu.plot_mode_lines(ax, xs, _series(pts, cfg["modes"]))
        ax.plot(xs, [p["gemm"][0] for p in pts], "k--", lw=1, label="base GEMM x@W")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("time per layer call (µs)")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"How long does one multi-LoRA prefill layer take? {data['env']['gpu']}, "
                 f"{cfg['dtype']}, h {cfg['h_in']}->{cfg['h_out']}, r={cfg['rank']}, "
                 f"{cfg['workload']}{', ragged' if cfg['ragged'] else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Validates, times, plots.")
    p.add_argument("--modes", nargs="+", default=PREFILL_MODES, help="modes (registry names)")
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="x, y, A, B dtype")
    p.add_argument("--h-in", type=int, default=4096, help="input hidden size")
    p.add_argument("--h-out", type=int, default=4096, help="output hidden size")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--workload", default="distinct", choices=WORKLOADS,
                   help="request-to-adapter popularity (distinct: one adapter per request)")
    p.add_argument("--num-adapters", type=int, default=7,
                   help="adapters for the non-distinct workloads")
    p.add_argument("--no-lora-share", type=float, default=0.0,
                   help="share of requests with no adapter")
    p.add_argument("--tokens-per-request", nargs="+", type=int,
                   default=[16, 32, 64, 128, 256, 512, 1024, 2048],
                   help="sweep 1: tokens per request")
    p.add_argument("--fixed-requests", type=int, default=8, help="requests in sweep 1")
    p.add_argument("--num-requests", nargs="+", type=int, default=[1, 2, 4, 8, 16, 32],
                   help="sweep 2: number of requests")
    p.add_argument("--fixed-tokens", type=int, default=512, help="tokens per request in sweep 2")
    p.add_argument("--ragged", action="store_true",
                   help="ragged lengths: each request uniform in [n/2, 3n/2] tokens")
    p.add_argument("--seed", type=int, default=0, help="seed of inputs and workloads")
    p.add_argument("--out-dir", default="plots", help="where PNG and JSON go")
    p.add_argument("--name", default=None, help="file name stem (default: the standard one, "
                   "with _ragged appended for --ragged)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda (CUDA-graph timing) or cpu (wall clock, for tests only)")
    p.add_argument("--plot-only", action="store_true", help="redraw the PNG from its JSON")
    p.add_argument("--public", action="store_true",
                   help="also time the public Triton LoRA kernels of public_kernels.py "
                        "(SGLang's and vLLM's, where available), for target 6")
    args = p.parse_args(argv)
    name = args.name or PREFILL_FIG + ("_ragged" if args.ragged else "")
    path = os.path.join(args.out_dir, name)
    if not args.plot_only:
        public = None
        if args.public:
            added, public = register_public_modes()
            args.modes = list(args.modes) + [m for m in added if m not in args.modes]
        data = run(args)
        if public:
            data["config"]["public"] = public
        bu.write_json(path + ".json", data)
    plot(bu.read_json(path + ".json"), path + ".png")


if __name__ == "__main__":
    main()
