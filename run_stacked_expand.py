"""Time mode "stacked"'s expand (engine_kernels.stacked_expand) at the Llama-3-8B sites:
each (block_n, num_warps, block_t) tile config of the Triton kernel and the torch form
(mask multiply + cuBLAS addmm), CUDA-graph replay, bf16, 7 adapters of rank 16 by default.
Every config is checked against the torch form before it is timed. With --folded, also
the decode step's pair at o / down and gate/up: the expand then the fused elementwise
kernel that consumes it (add_rms_norm, silu_mul) against the one kernel that does both
(add_rms_norm with lora=, stacked_silu_mul; the latter at every --block-n x --num-warps x
--block-t).

    python run_stacked_expand.py                       # T 64, the four sites, all configs
    python run_stacked_expand.py --T 1 16 64 256 --json plots/stacked_expand_sweep_h200.json
    python run_stacked_expand.py --device cpu --tiny --folded   # the CPU test's run (checks
                                                                # only: wall-clock times)
"""
import argparse
import os

import torch

# (site, slice widths) of Llama-3-8B: q/k/v, o, gate/up, down; --tiny: small stand-ins
SITES = {"qkv": (4096, 1024, 1024), "o": (4096,), "gate_up": (14336, 14336), "down": (4096,)}
SITES_TINY = {"qkv": (64, 16, 16), "o": (64,), "gate_up": (48, 48), "down": (64,)}
HEADS = (32, 8, 128)         # Llama-3-8B: query heads, KV heads, head dim (the qkv site)
HEADS_TINY = (4, 1, 16)
CONSUMER = {"qkv": "rope_qkv_to_cache", "o": "add_rms_norm", "gate_up": "silu_mul",
            "down": "add_rms_norm"}
DEV = "cuda"                 # set by main (--device)
ek = None                    # engine_kernels, imported by main (after TRITON_INTERPRET on the CPU)


def site_inputs(T: int, widths: tuple, L: int, r: int, dtype, seed: int) -> dict:
    """One input set as the engine holds it: out [T, N + E] (y and v are views), a
    block-diagonal bt [E, N], idx over the L adapters, the column-to-adapter map."""
    from multilora_engine import STACK_ROWS
    g = torch.Generator(device="cpu").manual_seed(seed)
    S, N = len(widths), sum(widths)
    E = -(-S * L * r // STACK_ROWS) * STACK_ROWS
    bt = torch.zeros(E, N)
    c = 0
    for s, w in enumerate(widths):
        bt[s * L * r:(s + 1) * L * r, c:c + w] = 0.1 * torch.randn(L * r, w, generator=g)
        c += w
    return dict(out=torch.randn(T, N + E, generator=g).to(DEV, dtype), bt=bt.to(DEV, dtype),
                idx=torch.randint(0, L, (T,), generator=g, dtype=torch.int32).to(DEV),
                col=ek.stacked_col_adapter((S, L, r, E), DEV), layout=(S, L, r, E), N=N,
                starts=tuple(torch.tensor(widths).cumsum(0)[:-1].tolist()))


def timer(fn, n_sets: int, rep_ms: int) -> tuple:
    """CUDA-graph replay over the input sets on a GPU; wall clock on the CPU (checks only)."""
    from bench_utils import time_fn, time_graph
    if DEV == "cuda":
        return time_graph(fn, n_sets, rep_ms=rep_ms)
    return time_fn(lambda: fn(0), device="cpu")


def time_folded(site: str, T: int, sets: list, N: int, dtype, rep_ms: int, heads: tuple,
                silu_configs: list) -> list:
    """Expand + consumer (rope_qkv_to_cache at q/k/v, add_rms_norm at o / down, silu_mul at
    gate/up) against the folded kernel, on the same input sets; the folded output is
    checked against the pair's. At gate/up the folded kernel (stacked_silu_mul) runs at
    each (block_n, num_warps, block_t; 0 = the rule by T) of silu_configs: its default
    tile came from a register check, not from timing (session 6 measured it slower than
    the pair)."""
    g = torch.Generator(device="cpu").manual_seed(5)
    x0 = torch.randn(T, N, generator=g).to(DEV, dtype)
    w = (1 + 0.1 * torch.randn(N, generator=g)).to(DEV, dtype)
    xs = [x0.clone() for _ in sets]
    H, Hkv, d = heads
    ang = torch.rand(64, d // 2, generator=g) * 6.28
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(DEV, dtype)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).to(DEV, dtype)   # first half negated
    pos = torch.randint(0, 64, (T,), generator=g).to(DEV)
    slot = torch.tensor([7], device=DEV)
    k_cache = torch.zeros(T, Hkv, 64, d, dtype=dtype, device=DEV)
    v_cache = torch.zeros_like(k_cache)

    def consume(k, y, lora=None):
        if site == "qkv":       # q returned; k and v into the caches at `slot`
            return ek.rope_qkv_to_cache(y, cos, sin, pos, k_cache, v_cache, slot, H, Hkv, lora)
        if site == "gate_up":
            return ek.stacked_silu_mul(y, *lora, **cfg) if lora else ek.silu_mul(y)
        return ek.add_rms_norm(xs[k], y, w, 1e-5, lora)

    def pair(k):
        s = sets[k]
        y = ek.stacked_expand(s["out"][:, :N], s["out"][:, N:], s["bt"], s["idx"], s["layout"],
                              s["starts"])
        return consume(k, y)

    def folded(k):
        s = sets[k]
        return consume(k, s["out"][:, :N], (s["out"][:, N:], s["bt"], s["idx"], s["layout"]))

    cfg = {}
    keep, xk = sets[0]["out"].clone(), xs[0].clone()
    want = pair(0).float()
    rows = []
    for kind, c in [("expand+" + CONSUMER[site], None)] + [
            ("folded", c) for c in (silu_configs if site == "gate_up" else [None])]:
        cfg = dict(block_n=c[0], num_warps=c[1], block_t=c[2] or None) if c else {}
        fn = folded if kind == "folded" else pair
        sets[0]["out"].copy_(keep)
        xs[0].copy_(xk)
        got = fn(0).float()
        xs[0].copy_(xk)
        err = ((got - want).abs().max() / want.abs().max()).item()
        if err > 2e-2:
            raise SystemExit(f"{site} T {T} {kind} {cfg}: relative error {err:.2e} against the pair")
        med, p20, p80 = timer(fn, len(sets), rep_ms)
        rows.append(dict(T=T, site=site, kind=kind, block_n=cfg.get("block_n"),
                         num_warps=cfg.get("num_warps"), block_t=cfg.get("block_t"),
                         median_us=med, p20_us=p20, p80_us=p80, error=err))
        tag = (f"{kind} {c[0]}x{c[1]}w" + (f" t{c[2]}" if c[2] else "")) if c else kind
        print(f"T {T:5d} {site:8s} {tag:26s} {med:7.2f} us  (err {err:.1e})", flush=True)
    return rows


def main(argv=None) -> list:
    global DEV
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[64], help="tokens (decode batch)")
    p.add_argument("--sites", nargs="+", choices=list(SITES), default=list(SITES))
    p.add_argument("--num-adapters", type=int, default=7)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--block-n", type=int, nargs="+", default=[32, 64, 128])
    p.add_argument("--num-warps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--block-t", type=int, nargs="+", default=[0],
                   help="token rows per program (16, 32, 64, 128; 0: the kernels' rule by T)")
    p.add_argument("--folded", action="store_true",
                   help="also time expand + elementwise kernel against the folded kernel")
    p.add_argument("--rep-ms", type=int, default=50)
    p.add_argument("--json", default=None, help="write the timings here")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: the Triton interpreter, fp32 (checks the script and the kernels; "
                        "its times mean nothing)")
    p.add_argument("--tiny", action="store_true", help="small stand-in sites (for --device cpu)")
    a = p.parse_args(argv)
    DEV = a.device
    if DEV == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before engine_kernels imports triton
    global ek
    import engine_kernels as ek
    from bench_utils import env_info, pool_size, write_json
    sites, heads = (SITES_TINY, HEADS_TINY) if a.tiny else (SITES, HEADS)
    dtype, rows = (torch.bfloat16 if DEV == "cuda" else torch.float32), []
    for T in a.T:
        for site in a.sites:
            widths = sites[site]
            one = site_inputs(T, widths, a.num_adapters, a.rank, dtype, 0)
            per_set = one["out"].numel() * 2 + one["bt"].numel() * 2
            n_sets = pool_size(per_set, max_sets=8) if DEV == "cuda" else 2
            sets = [one] + [site_inputs(T, widths, a.num_adapters, a.rank, dtype, k)
                            for k in range(1, n_sets)]
            N = one["N"]

            def torch_form(k):
                s = sets[k]
                mask = ek.stacked_mask(s["idx"], s["col"], dtype)
                ek.stacked_expand_torch(s["out"][:, :N], s["out"][:, N:], s["bt"], mask)

            configs = [("torch", None, None, None)] + [
                ("triton", bn, w, bt) for bt in a.block_t for bn in a.block_n
                for w in a.num_warps]
            for kind, bn, w, bt in configs:
                def call(k, bn=bn, w=w, bt=bt):
                    s = sets[k]
                    ek.stacked_expand(s["out"][:, :N], s["out"][:, N:], s["bt"], s["idx"],
                                      s["layout"], s["starts"], block_n=bn, num_warps=w,
                                      block_t=bt or None)
                fn = torch_form if kind == "torch" else call
                # correctness on set 0 as it is now (earlier timings added into it),
                # against the torch form in fp32
                s = sets[0]
                keep = s["out"].clone()
                mask = ek.stacked_mask(s["idx"], s["col"], torch.float32)
                ref = keep[:, :N].float() + (keep[:, N:].float() * mask) @ s["bt"].float()
                fn(0)
                got = s["out"][:, :N].float().clone()     # a copy even in fp32
                s["out"].copy_(keep)
                err = ((got - ref).abs().max() / ref.abs().max()).item()
                if err > 2e-2:
                    raise SystemExit(f"{site} T {T} {kind} {bn} {w} {bt}: relative error {err:.2e}")
                med, p20, p80 = timer(fn, len(sets), a.rep_ms)
                rows.append(dict(T=T, site=site, kind=kind, block_n=bn, num_warps=w,
                                 block_t=bt or None, median_us=med, p20_us=p20, p80_us=p80,
                                 error=err))
                print(f"T {T:5d} {site:8s} {kind:11s} block_n {str(bn):4s} warps {str(w):4s} "
                      + (f"block_t {bt:<4d}" if bt else "") +
                      f"{med:7.2f} us  (err {err:.1e})", flush=True)
            if a.folded:
                rows += time_folded(site, T, sets, N, dtype, a.rep_ms, heads,
                                    [(bn, nw, bt) for bt in a.block_t for nw in a.num_warps
                                     for bn in a.block_n])
    if a.json:
        write_json(a.json, dict(env=env_info(), config=vars(a), rows=rows))
    return rows


if __name__ == "__main__":
    main()
