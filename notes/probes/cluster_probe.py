"""Where the cluster kernel's time goes (PERF_LOG v32): bf16, h 4096 -> 4096, r 16, uniform
over 7 adapters, batch 1 and 64. Timed as bench_utils.time_graph (back-to-back calls in one
CUDA graph over a cold pool), us per call: the default pair, the cluster kernel with and
without PDL, and the cluster kernel on a warm pool (one input set: A, B, x, y from L2).
--ncu: a few eager calls only, for `ncu --kernel-name regex:cluster`.

    python notes/probes/cluster_probe.py [--ncu]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import bench_utils as bu
from bgmv_cuda import bgmv_cuda as bc
from multilora_impl import make_lora_inputs, make_workload


def main() -> None:
    dev, dtype, h, L, r = "cuda", torch.bfloat16, 4096, 7, 16
    ncu = "--ncu" in sys.argv
    for T in (1, 64):
        idx = make_workload("uniform", T, L, seed=T).to(dev)
        nbytes = bu.lora_bytes(idx, h, [h], r, dtype, None)
        n_sets = 2 if ncu else bu.pool_size(nbytes, max_sets=32)
        sets = [make_lora_inputs(T, h, h, L, r, dtype, dev, seed=k) for k in range(n_sets)]
        variants = {"default": {}, "cluster": dict(variant="cluster"),
                    "cluster_nopdl": dict(variant="cluster", pdl=False)}
        if ncu:
            for _ in range(3):
                s = sets[0]
                bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], variant="cluster")
            torch.cuda.synchronize()
            continue
        out = []
        for name, kw in variants.items():
            def call(k, kw=kw):
                s = sets[k]
                bc.bgmv_lora(s["y"], s["x"], s["A"], s["B"], idx, s["scale"], **kw)
            out.append(f"{name} {bu.time_graph(call, n_sets, rep_ms=10)[0]:.2f}")
            if name == "cluster":
                out.append(f"cluster_warm {bu.time_graph(lambda k: call(0), 1, rep_ms=10)[0]:.2f}")
        print(f"bs {T}: " + ", ".join(out) + " us")


if __name__ == "__main__":
    main()
