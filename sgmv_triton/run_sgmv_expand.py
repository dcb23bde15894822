"""Validate and time the SGMV expand kernel (sgmv_expand_triton.py) on prefill batches.

    y[rows of segment g, slice s] += scale[a] * v[rows, s, :r] @ B_s[a, :, :r].T   (in place)

Same projections, batches and method as run_sgmv_shrink.py (whose helpers this imports):
v is the float64 per-segment shrink rounded to fp32, the kernel's y is compared with the
float64 per-segment expand of the unrounded v (sgmv_torch_sequential.py, checked against
multilora_impl.lora_reference by tests/test_sgmv_triton.py), rows with idx = -1 must be
bit-identical, failing points are not timed. Timing: one CUDA graph over a pool of input
sets (> 3x L2), do_bench quantiles (0.5, 0.2, 0.8), divided by the pool size; y
accumulates across replays, which does not change the work.

GB/s counts the bytes that must move: y rows with an adapter read and written, their v
(used ranks, fp32), and the used rank columns of the distinct adapters' B.
"""
import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sgmv_triton.run_sgmv_shrink import (PROJECTIONS, adapter_ranks,  # noqa: E402
                                         add_common_args, apply_quick, finish, make_batches,
                                         setup_device, sgmv_pool_size, time_calls,
                                         timing_fields)

EPILOG = """examples:
  python sgmv_triton/run_sgmv_expand.py                          # Llama-3-8B, bf16, r=16, 8x512
  python sgmv_triton/run_sgmv_expand.py --proj qkv gate_up --rank 16 64 --ragged
  python sgmv_triton/run_sgmv_expand.py --block-n 64 128 --block-m 0 32
  python sgmv_triton/run_sgmv_expand.py --quick --device cpu     # tiny shapes, interpreter
"""


def main(args: argparse.Namespace) -> int:
    apply_quick(args)
    device = setup_device(args)
    import torch
    from multilora_impl import DTYPES, TOLERANCE, make_lora_inputs, make_meta, relative_error
    from sgmv_triton.sgmv_expand_triton import sgmv_expand
    from sgmv_triton.sgmv_torch_sequential import sgmv_expand_sequential, sgmv_shrink_sequential

    dtype = DTYPES[args.dtype]
    esize = torch.empty(0, dtype=dtype).element_size()
    timing = device != "cpu"
    print(f"sgmv_expand: device={device} dtype={args.dtype} L={args.num_adapters} "
          f"ranks={args.rank}{' mixed' if args.mixed_ranks else ''} workload={args.workload} "
          f"no_lora={args.no_lora_share} block_m={args.block_m} block_n={args.block_n}"
          + ("" if timing else "  (CPU: Triton interpreter, timing skipped)"))
    copy = float("nan")
    if timing:
        import bench_utils as bu
        copy = bu.copy_bandwidth_gbs(device)
    rows, failed = [], 0
    for proj in args.proj:
        h_in, h_outs = PROJECTIONS[proj]
        S, h_total = len(h_outs), sum(h_outs)
        for label, idx in make_batches(args, device):
            T = idx.numel()
            meta = make_meta(idx)
            lora_rows = idx >= 0
            n_lora = int(lora_rows.sum())
            base_us = bu.base_gemm_us(T, h_in, h_total, dtype, device)[0] if timing \
                else float("nan")
            for r_max in args.rank:
                ranks = adapter_ranks(args, r_max)
                rk = torch.tensor(ranks) if ranks else torch.full((args.num_adapters,), r_max)
                tok_rank = torch.where(lora_rows.cpu(), rk[idx.long().cpu().clamp(min=0)], 0)
                used = torch.unique(idx[lora_rows]).cpu()
                bytes_moved = (2 * n_lora * h_total * esize + int(tok_rank.sum()) * S * 4
                               + int(rk[used].sum()) * h_total * esize)
                flops = 2 * int(tok_rank.sum()) * h_total
                set_bytes = T * h_total * esize + T * S * r_max * 4 \
                    + args.num_adapters * h_total * r_max * esize
                n_sets = sgmv_pool_size(set_bytes, device)
                sets = []
                for i in range(n_sets):
                    p = make_lora_inputs(T, h_in, h_outs if S > 1 else h_outs[0],
                                         args.num_adapters, r_max, dtype, device, ranks,
                                         seed=args.seed + 101 * i)
                    p["v64"] = sgmv_shrink_sequential(p["x"], p["A"], meta.seg_starts,
                                                      meta.seg_adapter, p["ranks"], torch.float64)
                    p["v"] = p["v64"].float()                                 # [T, S, r_max]
                    del p["x"], p["A"]                  # only y, v, B are read here
                    sets.append(p)
                for block_m, block_n in itertools.product(args.block_m, args.block_n):
                    kw = dict(max_seg_len=meta.max_seg_len, block_m=block_m, block_n=block_n)
                    err = 0.0
                    for p in sets:                 # validate every set that will be timed
                        y = p["y"].clone()
                        sgmv_expand(y, p["v"], p["B"], meta.seg_starts, meta.seg_adapter,
                                    p["scale"], p["ranks"], **kw)
                        if not torch.equal(y[~lora_rows], p["y"][~lora_rows]):
                            err = float("inf")                 # a -1 row was modified
                        ref = p["y"].double()
                        sgmv_expand_sequential(ref, p["v64"], p["B"], meta.seg_starts,
                                               meta.seg_adapter, p["scale"], p["ranks"])
                        err = max(err, relative_error(y, ref))
                    ok = err < TOLERANCE[dtype]
                    failed += not ok
                    times = (float("nan"),) * 3
                    if timing and ok:
                        calls = [lambda p=p: sgmv_expand(p["y"], p["v"], p["B"], meta.seg_starts,
                                                         meta.seg_adapter, p["scale"],
                                                         p["ranks"], **kw) for p in sets]
                        times = time_calls(calls)
                    rows.append(dict(proj=proj, batch=label, T=T, segments=meta.num_segments,
                                     r_max=r_max, block_m=block_m or "auto",
                                     block_n=block_n or "auto", err=err, ok=ok,
                                     **timing_fields(times, bytes_moved, flops, copy, base_us,
                                                     n_sets)))
    return finish(args, "sgmv_expand", rows,
                  [("proj", "proj", "{}"), ("batch", "batch", "{}"), ("T", "T", "{}"),
                   ("segs", "segments", "{}"), ("r", "r_max", "{}"),
                   ("BLOCK_M", "block_m", "{}"), ("BLOCK_N", "block_n", "{}"),
                   ("rel err", "err", "{:.1e}")], timing, copy, failed)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--block-n", nargs="+", type=int, default=[0],
                   help="output columns per program (0 = default: 128 for 16-bit, 64 for fp32)")
    return p


if __name__ == "__main__":
    sys.exit(main(build_parser().parse_args()))
