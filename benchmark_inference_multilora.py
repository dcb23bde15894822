"""End-to-end multi-LoRA generation throughput (tokens/s) over modes, with references.

Every mode generates from the same prompts, the same random per-request adapters (fixed
seed) and the same decoding parameters; every request generates exactly max_new_tokens
(EOS ignored). Beside the kernels: `none` (the engine without LoRA: its floor) and `peft`
(Hugging Face PEFT's mixed-batch generate with adapter_names=, what users would otherwise
run). Engines (--engine): `fast` (multilora_engine.py: compact forward, static KV cache,
CUDA-graph decode) and/or `hf` (multilora_model.py: the transformers model with wrapped
Linear layers). Each mode's last-token prefill logits are first checked against PEFT's
mixed-batch forward (multilora_impl.TOLERANCE); a failing mode is not timed. Untimed
warm-up first (graph capture is also outside the timed region, reported as capture_s).
One run times one point (--batch-size, --workload), or a grid of points: --batch-sizes
(a sweep, line plot of tokens/s vs batch) x --workloads (grouped bars and the
distinct/identical ratio per mode). The model, adapters and engine are built once (the
engine for the largest batch) and every point uses the first B prompts of one prompt set.

    python benchmark_inference_multilora.py --modes none gbmm bgmv_triton bgmv_cuda \\
        sgmv_triton peft --model-config llama3-8b --max_new_tokens 512 --batch-size 64 \\
        --temperature 0.7 --top-p 0.9 --targets
    python benchmark_inference_multilora.py --batch-sizes 1 2 4 8 16 32 64 128 256 \\
        --max-new-tokens 128 --prompt-len 32          # sweep: none and the kernel modes
    python benchmark_inference_multilora.py --workloads distinct identical --num-adapters 64 \\
        --modes none bgmv_triton bgmv_cuda sgmv_triton --max-new-tokens 128 --targets
    python benchmark_inference_multilora.py --model ./Llama-3.2-1B-Instruct --num-adapters 32
    python benchmark_inference_multilora.py --quick --device cpu          # seconds, tiny model
    python benchmark_inference_multilora.py --plot-only plots/e2e_llama3-8b_b64_L16_r16_n512.json

Writes <out-dir>/e2e_<config>.json (GPU, versions, git commit, config, per mode tokens/s,
time, ms/step, prefill time, peak memory, logits error) and the bar chart .png beside it;
a sweep writes e2e_sweep_<config>.json/.png, a workloads run e2e_workloads_<config>.json/.png
(a sweep over several workloads both PNGs), with one entry per point under "points".
--targets prints the issue's targets (TARGETS) with PASS/FAIL from the JSON.
--model-config builds a named Llama shape with random weights on the device (labelled so).
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import sys
import time

from bench_utils import MODE_STYLE

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ENGINE_MODES = ("none", "loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton",
                "stacked")                   # stacked: the fast engine only (not --engine hf)
ALL_MODES = ENGINE_MODES + ("peft",)
DEFAULT_MODES = ("none", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "stacked", "peft")
# A sweep leaves out peft (~370 ms/step at batch 64) and gbmm (~180 ms/step): minutes per point.
SWEEP_MODES = ("none", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "stacked")
TRITON_MODES = ("bgmv_triton", "sgmv_triton")
FUSED_OPTION = {"auto": "auto", "on": True, "off": False}   # --fused-elementwise -> engine
WORKLOADS = ("distinct", "uniform", "skewed", "identical")
ENGINES = ("fast", "hf")
# one colour per mode, shared with every other figure (bench_utils.MODE_STYLE)
MODE_COLORS = {m: style[0] for m, style in MODE_STYLE.items()}
WORKLOAD_HATCH = {"distinct": "", "uniform": "..", "skewed": "//", "identical": "xx"}
WORKLOAD_LINE = {"distinct": "-", "uniform": "-.", "skewed": ":", "identical": "--"}
# The end-to-end targets of the speed issue: (what, threshold); each must be >= threshold.
TARGETS = {
    "best_tokens_per_s": ("best LoRA mode tokens/s", 8000.0),
    "best_vs_none": ("best LoRA mode / none (same engine)", 0.90),
    "best_vs_peft": ("best LoRA mode / peft", 25.0),
    "distinct_vs_identical": ("best mode's distinct / identical tokens/s", 0.85),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[2].splitlines()))
    p.add_argument("--modes", nargs="+", default=None, choices=ALL_MODES,
                   help=f"modes to time (default: {' '.join(DEFAULT_MODES)}; with --batch-sizes: "
                        f"{' '.join(SWEEP_MODES)}, as peft and gbmm take minutes per point); "
                        f"stacked (every adapter's A under the base weight: one GEMM, for few "
                        f"adapters) runs in the fast engine only")
    p.add_argument("--lora-overlap", default="off", choices=["off", "delta", "shrink"],
                   help="fast engine: off (LoRA after each base GEMM, in place), delta (the "
                        "whole LoRA on a side stream into a zeroed delta beside the GEMM, then "
                        "an add), shrink (the mode's shrink on a side stream beside the GEMM, "
                        "its expand into the GEMM's output; modes without halves run off)")
    p.add_argument("--fused-elementwise", nargs="?", const="on", default="auto",
                   choices=["auto", "on", "off"],
                   help="fast engine: decode step with engine_kernels' fused residual add + "
                        "RMSNorm, RoPE + K/V cache write and SiLU * up (4 small kernels per "
                        "layer instead of 11); auto (default) = on with a GPU, off on the CPU; "
                        "the bare flag = on")
    p.add_argument("--sampler", default="auto", choices=["auto", "triton", "triton_split", "torch"],
                   help="fast engine's top-p sampler: auto (Triton on a GPU), triton (one "
                        "program per row), triton_split (P programs per row, 3 launches), torch")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "matmul", "triton"],
                   help="fast engine's decode attention: auto (default: triton with a GPU, sdpa "
                        "on the CPU), sdpa (one F.scaled_dot_product_attention "
                        "call over the filled cache bucket, masked), matmul, or triton "
                        "(engine_kernels.decode_attention: flash-decoding over each row's "
                        "filled slots only)")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="fast engine: after each mode's timing, run N decode steps eagerly "
                        "under torch.profiler and print one decode step's kernels by GPU "
                        "time (the prefill subtracted), then their sums per group")
    p.add_argument("--profile-summary", default=None, metavar="LOG",
                   help="print the per-group sums of the --profile reports saved in LOG "
                        "(from the top-30 kernel lines it holds) and exit")
    p.add_argument("--estimate", action="store_true",
                   help="print the bytes-bound ceiling of the configured run (weights, KV "
                        "cache, LoRA per decode step / copy bandwidth) and exit")
    p.add_argument("--copy-gbs", type=float, default=None,
                   help="copy bandwidth for --estimate (default: measured on the GPU)")
    p.add_argument("--engine", nargs="+", default=["fast"], choices=ENGINES,
                   help="fast: multilora_engine.py (compact forward, fused q/k/v and gate/up, "
                        "static KV cache, CUDA-graph decode on a GPU); hf: the transformers "
                        "model with wrapped Linear layers and a plain KV-cache loop "
                        "(multilora_model.py); both: one row per (mode, engine) "
                        "(default: fast)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None,
                   help="a real checkpoint (local dir, hub id or .gguf); 'default' = the "
                        "embedded SmolLM2-135M-Instruct GGUF")
    g.add_argument("--model-config", default="llama3-8b",
                   help="named Llama shape with random weights: llama3-8b, llama2-7b, "
                        "smollm2-135m, tiny (default: llama3-8b)")
    p.add_argument("--num-layers", type=int, default=None,
                   help="override the number of decoder layers of --model-config")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="requests per batch (default: 64)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="B",
                   help="sweep: time every mode at each batch size (requests) with one model "
                        "and one engine built for the largest; writes e2e_sweep_<config> with "
                        "a tokens/s vs batch line plot (replaces --batch-size; e.g. "
                        "1 2 4 8 16 32 64 128 256)")
    p.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   default=512, help="tokens generated by every request (default: 512)")
    p.add_argument("--prompt-len", type=int, default=128,
                   help="prompt tokens per request for a random-weight model (default: 128)")
    p.add_argument("--num-adapters", "--num_adapters", dest="num_adapters", type=int, default=16,
                   help="random adapters L (default: 16)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--lora-init-scale", type=float, default=0.2,
                   help="size of each random adapter's delta relative to its base layer's "
                        "output (default: 0.2: large enough for the logits check to see a "
                        "wrong kernel; speed does not depend on it)")
    p.add_argument("--workload", default="uniform", choices=WORKLOADS,
                   help="request-to-adapter assignment (default: uniform)")
    p.add_argument("--workloads", nargs="+", default=None, choices=WORKLOADS, metavar="W",
                   help="time every mode under each workload (replaces --workload); prints "
                        "tokens/s per (mode, workload) and each workload / identical per mode, "
                        "and draws grouped bars (e.g. distinct identical)")
    p.add_argument("--no-lora-share", type=float, default=0.0,
                   help="share of requests without adapter (default: 0)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: 0.7)")
    p.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.9,
                   help="nucleus mass (default: 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, adapters, sampling")
    p.add_argument("--warmup-tokens", type=int, default=8,
                   help="new tokens of the untimed warm-up generation (default: 8)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU, fp32 on the CPU")
    p.add_argument("--no-validate", action="store_true",
                   help="skip the logits check against PEFT (and time every mode)")
    p.add_argument("--targets", action="store_true",
                   help="print the issue's targets with PASS/FAIL at the end (best LoRA mode "
                        f"tokens/s >= {TARGETS['best_tokens_per_s'][1]:.0f}, / none >= "
                        f"{TARGETS['best_vs_none'][1]}, / peft >= "
                        f"{TARGETS['best_vs_peft'][1]:.0f}, "
                        f"distinct / identical >= {TARGETS['distinct_vs_identical'][1]})")
    p.add_argument("--quick", action="store_true",
                   help="tiny model, batch 8, 8 tokens, 4 adapters of rank 4: seconds, CPU ok")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "plots"), help="where JSON/PNG go")
    p.add_argument("--name", default=None, help="file stem (default: e2e_<config>)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--plot-only", default=None, metavar="JSON",
                   help="redraw the plot(s), table and targets from a JSON written earlier "
                        "(no GPU)")
    return p


# ---------------------------------------------------------------------------------------
# Environment and output
# ---------------------------------------------------------------------------------------
def decode_step_bytes(cfg: dict, batch: int, context: float, num_adapters: int, rank: int,
                      elem: int = 2, tied: bool = False) -> dict:
    """Bytes one decode step must read, by part, for a Llama config (MODEL_CONFIGS keys):
    every layer's weights and the LM head, the KV cache of `context` filled positions per
    request, and the distinct adapters' LoRA A and B on q, k, v, o, gate, up, down (each
    read once). Activations (batch x hidden per op) are left out: a few MB per step."""
    h, i, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]   # (h_in, h_out)
    weights = n * sum(a * b for a, b in shapes) + (0 if tied else cfg["vocab_size"] * h)
    lora = num_adapters * n * rank * sum(a + b for a, b in shapes)
    kv_cache = batch * context * n * 2 * kv
    return {"weights": weights * elem, "kv_cache": int(kv_cache * elem), "lora": lora * elem}


def token_ceiling(cfg: dict, batch: int, prompt: int, new_tokens: int, num_adapters: int,
                  rank: int, copy_gbs: float) -> dict:
    """tokens/s if a decode step took exactly its bytes / copy bandwidth: the average step
    (context prompt + (new_tokens - 1) / 2 positions), with and without LoRA."""
    b = decode_step_bytes(cfg, batch, prompt + (new_tokens - 1) / 2, num_adapters, rank)
    base = b["weights"] + b["kv_cache"]
    ms = {k: v / (copy_gbs * 1e9) * 1e3 for k, v in (("none", base), ("lora", base + b["lora"]))}
    return dict(bytes=b, copy_gbs=copy_gbs, ms_per_step=ms,
                tokens_per_s={k: batch / (v * 1e-3) for k, v in ms.items()})


def print_estimate(args) -> None:
    """--estimate: the bytes-bound tokens/s of the configured run (no model is built)."""
    from multilora_model import MODEL_CONFIGS
    if args.model_config not in MODEL_CONFIGS:
        raise SystemExit(f"--estimate needs --model-config, one of {sorted(MODEL_CONFIGS)}")
    copy = args.copy_gbs
    if copy is None:
        import torch
        if not torch.cuda.is_available():
            raise SystemExit("--estimate: give --copy-gbs (no GPU here to measure it)")
        import bench_utils as bu
        copy = bu.copy_bandwidth_gbs("cuda")
    est = token_ceiling(MODEL_CONFIGS[args.model_config], args.batch_size, args.prompt_len,
                        args.max_new_tokens, args.num_adapters, args.rank, copy)
    gb = {k: v / 1e9 for k, v in est["bytes"].items()}
    print(f"{args.model_config} batch {args.batch_size}, {args.prompt_len}-token prompts, "
          f"{args.max_new_tokens} new tokens, {args.num_adapters} adapters r={args.rank}, "
          f"copy {copy:.0f} GB/s; bytes per average decode step: weights {gb['weights']:.2f} "
          f"GB, KV cache {gb['kv_cache']:.2f} GB, LoRA {gb['lora']:.2f} GB")
    for k in ("none", "lora"):
        print(f"  {k:5s} {est['ms_per_step'][k]:.2f} ms/step -> at most "
              f"{est['tokens_per_s'][k]:,.0f} tokens/s")


def environment(device) -> dict:
    import torch
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__,
           "device": str(device), "python": sys.version.split()[0]}
    for mod in ("triton", "peft"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            env[mod] = None
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    env["cuda"] = torch.version.cuda
    import bench_utils
    commit = bench_utils.git_commit()        # $MULTILORA_COMMIT on a copied tree
    env["git_commit"] = commit.removesuffix("-dirty")
    env["git_dirty"] = commit.endswith("-dirty")
    env["settings"] = bench_utils.knob_settings()     # e.g. MULTILORA_STACKED_EXPAND
    return env


def views(data: dict) -> list[dict]:
    """One single-point view per point, in the layout of a one-point run (config with
    batch_size, workload, prompt_tokens, adapter_of_request; validation; results)."""
    if "points" not in data:
        return [data]
    keys = ("batch_size", "workload", "prompt_tokens", "adapter_of_request")
    return [dict(env=data["env"], config=dict(data["config"], **{k: p[k] for k in keys}),
                 validation=p["validation"], results=p["results"]) for p in data["points"]]


def timed(view: dict) -> list[dict]:
    return [r for r in view["results"] if r.get("tokens_per_s")]


def print_table(data: dict) -> None:
    rows = timed(data)
    c = data["config"]
    dec = "greedy" if c["temperature"] <= 0 else f"T={c['temperature']} top-p={c['top_p']}"
    print(f"\n{c['model']} | {c['dtype']} | batch {c['batch_size']} | {c['max_new_tokens']} new "
          f"tokens | L={c['num_adapters']} r={c['rank']} {c['workload']} | "
          f"{dec} | "
          f"{data['env'].get('gpu') or data['env']['device']}")
    slowest = max((r["time_s"] for r in rows), default=None)
    nones = {r.get("engine"): r for r in rows if r["mode"] == "none"}
    w = max([12] + [len(r.get("label", r["mode"])) for r in data["results"]])
    head = (f"{'Mode':<{w}} {'Throughput tok/s':>16} {'Time s':>8} {'Total Tokens':>12} "
            f"{'ms/step':>8} {'prefill ms':>10} {'vs slowest':>10} {'vs none':>8} "
            f"{'logits err':>10}")
    print(head)
    print("-" * len(head))
    v = data.get("validation") or {}
    for r in data["results"]:
        label = r.get("label", r["mode"])
        if not r.get("tokens_per_s"):
            print(f"{label:<{w}} not timed: {r.get('status', '')}")
            continue
        none = nones.get(r.get("engine")) or next(iter(nones.values()), None)
        over = f"{(r['time_s'] / none['time_s'] - 1) * 100:+.0f}%" if none else "-"
        err = f"{r['logits_error']:.1e}" if r.get("logits_error") is not None else "-"
        print(f"{label:<{w}} {r['tokens_per_s']:>16.1f} {r['time_s']:>8.2f} "
              f"{r['total_tokens']:>12d} {r['ms_per_step']:>8.2f} {r['prefill_s'] * 1e3:>10.1f} "
              f"{slowest / r['time_s']:>9.2f}x {over:>8} {err:>10}")
    if v.get("gate"):
        print(f"logits err: last-token prefill logits vs PEFT's mixed-batch forward; timed only "
              f"under the gate {v['gate']:.1e} (tolerance {v['tolerance']:.1e}, PEFT's own "
              f"bf16-vs-fp32 noise {v.get('noise') or 0:.1e}; the LoRA moves them by "
              f"{v['lora_effect']:.1e})")


def print_sweep(data: dict) -> None:
    """tokens/s (and ms/step) per mode x batch size, one block per workload."""
    c = data["config"]
    for wl in c["workloads"]:
        vs = [v for v in views(data) if v["config"]["workload"] == wl]
        labels = list(dict.fromkeys(r["label"] for v in vs for r in v["results"]))
        print(f"\ntokens/s (ms/step) vs batch | {c['model']} | {c['dtype']} | "
              f"{c['max_new_tokens']} new tokens | L={c['num_adapters']} r={c['rank']} {wl} | "
              f"{data['env'].get('gpu') or data['env']['device']}")
        w = max([12] + [len(x) for x in labels])
        print(f"{'batch':>5} " + "  ".join(f"{x:>{w + 8}}" for x in labels))
        for v in vs:
            by = {r["label"]: r for r in v["results"]}
            cells = []
            for x in labels:
                r = by.get(x)
                cells.append(f"{r['tokens_per_s']:>{w}.0f} ({r['ms_per_step']:5.1f})"
                             if r and r.get("tokens_per_s") else f"{'-':>{w + 8}}")
            print(f"{v['config']['batch_size']:>5} " + "  ".join(cells))


def flatness(data: dict) -> list[dict]:
    """Per (batch size, mode row): tokens/s under each workload and each / identical (or /
    the first workload when identical was not run). Empty for a one-workload run."""
    wls = data["config"].get("workloads") or [data["config"]["workload"]]
    if len(wls) < 2:
        return []
    ref = "identical" if "identical" in wls else wls[0]
    out = []
    for b in sorted({v["config"]["batch_size"] for v in views(data)}):
        by = {(v["config"]["workload"], r["label"]): r for v in views(data)
              if v["config"]["batch_size"] == b for r in timed(v)}
        for label in dict.fromkeys(lab for _, lab in by):
            tps = {w: by[(w, label)]["tokens_per_s"] for w in wls if (w, label) in by}
            row = next(by[(w, label)] for w in wls if (w, label) in by)
            out.append(dict(batch_size=b, label=label, mode=row["mode"], engine=row["engine"],
                            tokens_per_s=tps, reference=ref,
                            ratio={w: tps[w] / tps[ref] for w in tps if ref in tps}))
    return out


def print_flatness(data: dict) -> None:
    rows = data.get("flatness") or flatness(data)
    if not rows:
        return
    wls = data["config"]["workloads"]
    ref = rows[0]["reference"]
    others = [w for w in wls if w != ref]
    w = max([12] + [len(r["label"]) for r in rows])
    print(f"\ntokens/s per workload (L={data['config']['num_adapters']}) and each / {ref}")
    print(f"{'batch':>5} {'Mode':<{w}} " + " ".join(f"{x:>10}" for x in wls)
          + " " + " ".join(f"{x[:4] + '/' + ref[:4]:>10}" for x in others))
    for r in rows:
        tps = " ".join(f"{r['tokens_per_s'][x]:>10.1f}" if x in r["tokens_per_s"] else f"{'-':>10}"
                       for x in wls)
        rat = " ".join(f"{r['ratio'][x]:>10.3f}" if x in r["ratio"] else f"{'-':>10}"
                       for x in others)
        print(f"{r['batch_size']:>5} {r['label']:<{w}} {tps} {rat}")


def targets(data: dict) -> list[dict]:
    """The issue's targets (TARGETS) from a JSON's data: 1-3 per point (the fastest timed
    LoRA mode of any engine vs `none` of its engine and vs peft), and distinct / identical
    of the mode fastest under `distinct` at each batch size. Missing inputs: value None."""
    out = []
    for v in views(data):
        c, rows = v["config"], timed(v)
        where = f"batch {c['batch_size']} {c['workload']}"
        lora = [r for r in rows if r["mode"] not in ("none", "peft")]
        best = max(lora, key=lambda r: r["tokens_per_s"], default=None)
        none = next((r for r in rows if r["mode"] == "none"
                     and best is not None and r["engine"] == best["engine"]), None)
        peft = next((r for r in rows if r["mode"] == "peft"), None)
        vals = {"best_tokens_per_s": best and best["tokens_per_s"],
                "best_vs_none": best and none and best["tokens_per_s"] / none["tokens_per_s"],
                "best_vs_peft": best and peft and best["tokens_per_s"] / peft["tokens_per_s"]}
        for key, val in vals.items():
            out.append(dict(target=key, where=where, mode=best and best["label"], value=val))
    for b in sorted({r["batch_size"] for r in flatness(data)}):
        rows = [r for r in flatness(data) if r["batch_size"] == b and r["mode"] not in
                ("none", "peft") and "distinct" in r["ratio"]]
        best = max(rows, key=lambda r: r["tokens_per_s"]["distinct"], default=None)
        out.append(dict(target="distinct_vs_identical",
                        where=f"batch {b}, L={data['config']['num_adapters']}",
                        mode=best and best["label"], value=best and best["ratio"]["distinct"]))
    for t in out:
        t["threshold"] = TARGETS[t["target"]][1]
        t["pass"] = t["value"] is not None and t["value"] >= t["threshold"]
    return out


def print_targets(data: dict) -> None:
    print("\ntargets (each >= its threshold):")
    for t in targets(data):
        what = TARGETS[t["target"]][0]
        val = "n/a (not timed)" if t["value"] is None else \
            f"{t['value']:.0f}" if t["value"] >= 100 else f"{t['value']:.3g}"
        verdict = "PASS" if t["pass"] else "FAIL"
        print(f"  {verdict}  {what:<42} {t['where']:<24} {t['mode'] or '-':<14} "
              f"{val:>16} >= {t['threshold']:g}")


def _title_tail(data: dict) -> str:
    c = data["config"]
    prompt = c.get("prompt_tokens") or [n for pt in data.get("points", [])
                                        for n in pt["prompt_tokens"]]
    return (f"{data['env'].get('gpu') or 'CPU'}, {c['model']}, {c['dtype']}, "
            f"prompt {max(prompt)} + {c['max_new_tokens']} new tok, L={c['num_adapters']}, "
            f"r={c['rank']}")


def plot(data: dict, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in data["results"] if r.get("tokens_per_s")]
    c = data["config"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(rows) + 2), 4.2))
    names = [r.get("label", r["mode"]).replace(" (", "\n(") for r in rows]
    vals = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(names, vals, color=[MODE_COLORS.get(r["mode"], "#333333") for r in rows],
                  hatch=None)
    for b, r, v in zip(bars, rows, vals):
        if r.get("engine") == "hf" and len(c.get("engines", [])) > 1:
            b.set_hatch("//")
        ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    for r in rows:
        if r["mode"] == "none":
            ax.axhline(r["tokens_per_s"], color=MODE_COLORS["none"],
                       ls="--" if r.get("engine") != "hf" else ":", lw=1,
                       label=f"{r.get('label', 'none')}: no-LoRA floor")
    if any(r["mode"] == "none" for r in rows):
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(f"Multi-LoRA generation throughput per mode\n{data['env'].get('gpu') or 'CPU'}, "
                 f"{c['model']}, {c['dtype']}, batch {c['batch_size']}, {c['max_new_tokens']} tok, "
                 f"L={c['num_adapters']}, r={c['rank']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_sweep(data: dict, png: str) -> None:
    """tokens/s vs batch size (log2 x, log y), one colour and marker per mode; `none` as a
    dashed reference series; one line style per workload when there are several."""
    from bench_utils import pyplot
    plt = pyplot()
    c = data["config"]
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    several = len(c["workloads"]) > 1
    for wl in c["workloads"]:
        vs = [v for v in views(data) if v["config"]["workload"] == wl]
        labels = dict.fromkeys(r["label"] for v in vs for r in timed(v))
        for label in labels:
            pts = [(v["config"]["batch_size"], r) for v in vs for r in timed(v)
                   if r["label"] == label]
            mode = pts[0][1]["mode"]
            colour, marker = MODE_STYLE.get(mode, ("black", "."))
            ls = "--" if mode == "none" else (WORKLOAD_LINE[wl] if several else "-")
            name = f"{label}: no-LoRA reference" if mode == "none" else label
            ax.plot([b for b, _ in pts], [r["tokens_per_s"] for _, r in pts], color=colour,
                    marker=marker, ls=ls, lw=1.1 if mode == "none" else 1.5, ms=5,
                    label=f"{name} ({wl})" if several else name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    bs = c["batch_sizes"]
    ax.set_xticks(bs, [str(b) for b in bs])
    ax.set_xlabel("batch size (requests, log2)")
    ax.set_ylabel("throughput (tokens/s, log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    wl = "" if several else f", {c['workloads'][0]}"
    ax.set_title(f"How does generation throughput scale with batch size, per mode?\n"
                 f"{_title_tail(data)}{wl}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def plot_workloads(data: dict, png: str) -> None:
    """Grouped bars: tokens/s per mode row (colour) and workload (hatch), at the largest
    batch; each bar other than the reference workload's is labelled with its ratio to it."""
    from bench_utils import pyplot
    plt = pyplot()
    c = data["config"]
    rows = data.get("flatness") or flatness(data)
    b = max(r["batch_size"] for r in rows)
    rows = [r for r in rows if r["batch_size"] == b]
    wls = c["workloads"]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(rows) * len(wls) / 2 + 2), 4.2))
    width = 0.8 / len(wls)
    for i, r in enumerate(rows):
        colour = MODE_COLORS.get(r["mode"], "#333333")
        for j, wl in enumerate(wls):
            v = r["tokens_per_s"].get(wl)
            if v is None:
                continue
            x = i + (j - (len(wls) - 1) / 2) * width
            ax.bar(x, v, width, color=colour, hatch=WORKLOAD_HATCH[wl], edgecolor="white",
                   label=wl if i == 0 else None)
            txt = f"{v:.0f}" if wl == r["reference"] or wl not in r["ratio"] \
                else f"{v:.0f}\n{r['ratio'][wl]:.2f}x"
            ax.text(x, v, txt, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rows)), [r["label"].replace(" (", "\n(") for r in rows])
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_ylim(0, 1.18 * max(v for r in rows for v in r["tokens_per_s"].values()))
    leg = ax.legend(fontsize=8, title=f"workload (ratio to {rows[0]['reference']})",
                    title_fontsize=8, loc="upper right")
    for h in leg.legend_handles:                    # the hatch alone names the workload
        h.set_facecolor("white")
        h.set_edgecolor("#444444")
    ax.set_title(f"Does throughput stay flat when every request has its own adapter?\n"
                 f"{_title_tail(data)}, batch {b}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def draw(data: dict, stem: str) -> list[str]:
    """Every figure of a run, from its JSON data; returns the PNG paths."""
    kind = data.get("kind", "single")
    pngs = []
    if kind == "single":
        plot(data, stem + ".png")
        return [stem + ".png"]
    if kind == "sweep":
        plot_sweep(data, stem + ".png")
        pngs.append(stem + ".png")
    if flatness(data):
        png = stem + ("_workloads" if kind == "sweep" else "") + ".png"
        plot_workloads(data, png)
        pngs.append(png)
    return pngs


def report(data: dict, show_targets: bool) -> None:
    kind = data.get("kind", "single")
    if kind == "sweep":
        print_sweep(data)
    else:
        for v in views(data):
            print_table(v)
    print_flatness(data)
    if show_targets:
        print_targets(data)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------
def make_prompts(args, tok, model, B: int, g_seed: int) -> list[list[int]]:
    """Token ids of B requests: the built-in prompts through the chat template for a real
    model (unequal lengths), or random ids of --prompt-len for a random-weight model. A
    smaller batch of a sweep takes the first requests of the largest batch's set."""
    import torch
    import multilora_model as mm

    if tok is not None:
        texts = [mm.DEFAULT_PROMPTS[i % len(mm.DEFAULT_PROMPTS)] for i in range(B)]
        return mm.encode_prompts(tok, texts)
    g = torch.Generator().manual_seed(g_seed)
    V = model.config.vocab_size
    return torch.randint(3, V, (B, args.prompt_len), generator=g).tolist()


def time_peft(pm, ids, mask, names: list[str], args, pad_id: int, device) -> dict:
    """PEFT's mixed-batch generate (HF generate + adapter_names=), same decoding parameters,
    exactly max_new_tokens per request; prefill = one forward of the prompts."""
    import torch
    import multilora_model as mm

    kw = dict(attention_mask=mask, adapter_names=names, pad_token_id=pad_id,
              do_sample=args.temperature > 0, top_k=0)
    if args.temperature > 0:
        kw.update(temperature=args.temperature, top_p=args.top_p)
    n_warm = min(args.warmup_tokens, args.max_new_tokens)
    with torch.inference_mode():
        torch.manual_seed(args.seed)
        pm.generate(ids, max_new_tokens=n_warm, min_new_tokens=n_warm, **kw)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        mm._sync(device)
        t0 = time.perf_counter()
        pm(input_ids=ids, attention_mask=mask, adapter_names=names, logits_to_keep=1)
        mm._sync(device)
        prefill = time.perf_counter() - t0
        torch.manual_seed(args.seed)
        mm._sync(device)
        t0 = time.perf_counter()
        out = pm.generate(ids, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.max_new_tokens, **kw)
        mm._sync(device)
        total = time.perf_counter() - t0
    new = out.shape[1] - ids.shape[1]
    if new != args.max_new_tokens:
        raise RuntimeError(f"peft generated {new} tokens, expected {args.max_new_tokens}")
    r = dict(time_s=total, prefill_s=prefill, decode_s=total - prefill,
             total_tokens=int(out.shape[0] * new), steps=new - 1)
    if device.type == "cuda":
        r["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return r


def time_fast(eng, mode: str, input_ids, adapter_idx, args, pad_id: int) -> dict:
    """multilora_engine: warm-up generation (graphs for the warm-up lengths), then the
    timed one; graphs it still needs are captured before its timed region (capture_s).
    Graphs of the mode are kept across points (set_mode drops them), so a second workload
    at the same batch reuses them with its assignment written into the static buffers."""
    if eng.mode_name != mode:
        eng.set_mode(mode)
    kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed, ignore_eos=True,
              pad_token_id=pad_id)
    eng.generate(input_ids, adapter_idx, min(args.warmup_tokens, args.max_new_tokens), **kw)
    _, st = eng.generate(input_ids, adapter_idx, args.max_new_tokens,
                         progress=not args.no_progress, **kw)
    if st["total_tokens"] != len(input_ids) * args.max_new_tokens:
        raise RuntimeError(f"{mode}: generated {st['total_tokens']} tokens, expected "
                           f"{len(input_ids) * args.max_new_tokens}")
    if args.profile:
        profile_fast(eng, mode, input_ids, adapter_idx, args.profile, kw)
    keep = ("time_s", "prefill_s", "decode_s", "total_tokens", "steps", "capture_s", "graph",
            "peak_memory_gb", "batch_bucket")
    return dict({k: st[k] for k in keep if k in st}, lora_overlap=eng.overlap or "off")


# --profile: kernel names -> what they do in a decode step (first match wins; the rest is
# "other"). Names of cuBLAS / cuDNN / ATen kernels on the H200 image (torch 2.11, CUDA 13)
# and of engine_kernels' Triton kernels (_decode_attn, _add_rms_norm, _rope_qkv, _silu_mul).
PROFILE_GROUPS = (
    ("base GEMMs (cuBLAS, split-K reduce)", r"^nvjet|gemm|splitKreduce|cutlass"),
    ("attention", r"sdpa|flash|attention|fmha|decode_attn"),
    ("LoRA expand", r"expand"),
    ("LoRA shrink", r"shrink"),
    ("LoRA other (sgmv, gathers)", r"sgmv|bgmv|lora"),
    ("RMSNorm", r"layer_norm|rms_norm"),
    ("K/V cache writes (index_copy)", r"index_copy"),
    ("top-p sampler", r"top_p|sample"),
    ("residual adds", r"CUDAFunctor_add<c10::BFloat16>"),
    ("RoPE (+ K/V cache writes when fused), SiLU * up, other elementwise",
     r"elementwise_kernel|flip_kernel|addcmul|_rope_qkv|_silu_mul"),
)


def group_profile(rows) -> list:
    """rows (us per step, calls per step, kernel name) -> [(group, us, calls)] in
    PROFILE_GROUPS order, then "other"."""
    import re
    sums = {g: [0.0, 0.0] for g, _ in PROFILE_GROUPS + (("other", ""),)}
    for us, n, k in rows:
        g = next((g for g, rx in PROFILE_GROUPS if re.search(rx, k)), "other")
        sums[g][0] += us
        sums[g][1] += n
    return [(g, us, n) for g, (us, n) in sums.items() if us > 0]


def print_profile(title: str, rows) -> None:
    """The --profile report: the top kernels, then the per-group sums."""
    total = sum(r[0] for r in rows)
    print(f"\nprofile {title}, {total / 1e3:.3f} ms of kernel time")
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  kernel")
    for us, n, k in rows[:30]:
        print(f"{us:9.1f} {n:6.0f} {us / total:6.1%}  {k[:100]}")
    print(f"{'us/step':>9} {'calls':>6} {'share':>6}  group (all kernels)")
    for g, us, n in group_profile(rows):
        print(f"{us:9.1f} {n:6.0f} {us / total:6.1%}  {g}")


def read_profile_log(path: str) -> list:
    """(title, rows) of every --profile report in a saved log: its kernel table lines (us
    per step, calls, share, name), up to the group table that follows them; rows past the
    top 30 were not printed, so group sums from a log cover the top 30."""
    import re
    out = []
    for line in open(path):
        if line.startswith("profile "):
            out.append((line.split(",")[0][len("profile "):].strip(), []))
            in_kernels = True
        elif "group (all kernels)" in line:
            in_kernels = False
        elif out and in_kernels:
            m = re.match(r"\s*([\d.]+)\s+([\d.]+)\s+[\d.]+%\s+(.+)$", line)
            if m:
                out[-1][1].append((float(m.group(1)), float(m.group(2)), m.group(3).strip()))
    return out


def profile_fast(eng, mode: str, input_ids, adapter_idx, steps: int, kw: dict) -> None:
    """--profile N: where a decode step's GPU time goes, per kernel. Two eager runs (no
    graph: the profiler then names every kernel) under torch.profiler, prefill + N decode
    steps and prefill alone; their difference per kernel name, divided by N, is one decode
    step (CPU time on a CPU). Eager, so launch gaps are larger than in the timed graph
    replay; only the kernel times carry over."""
    from torch.profiler import ProfilerActivity, profile
    cuda = eng.device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def per_kernel(new_tokens: int) -> dict:
        with profile(activities=acts) as prof:
            eng.generate(input_ids, adapter_idx, new_tokens, use_graph=False, **kw)
        out = {}
        for e in prof.key_averages():
            us = (e.self_device_time_total if cuda else e.self_cpu_time_total)
            kernel = str(getattr(e, "device_type", "")).endswith("CUDA")   # not the aten op
            if us > 0 and (not cuda or kernel):
                out[e.key] = (us, e.count)
        return out

    eng.generate(input_ids, adapter_idx, 2, use_graph=False, **kw)            # warm-up
    both, pre = per_kernel(steps + 1), per_kernel(1)     # 1 new token = the prefill's
    rows = sorted(((both[k][0] - pre.get(k, (0, 0))[0]) / steps,
                   (both[k][1] - pre.get(k, (0, 0))[1]) / steps, k) for k in both)[::-1]
    print_profile(f"{mode}: one decode step, batch {len(input_ids)} (eager, {steps} steps "
                  f"minus the prefill)", rows)


def time_hf(model, ctx, mode: str, input_ids, adapter_idx, args, pad_id: int, device) -> dict:
    import torch
    import multilora_model as mm

    ctx.set_mode(mode)
    kw = dict(pad_id=pad_id, ignore_eos=True, temperature=args.temperature, top_p=args.top_p,
              seed=args.seed)
    mm.generate(model, ctx, input_ids, adapter_idx, min(args.warmup_tokens, args.max_new_tokens),
                **kw)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = mm.generate(model, ctx, input_ids, adapter_idx, args.max_new_tokens,
                      progress=not args.no_progress, **kw)
    n = sum(len(t) for t in out.tokens)
    if n != len(input_ids) * args.max_new_tokens:
        raise RuntimeError(f"{mode}: generated {n} tokens, expected "
                           f"{len(input_ids) * args.max_new_tokens}")
    r = dict(time_s=out.prefill_s + out.decode_s, prefill_s=out.prefill_s,
             decode_s=out.decode_s, total_tokens=n, steps=out.steps)
    if device.type == "cuda":
        r["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    return r


def run(args) -> dict:
    import torch
    from torch import Tensor
    import multilora_model as mm
    from multilora_impl import TOLERANCE, logits_bound, make_workload, relative_error

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    dtype = mm.resolve_dtype(args.dtype, device)
    if "bgmv_cuda" in args.modes and device.type != "cuda":
        raise SystemExit("bgmv_cuda needs a CUDA GPU (drop it from --modes on the CPU)")
    big = args.model_config in ("llama3-8b", "llama2-7b")
    if args.model is None and device.type == "cpu" and big:
        raise SystemExit(f"--model-config {args.model_config} on the CPU would take hours: use a "
                         f"GPU, or --quick / --model-config tiny")
    batch_sizes = sorted(set(args.batch_sizes)) if args.batch_sizes else [args.batch_size]
    workloads = list(dict.fromkeys(args.workloads)) if args.workloads else [args.workload]
    if min(batch_sizes) < 1:
        raise SystemExit(f"--batch-sizes: expected sizes >= 1, got {batch_sizes}")
    kind = "sweep" if args.batch_sizes else "workloads" if args.workloads else "single"

    tok = None
    if args.model is not None:
        model, tok = mm.load_model(None if args.model == "default" else args.model, device, dtype)
        label = "smollm2-135m-gguf" if args.model == "default" else \
            os.path.basename(os.path.normpath(args.model))
    else:
        model = mm.build_random_model(args.model_config, device, dtype, args.num_layers, args.seed)
        label = args.model_config + (f"-{args.num_layers}l" if args.num_layers else "")
    pad_id = (tok.pad_token_id if tok is not None and tok.pad_token_id is not None
              else (tok.eos_token_id if tok is not None else 0))
    adapters = mm.make_random_adapters(model, args.num_adapters, args.rank, seed=args.seed,
                                       init_scale=args.lora_init_scale)
    all_ids = make_prompts(args, tok, model, max(batch_sizes), args.seed)
    # One point per (workload, batch size): the first B prompts, the workload's assignment.
    points = []
    for wl, B in itertools.product(workloads, batch_sizes):
        idx = make_workload(wl, B, args.num_adapters, args.no_lora_share, args.seed).tolist()
        points.append(dict(batch_size=B, workload=wl, input_ids=all_ids[:B], adapter_of_request=idx,
                           names=[adapters[i].name if i >= 0 else "__base__" for i in idx],
                           results={}, validation={"tolerance": TOLERANCE[dtype]}, ref=None))
    config = dict(model=model.name_or_path_label, label=label,
                  dtype=str(dtype).replace("torch.", ""),
                  batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                  prompt_tokens=[len(x) for x in points[0]["input_ids"]],
                  num_adapters=args.num_adapters,
                  rank=args.rank, lora_init_scale=args.lora_init_scale,
                  workload=args.workload, no_lora_share=args.no_lora_share,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  warmup_tokens=args.warmup_tokens, modes=list(args.modes),
                  engines=list(args.engine), lora_overlap=args.lora_overlap,
                  fused_elementwise=args.fused_elementwise, sampler=args.sampler,
                  attention=args.attention,
                  adapter_of_request=points[0]["adapter_of_request"],
                  num_layers=model.config.num_hidden_layers,
                  hidden_size=model.config.hidden_size)
    if kind != "single":            # per point instead
        for k in ("batch_size", "workload", "prompt_tokens", "adapter_of_request"):
            del config[k]
        config.update(batch_sizes=batch_sizes, workloads=workloads)
    plens = [len(x) for x in all_ids]
    print(f"config: {config['model']} {config['dtype']} on {device} | batch "
          f"{' '.join(map(str, batch_sizes))} x {args.max_new_tokens} new tokens | prompts "
          f"{min(plens)}-{max(plens)} tokens | L={args.num_adapters} r={args.rank} "
          f"{' '.join(workloads)} | T={args.temperature} top-p={args.top_p} seed={args.seed}")

    validate = not args.no_validate
    modes = [m for m in args.modes if m != "peft"]
    # Validation gate, per point: multilora_impl.logits_bound against PEFT's mixed-batch
    # forward, noise = PEFT's own bf16 logits vs its fp32 logits (same weights, upcast).
    # A wrong kernel is off by the LoRA's whole effect (lora_effect), far above the gate.
    # PEFT first: its in-memory model gives the reference logits, then is unloaded.
    if "peft" in args.modes or (validate and modes):
        pm = mm.to_peft_model(model, adapters)
        if validate and modes:
            def last(m, p, names_):
                return mm.forward_logits(m, None, p["input_ids"], p["adapter_of_request"], pad_id,
                                         last_only=True, adapter_names=names_)[0][:, -1]  # [B, V]
            pm32 = None
            if dtype != torch.float32:
                try:
                    pm32 = copy.deepcopy(pm).float()
                except torch.OutOfMemoryError:
                    print("validation: no memory for PEFT's fp32 copy; gate = tolerance")
            for p in points:
                val = p["validation"]
                p["ref"] = last(pm, p, p["names"])
                base = last(pm, p, ["__base__"] * len(p["names"]))
                val["lora_effect"] = relative_error(p["ref"], base)
                val["noise"] = 0.0 if dtype == torch.float32 else \
                    None if pm32 is None else relative_error(p["ref"], last(pm32, p, p["names"]))
                val["gate"] = logits_bound(dtype, val["noise"] or 0.0)
                print(f"validation b{p['batch_size']} {p['workload']}: tolerance "
                      f"{val['tolerance']:.1e}, PEFT bf16-vs-fp32 noise "
                      f"{val['noise'] if val['noise'] is None else format(val['noise'], '.1e')}, "
                      f"gate {val['gate']:.1e}, LoRA effect {val['lora_effect']:.1e}")
            del pm32
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "peft" in args.modes:
            for p in points:
                print(f"timing peft b{p['batch_size']} {p['workload']} ...", flush=True)
                ids, mask, _ = mm.left_pad(p["input_ids"], pad_id, device)
                r = time_peft(pm, ids, mask, p["names"], args, pad_id, device)
                r["logits_error"] = None                         # it is the reference
                p["results"][("peft", "peft")] = r
        model = pm.unload()
        del pm

    def measure(p: dict, mode: str, engine: str, logits_fn, time_fn) -> None:
        """Check the mode's last-token prefill logits against PEFT's, then time it; a
        failing or broken mode gets a status instead of numbers (the others still run)."""
        r: dict = {}
        p["results"][(mode, engine)] = r
        where = f"{mode} ({engine}) b{p['batch_size']} {p['workload']}"
        try:
            if p["ref"] is not None and mode != "none":
                r["logits_error"] = relative_error(logits_fn(), p["ref"])
                gate = p["validation"]["gate"]
                if not r["logits_error"] <= gate:
                    r["status"] = f"logits error {r['logits_error']:.2e} > gate {gate:.1e}"
                    print(f"{where}: {r['status']}, not timed")
                    return
            print(f"timing {where} ...", flush=True)
            r.update(time_fn())
        except Exception as e:
            r["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
            print(f"{where}: {r['status']}")

    if "fast" in args.engine and modes:
        from multilora_engine import MultiLoraEngine
        # Built once for the largest batch; every batch size gets its own graph bucket.
        eng = MultiLoraEngine(model, mm.stack_all(model, adapters), "none",
                              max_batch=max(batch_sizes),
                              max_seq=max(plens) + args.max_new_tokens,
                              lora_overlap=args.lora_overlap,
                              fused_elementwise=FUSED_OPTION[args.fused_elementwise],
                              sampler=args.sampler, attention=args.attention)
        # what "auto" became on this device
        config["engine_options"] = dict(fused_elementwise=eng.fused_elementwise,
                                        sampler=eng.sampler, attention=eng.attention)
        kw = dict(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  ignore_eos=True, pad_token_id=pad_id)

        def fast_logits(mode: str, p: dict) -> Tensor:
            if eng.mode_name != mode:
                eng.set_mode(mode)
            _, st = eng.generate(p["input_ids"], p["adapter_of_request"], 1, keep_logits=True,
                                 **kw)
            return st["last_logits"]                                          # [B, V]

        for mode in modes:                # mode outer: set_mode (graph drop) once per mode
            for p in points:
                measure(p, mode, "fast", lambda: fast_logits(mode, p),
                        lambda: time_fast(eng, mode, p["input_ids"], p["adapter_of_request"],
                                          args, pad_id))
        del eng
        if device.type == "cuda":
            torch.cuda.empty_cache()
    hf_modes = [m for m in modes if m != "stacked"]     # stacked needs the fast engine
    if "hf" in args.engine and hf_modes:
        ctx = mm.inject_multilora(model, adapters, "none")

        def hf_logits(mode: str, p: dict) -> Tensor:
            ctx.set_mode(mode)
            return mm.forward_logits(model, ctx, p["input_ids"], p["adapter_of_request"], pad_id,
                                     last_only=True)[0][:, -1]

        for mode in hf_modes:
            for p in points:
                measure(p, mode, "hf", lambda: hf_logits(mode, p),
                        lambda: time_hf(model, ctx, mode, p["input_ids"], p["adapter_of_request"],
                                        args, pad_id, device))
        mm.remove_multilora(model)

    order = lambda k: (k[0] == "peft", args.engine.index(k[1]) if k[1] in args.engine else 0,
                       args.modes.index(k[0]))                               # noqa: E731
    for p in points:
        rows = []
        for (mode, engine), res in sorted(p["results"].items(), key=lambda kv: order(kv[0])):
            label = mode if len(args.engine) == 1 or mode == "peft" else f"{mode} ({engine})"
            r = dict(mode=mode, engine=engine, label=label, **res)
            r.setdefault("logits_error", None)
            if "time_s" in r:
                r["tokens_per_s"] = r["total_tokens"] / r["time_s"]
                r["ms_per_step"] = r["decode_s"] / max(r["steps"], 1) * 1e3
                r["decode_tokens_per_s"] = (p["batch_size"] * r["steps"] / r["decode_s"]
                                            if r["steps"] else None)
                r.setdefault("status", "ok")
            rows.append(r)
        p["results"] = rows
    env = environment(device)
    if kind == "single":
        return dict(env=env, config=config, validation=points[0]["validation"],
                    results=points[0]["results"])
    keep = ("batch_size", "workload", "validation", "results", "adapter_of_request")
    pts = [dict({k: p[k] for k in keep}, prompt_tokens=[len(x) for x in p["input_ids"]])
           for p in points]
    data = dict(kind=kind, env=env, config=config, points=pts)
    data["flatness"] = flatness(data)
    return data


def default_stem(data: dict, engines: list[str]) -> str:
    c = data["config"]
    tail = ("" if engines == ["fast"] else "_" + "-".join(engines)) \
        + ("" if c.get("lora_overlap", "off") == "off" else f"_overlap-{c['lora_overlap']}") \
        + {"on": "_fused", "off": "_unfused"}.get(c.get("fused_elementwise"), "") \
        + ("" if c.get("sampler", "auto") == "auto" else f"_sampler-{c['sampler']}") \
        + ("" if c.get("attention", "auto") == "auto" else f"_attn-{c['attention']}")
    common = f"L{c['num_adapters']}_r{c['rank']}_n{c['max_new_tokens']}"
    kind = data.get("kind", "single")
    if kind == "sweep":
        return f"e2e_sweep_{c['label']}_{common}_{'-'.join(c['workloads'])}{tail}"
    if kind == "workloads":
        b = data["points"][0]["batch_size"]
        return f"e2e_workloads_{c['label']}_b{b}_{common}_{'-'.join(c['workloads'])}{tail}"
    return f"e2e_{c['label']}_b{c['batch_size']}_{common}{tail}"


def main(args: argparse.Namespace) -> dict:
    if args.estimate:
        print_estimate(args)
        return {}
    if args.profile_summary:
        for title, rows in read_profile_log(args.profile_summary):
            print_profile(title, rows)
        return {}
    if args.plot_only:
        with open(args.plot_only) as f:
            data = json.load(f)
        pngs = draw(data, os.path.splitext(args.plot_only)[0])
        report(data, args.targets)
        print(f"wrote {' '.join(pngs)}")
        return data
    if args.modes is None:
        args.modes = list(SWEEP_MODES if args.batch_sizes else DEFAULT_MODES)
    if args.quick:
        args.model, args.model_config = None, "tiny"
        args.batch_size, args.max_new_tokens, args.prompt_len = 8, 8, 16
        args.num_adapters, args.rank, args.warmup_tokens = 4, 4, 2
    import torch
    cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if cpu and (any(m in TRITON_MODES for m in args.modes) or args.fused_elementwise == "on"
                or args.sampler in ("triton", "triton_split") or args.attention == "triton"):
        os.environ.setdefault("TRITON_INTERPRET", "1")    # before transformers imports triton
    data = run(args)
    os.makedirs(args.out_dir, exist_ok=True)
    stem = args.name or default_stem(data, args.engine)
    path = os.path.join(args.out_dir, stem + ".json")
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    pngs = draw(data, os.path.join(args.out_dir, stem))      # from the data just written
    report(data, args.targets)
    print(f"wrote {path} and {' '.join(os.path.basename(x) for x in pngs)}")
    data["json_path"] = path
    data["pngs"] = pngs
    return data


if __name__ == "__main__":
    main(build_parser().parse_args())
