"""Is the launch floor (bench_utils.empty_graph_us) one number within a run?

The figure runs measured it at 0.93-0.94 us at the start of a sweep (the decode figure's
header) and 1.2-1.3 us afterwards (its `none` column at every point, and the headers of the
bandwidth and Punica sweeps that followed in the same process), which moves target 5's floor
by 40%. This measures it 5 times at the start, then after each of three kinds of work a
sweep does between two measurements: graph-timed bgmv_cuda pairs, a do_bench-timed eager
loop of small launches (the `loop` mode's pattern), and plain idle time; each time 5 plain
measurements, then 5 each right after a 100 ms copy burst. Session 11 (calls 1, 2): 0.93-0.94
us the first two times, 1.19-1.33 us every later time, burst or not.

    python notes/probes/empty_floor_probe.py
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch

import bench_utils as bu
from bgmv_cuda import bgmv_cuda as bc
from multilora_impl import make_lora_inputs, make_workload


def copy_burst(ms: float = 100.0) -> None:
    """Back-to-back 256 MB device copies for about `ms` milliseconds."""
    src = torch.empty(2**27, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < ms / 1e3:
        for _ in range(50):
            dst.copy_(src)
        torch.cuda.synchronize()


def floors(tag: str, n: int = 5) -> None:
    for burst in (False, True):
        us = []
        for _ in range(n):
            if burst:
                copy_burst()
            us.append(bu.empty_graph_us("cuda", fresh=True))
        print(f"{tag:34s} empty kernel in graph{' after a copy burst' if burst else ''}, us: "
              + " ".join(f"{u:.3f}" for u in us), flush=True)


def main() -> None:
    dev = "cuda"
    print(f"copy {bu.copy_bandwidth_gbs(dev):.0f} GB/s")
    floors("after the copy (a sweep's start)")
    inp = make_lora_inputs(64, 4096, 4096, 7, 16, torch.bfloat16, dev, seed=0)
    idx = make_workload("uniform", 64, 7, seed=0).to(dev)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    t = bu.time_graph(lambda k: bc.bgmv_lora(inp["y"], *args), 1)[0]
    print(f"bgmv_cuda pair u7 bs 64 (one set, warm): {t:.2f} us")
    floors("after graph-timed pairs")
    xs = [torch.randn(1, 4096, device=dev) for _ in range(64)]
    bu.time_fn(lambda: [x.mul_(1.0) for x in xs])          # 64 eager launches per rep
    floors("after an eager do_bench loop")
    time.sleep(2.0)
    floors("after 2 s idle")
    t = torch.zeros(1, device=dev)
    for calls in (50, 200, 800):
        us = bu.time_graph(lambda k: t.add_(1.0), n_sets=1, calls_per_graph=calls)[0]
        print(f"empty kernel, {calls} calls per graph: {us:.3f} us")


if __name__ == "__main__":
    main()
