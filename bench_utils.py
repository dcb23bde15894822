"""Timing, ceilings, JSON and plotting shared by every benchmark script.

Method (DESIGN.md, Measuring):
- `time_fn`: triton.testing.do_bench medians with the p20-p80 band (do_bench flushes L2
  between reps). Used for slow or host-syncing modes (loop, gbmm).
- `time_graph`: N back-to-back calls captured in one CUDA graph, each on the next input set
  of a pool sized to several times the L2, replayed under do_bench; time / N. Used for the
  microsecond kernels, so launch gaps do not hide the kernel and the cache starts cold.
- `copy_bandwidth_gbs`: a large device-to-device copy under do_bench, bytes read + written.
- `empty_graph_us`: an empty kernel replayed in a CUDA graph (the launch floor), measured
  once per process.
Plots are drawn from the JSON written here, never from live variables.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import time
from typing import Callable, Optional, Sequence

import torch

QUANTILES = [0.5, 0.2, 0.8]  # median, p20, p80

# One colour and marker per mode, shared by every figure.
MODE_STYLE = {
    "none": ("#7f7f7f", "x"),
    "loop": ("#d62728", "v"),
    "cheat_bmm": ("#9467bd", "D"),
    "gbmm": ("#ff7f0e", "s"),
    "bgmv_triton": ("#1f77b4", "o"),
    "bgmv_cuda": ("#2ca02c", "^"),
    "sgmv_triton": ("#17becf", "P"),
    "peft": ("#8c564b", "*"),
    "stacked": ("#393b79", "h"),      # engine-only mode (multilora_engine.ENGINE_ONLY_MODES)
    # public kernels (public_kernels.py, --public): grey-pink family, dotted in line plots
    "sglang_triton": ("#e377c2", "<"),
    "sglang_csgmv": ("#bcbd22", ">"),
    "sglang_csgmv_c16": ("#c49c94", "p"),
    "vllm_triton": ("#7f7f7f", "X"),
}


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], None], warmup_ms: int = 25, rep_ms: int = 100,
            device: str = "cuda") -> tuple[float, float, float]:
    """(median, p20, p80) in microseconds of fn() under do_bench (L2 flushed between reps).
    On the CPU (tests only): wall-clock quantiles of a few calls."""
    fn()  # untimed first call: JIT, autotune, extension build
    if not str(device).startswith("cuda"):
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            ts.append(1e6 * (time.perf_counter() - t0))
        return tuple(float(v) for v in torch.tensor(ts).quantile(torch.tensor(QUANTILES)))
    import triton.testing
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=QUANTILES)
    return tuple(1e3 * t for t in ms)


def l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def pool_size(bytes_per_set: int, l2_multiple: float = 4.0, max_sets: int = 64) -> int:
    """Input sets needed so one pass over the pool moves several times the L2."""
    return max(2, min(max_sets, math.ceil(l2_multiple * l2_bytes() / max(1, bytes_per_set))))


def time_graph(call: Callable[[int], None], n_sets: int, calls_per_graph: Optional[int] = None,
               rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) microseconds per call: call(k) for k cycling over n_sets input sets,
    captured back to back in one CUDA graph and replayed; graph time / calls."""
    import triton.testing
    n = calls_per_graph or max(n_sets, 16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):           # warm-up outside capture (JIT, autotune)
        for k in range(min(n, n_sets)):
            call(k)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(n):
            call(j % n_sets)
    graph.replay()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=rep_ms, quantiles=QUANTILES)
    return tuple(1e3 * t / n for t in ms)


def copy_bandwidth_gbs(device: str = "cuda", nbytes: int = 2 * 2**30) -> float:
    """Measured device-to-device copy rate: (bytes read + bytes written) / median time."""
    if not str(device).startswith("cuda"):
        nbytes = 64 * 2**20
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    us = time_fn(lambda: dst.copy_(src), rep_ms=200, device=device)[0]
    src = dst = None      # free before returning
    return 2 * nbytes / (us * 1e-6) / 1e9


_EMPTY_US: dict = {}   # device -> the first launch floor measured in this process


def empty_graph_us(device: str = "cuda", calls: int = 200, fresh: bool = False) -> float:
    """Time of one near-empty kernel launch inside a replayed CUDA graph, in microseconds:
    the launch floor. Measured once per process and device, at the first call (a sweep's
    start), then reused (fresh=True measures again). Why: on the H200 this graph runs at
    0.93-0.94 us per kernel the first two times a process measures it and at 1.2-1.3 us
    every later time, with or without work in between (notes/probes/empty_floor_probe.py;
    PERF_LOG, session 11); the first value is the lower, more demanding floor, and every
    sweep of one run then shares it."""
    key = str(device)
    if key in _EMPTY_US and not fresh:
        return _EMPTY_US[key]
    t = torch.zeros(1, device=device)
    if not key.startswith("cuda"):
        us = time_fn(lambda: t.add_(1.0), device=device)[0]
    else:
        us = time_graph(lambda k: t.add_(1.0), n_sets=1, calls_per_graph=calls)[0]
    _EMPTY_US.setdefault(key, us)
    return us


def ceilings(device: str = "cuda") -> tuple[float, float]:
    """(copy GB/s, launch floor us), measured in that order, so the process's first floor
    measurement (empty_graph_us keeps it) follows a copy whichever benchmark runs first:
    taken after other graph replays instead it read 1.25 us, not 0.93 (PERF_LOG session 14,
    call 5)."""
    return copy_bandwidth_gbs(device), empty_graph_us(device)


def gemm_call(T: int, h_in: int, h_out: int, dtype: torch.dtype, device: str = "cuda"):
    """The base layer x @ W.T over a pool of W's (cold cache): returns (call, n_sets)."""
    elt = torch.finfo(dtype).bits // 8
    n_sets = (pool_size((T * h_in + h_in * h_out + T * h_out) * elt, max_sets=16)
              if str(device).startswith("cuda") else 1)
    xs = [torch.randn(T, h_in, device=device, dtype=dtype) for _ in range(n_sets)]
    ws = [torch.randn(h_out, h_in, device=device, dtype=dtype) / h_in**0.5 for _ in range(n_sets)]
    outs = [torch.empty(T, h_out, device=device, dtype=dtype) for _ in range(n_sets)]
    return (lambda k: torch.matmul(xs[k], ws[k].T, out=outs[k])), n_sets


def base_gemm_us(T: int, h_in: int, h_out: int, dtype: torch.dtype, device: str = "cuda",
                 rep_ms: int = 100) -> tuple[float, float, float]:
    """(median, p20, p80) µs of the base layer's own GEMM x @ W.T [T, h_in] x [h_in, h_out]
    (LoRA's cost is relative to it): CUDA-graph replay over a cold pool; wall clock on a CPU."""
    call, n_sets = gemm_call(T, h_in, h_out, dtype, device)
    if not str(device).startswith("cuda"):
        return time_fn(lambda: call(0), device=device)
    return time_graph(call, n_sets, rep_ms=rep_ms)


# ---------------------------------------------------------------------------------------
# Bytes that must move
# ---------------------------------------------------------------------------------------
def lora_bytes(idx: torch.Tensor, h_in: int, h_outs: Sequence[int], r_max: int,
               dtype: torch.dtype, ranks: Optional[torch.Tensor] = None) -> int:
    """Distinct adapters' used A and B, x rows with an adapter read once, y rows with an
    adapter read and written; -1 rows move nothing."""
    elt = torch.finfo(dtype).bits // 8
    idx_h = idx.detach().cpu().long()
    used = torch.unique(idx_h[idx_h >= 0])
    r = ranks.detach().cpu().long()[used] if ranks is not None else torch.full_like(used, r_max)
    n_rows = int((idx_h >= 0).sum())
    h_out = sum(h_outs)
    weights = int(r.sum()) * (len(h_outs) * h_in + h_out)
    return elt * (weights + n_rows * h_in + 2 * n_rows * h_out)


# ---------------------------------------------------------------------------------------
# Environment and JSON
# ---------------------------------------------------------------------------------------
def git_commit() -> str:
    """HEAD (with -dirty), or $MULTILORA_COMMIT where the tree has no .git (a copied tree
    on a GPU machine: tests/gpu_run.sh is given the commit by whoever sends the tree)."""
    if os.environ.get("MULTILORA_COMMIT"):
        return os.environ["MULTILORA_COMMIT"]
    try:
        root = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") or "unknown"
    except Exception:
        return "unknown"


def knob_settings() -> dict:
    """The MULTILORA_* variables set for this run (kernel and engine switches such as
    MULTILORA_EXPAND_TILES or MULTILORA_STACKED_EXPAND), so a JSON says what it measured."""
    not_knobs = ("MULTILORA_COMMIT", "MULTILORA_SHARD", "MULTILORA_GPU_CASES")   # test plumbing
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("MULTILORA_") and k not in not_knobs}


def env_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "commit": git_commit(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "settings": knob_settings()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def write_json(path: str, data: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------
# Plotting
# ---------------------------------------------------------------------------------------
def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_mode_lines(ax, xs: Sequence[float], series: dict[str, list], band: bool = True) -> None:
    """series: mode -> list of (median, p20, p80) or None per x; one colour per mode."""
    for mode, pts in series.items():
        colour, marker = MODE_STYLE.get(mode, ("black", "."))
        keep = [(x, p) for x, p in zip(xs, pts) if p is not None]
        if not keep:
            continue
        kx = [x for x, _ in keep]
        ax.plot(kx, [p[0] for _, p in keep], color=colour, marker=marker, label=mode, lw=1.4, ms=5)
        if band:
            ax.fill_between(kx, [p[1] for _, p in keep], [p[2] for _, p in keep],
                            color=colour, alpha=0.2, lw=0)
