"""A fast multi-LoRA Llama engine: a compact forward over the weights transformers loaded,
static KV cache, CUDA-graph decode, GPU sampling (DESIGN.md "End to end", the fast form).

    engine = MultiLoraEngine(model, lora, mode="bgmv_triton", max_batch=64, max_seq=1024)
    tokens, stats = engine.generate(prompts, adapter_idx, max_new_tokens=512,
                                    temperature=0.7, top_p=0.9, seed=0, ignore_eos=True)
    logits = engine.forward_logits(input_ids, adapter_idx, attention_mask)   # oracle path

Model: any LlamaForCausalLM (embed, per layer input_layernorm / q,k,v,o /
post_attention_layernorm / gate,up,down, final norm, lm_head; GQA; tied embeddings; RoPE
'default', 'linear' and 'llama3' computed here, other static types taken from the model's
rotary_emb). q/k/v and gate/up are concatenated into one weight each: Wqkv
[(H + 2 Hkv) d, hidden], Wgu [2 I, hidden] (a copy; the model's own weights are untouched).

LoRA: `lora` maps an HF module path ("model.layers.3.self_attn.q_proj") to
(A [L, r_max, h_in], B [L, h_out, r_max], scale [L] fp32, ranks [L] int32 or None), the
layouts of multilora_impl (multilora_model.stack_adapters makes exactly this). A module
missing from the dict has no LoRA. Per layer there are four call sites, each one call of
the registry mode  fn(y, x, A, B, idx, scale, ranks, meta):
    qkv      A [3, L, r, hidden], B = (Bq, Bk, Bv)   one shrink for the three slices
    o        the module's own A, B, scale, ranks
    gate_up  A [2, L, r, hidden], B = (Bgate, Bup)
    down     the module's own A, B, scale, ranks
Fusing modules with different scales / ranks: r = max of the modules' r_max; each module's
scale is folded into its B (B_s * scale_s[:, None, None], in fp32, cast once) and the site
passes scale = ones; ranks = the per-adapter max over the fused modules, the rows / columns
between a module's own rank and that max are zeros (not NaN: they are read). A module
absent from a fused site contributes all-zero slices. Padded entries past a module's own
rank are zeroed when the site is built, whatever the input held there.

KV cache: k_cache, v_cache [layers, max_batch, Hkv, max_seq, d]. Prompts are left-padded
to the longest one S (row b starts at slot start[b]); decode step t writes slot S + t - 1 of
every row; RoPE positions are slot - start[b]. Attention reads only the filled part of the
cache: slots [0, Sb) with Sb the current length rounded up to ATTN_BUCKET, masked per row
(slot < start[b] or slot > cur is -inf). Decode attention treats the G = H / Hkv query
heads of a KV head as G query rows: q [B, Hkv, G, d] against the cache views [B, Hkv, Sb,
d], so K/V are read once and never repeated; attention='sdpa' is one
F.scaled_dot_product_attention call with an additive bias (scores in fp32 inside the
kernel), attention='matmul' two batched matmuls with an fp32 softmax between them,
attention='triton' engine_kernels.decode_attention (flash-decoding: reads only each row's
slots start[b]..cur, the cache split over more programs when the batch is small);
'auto' (default) is 'triton' on CUDA and 'sdpa' on the CPU (H200, Llama-3-8B shapes, b 64,
512 tokens: none 7.31 -> 6.73 ms/step, PERF_LOG v6). Prefill uses
F.scaled_dot_product_attention with a boolean mask. Per layer the decode step
is ~17 kernels: fused RMSNorm (F.rms_norm), RoPE on q and k together (mul, flip, addcmul
with a sign-folded sin table), two cache writes, attention, four GEMMs, SiLU*up, adds.
fused_elementwise=True ('auto', the default: on CUDA; H200 none 7.31 -> 6.39 ms/step,
PERF_LOG v6) replaces the norms, adds, RoPE, cache writes and SiLU*up by engine_kernels'
three Triton kernels: per layer 2 x (residual
add + RMSNorm), 1 x (RoPE on q, k + k, v into the cache), 1 x SiLU*up; the residual
stream x is then updated in place.

Batch: generate() sorts the requests by adapter (stable), so every adapter's requests are
one contiguous run (one SGMV segment each), then restores the caller's order.

Mode "stacked" (ENGINE_ONLY_MODES): each site's base weight W [N, h_in] is
stored as W_ext = [W; every adapter's A rows (slice, adapter, rank row)] and one GEMM
gives y and x A^T for all adapters; a mask from idx keeps each token's own adapter, and
y += (x A^T * mask) @ Bt, Bt every adapter's scale * B^T (block-diagonal over slices):
engine_kernels.stacked_expand on CUDA (the mask computed in the kernel), on the CPU a
mask built once per forward and column layout, a multiply and y.addmm_
(MULTILORA_STACKED_EXPAND picks). In the fused decode step an expand can instead happen
inside the kernel that consumes the site's output (o and down: residual add + RMSNorm,
the CUDA default "triton_norm"; with "triton_folded" also q/k/v: RoPE + cache write and
gate/up: SiLU * up), so it adds no launch and no round trip of y. The layer's W
becomes a view of W_ext, so the other
modes read the same numbers; y is a row-strided view of the wider output, which every
consumer of it takes.

CUDA graphs: one decode step (forward, sampling, EOS bookkeeping, position increment) is
captured per (batch bucket, attention-length bucket, greedy?, keep_logits?), by hand
(torch.cuda.CUDAGraph: warm-up on a side stream, then capture on it, one shared memory
pool). All graphs a generate() call needs are captured before its timed region
(stats['capture_s']). Everything the step reads lives in static device buffers allocated
once at max size (tokens, positions, idx, LoraMeta segments, sampling parameters, seed,
step counter, EOS ids, output tokens) and is refilled in place (copy_) before the step
loop; the step never syncs with the host. Modes whose call syncs (loop, gbmm: see
multilora_impl.MODES[...].graph_safe) run the same step eagerly: graph_capable(mode).
cheat_bmm gets per-site metadata (its A[idx], B[idx] gathered once per assignment, outside
the timed region, as that mode states); its graphs are recaptured when the assignment
changes. Prefill always runs eagerly.

Sampling (on the device, no host sync): greedy = argmax. Otherwise exact temperature +
top-p (nucleus) sampling without sorting the vocabulary:
  z = logits / T, p = softmax(z). The nucleus N is the smallest set of most probable tokens
  with mass >= top_p; token c is in N iff sum_{z_i > z_c} p_i < top_p (ties: a token tied
  with the boundary one is kept, where a sort would keep an arbitrary subset).
  Gumbel-max race restricted to N: answer = argmax_{i in N} z_i + g_i, g_i Gumbel(0, 1),
  an exact sample of p renormalised on N. Found without knowing N: w = argmax over
  {z > pivot} of z + g; if w is in N it is the answer (it beats every other token of N);
  else every token with z <= z_w is outside N too, so pivot = z_w and repeat. Each round
  rejects with probability <= 1 - top_p (the within-set Gumbel argmax is independent of
  the earlier rounds' outcome), so after SAMPLER_MAX_ROUNDS rounds the chance of not having
  finished is <= (1 - top_p)^32; such a row takes the argmax token (which is in N): the one
  approximation, stated. g comes from a counter-based integer hash of (seed, step, row,
  token), the same in the Triton kernel (GPU: one program per row; pass 1 computes max,
  softmax normaliser and the first race winner, pass 2 its nucleus check, so usually two
  reads of the bf16 row, from L2) and in the torch version (CPU, and the test reference),
  so both give the same tokens for the same seed, in or out of a graph.

Checked in tests/test_engine.py: logits equal Hugging Face's (no LoRA) and PEFT's
mixed-batch forward (adapter_names=) for every mode; greedy generation equals HF
generate; sampling is reproducible, respects top-p and matches the distribution; GPU
tests (pytest -m gpu) at Llama-3-8B shapes: graph replay equals the eager step, no host
sync in the decode loop, decode logits equal PEFT's.
"""
from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import engine_kernels as ek
from multilora_impl import (MAX_RANK, LoraMeta, LoraMode, fill_static_meta, get_mode,
                            make_meta, make_static_meta)

try:  # the GPU sampler; on a CPU the torch version runs (tests use the interpreter)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover
    triton = None

# ---------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# call site -> the modules it fuses, in output-column order
SITES = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
_SITE_WEIGHTS = {"qkv": ("wqkv", "bqkv"), "o": ("wo", "bo"), "gate_up": ("wgu", "bgu"),
                 "down": ("wd", "bd")}                 # site -> _Layer fields of its base layer


def _engine_only(*args, **kwargs):
    raise ValueError("mode 'stacked' runs inside MultiLoraEngine only (it folds every "
                     "adapter's A into the base GEMM); the kernel registry has no such call")


# Modes of the engine only (not kernel-registry calls: they need the base weights).
# "stacked", for few adapters: every adapter's A rows are stacked under the site's base
# weight, so the base GEMM also computes x A_a^T for all L adapters (E = S L r more output
# columns, read once per step instead of once per token); the rows of other adapters are
# zeroed by a mask from idx, and (v * mask) [T, E] @ Bt [E, N] is added into y, Bt every
# adapter's scale * B^T stacked (block-diagonal over the q/k/v or gate/up slices): one
# kernel per site more than the base GEMM (engine_kernels.stacked_expand) on CUDA, two
# (multiply + addmm) in the torch form; cost grows with L * r.
ENGINE_ONLY_MODES = {"stacked": LoraMode(
    "stacked", _engine_only, description="engine only: every adapter's A stacked under the "
    "base weight (one GEMM), masked by idx, then one GEMM with every adapter's B")}
STACK_ROWS = 8        # E is padded to a multiple of 8 rows: 16-byte rows of the output in bf16
# How "stacked" adds its LoRA: "triton_norm" (the default on CUDA): in the fused decode step
# the o and down expands are folded into the add_rms_norm after them; q/k/v and gate/up
# launch engine_kernels.stacked_expand (the mask in the kernel); "triton" (stacked_expand at
# every site), "triton_folded" (every site folded: q/k/v into rope_qkv_to_cache, gate/up
# into stacked_silu_mul; slower on the H200: the per-token RoPE programs re-read B, PERF_LOG
# v9c) or "torch" (mask multiply + addmm: two launches; the default on the CPU). Read by
# set_mode. STACKED_FOLD_SITES: the sites each choice folds.
STACKED_EXPAND_ENV = "MULTILORA_STACKED_EXPAND"
STACKED_EXPAND_CHOICES = ("triton_norm", "triton", "triton_folded", "torch")
STACKED_FOLD_SITES = {"triton_norm": ("o", "down"), "triton": (), "torch": (),
                      "triton_folded": ("qkv", "o", "gate_up", "down")}

_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn\.(q_proj|k_proj|v_proj|o_proj)"
                     r"|mlp\.(gate_proj|up_proj|down_proj))$")
# Attention length bucket: decode attends over the cache rounded up to this many slots;
# one graph per bucket. 64 slots of a 64-request Llama-3-8B batch cost ~17 MB of K/V reads
# per layer: small next to the weights, and few graphs (9 for 32 + 512 tokens).
ATTN_BUCKET = 64
SAMPLER_MAX_ROUNDS = 32     # top-p race rounds: P(not done) <= (1 - top_p) ** 32
SAMPLER_BLOCK_V = 4096      # logits per iteration of the sampler kernel (8 warps x 16):
                            # fewer, longer iterations hide L2 latency in a 1-program row
# Split sampler (sample_top_p_triton(split=True)): programs to aim for over the batch (2
# waves of the H200's 132 SMs). Off by default: no faster on the H200 (PERF_LOG v6).
SAMPLER_SPLIT_PROGRAMS = 264
SAMPLER_SPLIT_DEFAULT = False
EOS_CHECK_EVERY = 32        # decode steps between the host checks "have all rows ended?"
MAX_EOS_IDS = 8
M32 = 0xFFFFFFFF


# ---------------------------------------------------------------------------------------
# RoPE
# ---------------------------------------------------------------------------------------
def rope_inv_freq(config, head_dim: int) -> tuple[Tensor, float]:
    """(inv_freq [head_dim // 2] fp32, attention_scaling) for 'default', 'linear' and
    'llama3' RoPE, as transformers computes them (config.rope_parameters in transformers 5,
    rope_scaling + rope_theta before). ValueError for other types."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
                  or {})
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0)
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"config: partial_rotary_factor={params['partial_rotary_factor']} "
                         f"is not supported (expected 1.0)")
    dim = head_dim
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rtype == "default":
        return inv, 1.0
    if rtype == "linear":
        return inv / params["factor"], 1.0
    if rtype == "llama3":
        factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        lo_wavelen, hi_wavelen = old_len / lo, old_len / hi
        wavelen = 2 * math.pi / inv
        inv_l = torch.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wavelen < hi_wavelen) * ~(wavelen > lo_wavelen)
        return torch.where(medium, smoothed, inv_l), 1.0
    raise ValueError(f"config: rope type {rtype!r} is not computed here (default, linear, llama3)")


def _rope_tables(model, config, head_dim: int, n_pos: int, device, dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [n_pos, head_dim] in dtype, as LlamaRotaryEmbedding.forward computes them,
    except that the first half of sin is negated: rotate_half(x) * sin ==
    flip_halves(x) * sin_signed, one flip instead of a negation and a concatenation."""
    try:
        inv, scaling = rope_inv_freq(config, head_dim)
    except ValueError:
        rot = getattr(getattr(model, "model", model), "rotary_emb", None)
        rtype = getattr(rot, "rope_type", None)
        if rot is None or rtype in ("dynamic", "longrope") or not hasattr(rot, "inv_freq"):
            raise
        inv, scaling = rot.inv_freq.detach().float().cpu(), float(rot.attention_scaling)
    inv = inv.to(device)
    pos = torch.arange(n_pos, device=device)
    freqs = pos[:, None].float() * inv[None, :]                 # [n_pos, d / 2]
    emb = torch.cat((freqs, freqs), dim=-1)                     # [n_pos, d]
    sin = emb.sin() * scaling
    sin[:, :head_dim // 2] *= -1
    return (emb.cos() * scaling).to(dtype), sin.to(dtype)


def _rms_norm(x: Tensor, w: Tensor, eps: float) -> Tensor:
    """LlamaRMSNorm (x * rsqrt(mean(x^2) + eps) * w, statistics in fp32), one fused kernel
    where torch has it; transformers rounds to x's dtype before the weight multiply, this
    rounds once (<= 1 ulp apart in bf16, equal math in fp32)."""
    return F.rms_norm(x, (x.shape[-1],), w, eps)


# ---------------------------------------------------------------------------------------
# LoRA call sites
# ---------------------------------------------------------------------------------------
@dataclass
class LoraSite:
    """One registry call: y [T, sum h_out_s] += LoRA(x [T, h_in])."""
    key: tuple[int, str]               # (layer, site name)
    A: Tensor                          # [L, r, h_in] or [S, L, r, h_in]
    B: Union[Tensor, tuple]            # [L, h_out, r] or S tensors [L, h_out_s, r]
    scale: Tensor                      # [L] fp32 (ones when fused: folded into B)
    ranks: Optional[Tensor]            # [L] int32 or None


def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{arg}: expected {expected}, got {got}")


def _check_entry(name: str, entry, h_in: int, h_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Validate one lora dict entry; returns A, B, scale fp32, ranks int64 (full when None),
    all on the CPU side of the checks (ranks read on the host, once)."""
    if not isinstance(entry, (tuple, list)) or len(entry) != 4:
        _fail(f"lora[{name!r}]", "a tuple (A, B, scale, ranks)", type(entry).__name__)
    A, B, scale, ranks = entry
    if not isinstance(A, Tensor) or A.dim() != 3 or A.shape[2] != h_in or A.shape[0] < 1 \
            or not 1 <= A.shape[1] <= MAX_RANK:
        _fail(f"lora[{name!r}] A", f"[L, r_max <= {MAX_RANK}, h_in={h_in}]",
              tuple(getattr(A, "shape", ())))
    L, r = A.shape[0], A.shape[1]
    if not isinstance(B, Tensor) or tuple(B.shape) != (L, h_out, r):
        _fail(f"lora[{name!r}] B", f"[L={L}, h_out={h_out}, r_max={r}]", tuple(getattr(B, "shape", ())))
    if not isinstance(scale, Tensor) or tuple(scale.shape) != (L,) or not scale.is_floating_point():
        _fail(f"lora[{name!r}] scale", f"a float tensor [L={L}]", tuple(getattr(scale, "shape", ())))
    if ranks is None:
        ranks_h = torch.full((L,), r, dtype=torch.int64)
    else:
        if not isinstance(ranks, Tensor) or tuple(ranks.shape) != (L,) or ranks.is_floating_point():
            _fail(f"lora[{name!r}] ranks", f"an int tensor [L={L}] or None",
                  tuple(getattr(ranks, "shape", ())))
        ranks_h = ranks.detach().to("cpu", torch.int64)
        if int(ranks_h.min()) < 0 or int(ranks_h.max()) > r:
            _fail(f"lora[{name!r}] ranks", f"values in [0, r_max={r}]", ranks_h.tolist())
    return A, B, scale.detach().float(), ranks_h


def build_lora_sites(lora: Optional[dict], num_layers: int, shapes: dict[str, tuple[int, int]],
                     device, dtype) -> tuple[list[dict[str, LoraSite]], int]:
    """Per layer {site name: LoraSite} from the lora dict (see the module docstring) and the
    number of adapters L. shapes: module name -> (h_in, h_out)."""
    sites: list[dict[str, LoraSite]] = [dict() for _ in range(num_layers)]
    if not lora:
        return sites, 0
    per_layer: list[dict[str, tuple]] = [dict() for _ in range(num_layers)]
    L = None
    for key, entry in lora.items():
        m = _KEY_RE.search(key) if isinstance(key, str) else None
        if m is None:
            _fail("lora", f"keys like 'model.layers.<i>.self_attn.q_proj' ({', '.join(LORA_MODULES)})",
                  repr(key))
        layer, mod = int(m.group(1)), m.group(2) or m.group(3)
        if layer >= num_layers:
            _fail(f"lora[{key!r}]", f"a layer index < {num_layers}", layer)
        h_in, h_out = shapes[mod]
        A, B, scale, ranks = _check_entry(key, entry, h_in, h_out)
        if L is None:
            L = A.shape[0]
        elif A.shape[0] != L:
            _fail(f"lora[{key!r}] A", f"L={L} adapters like the other modules", A.shape[0])
        if mod in per_layer[layer]:
            _fail("lora", "one entry per module", f"two entries for layer {layer} {mod}")
        per_layer[layer][mod] = (A, B, scale, ranks)

    for layer, mods in enumerate(per_layer):
        for site, names in SITES.items():
            present = [n for n in names if n in mods]
            if not present:
                continue
            r = max(mods[n][0].shape[1] for n in present)
            cols = torch.arange(r)
            if len(names) == 1:
                A, B, scale, ranks = mods[names[0]]
                used = cols[None, :] < ranks[:, None]                              # [L, r]
                A = torch.where(used.to(A.device)[:, :, None], A, 0).to(device, dtype)
                B = torch.where(used.to(B.device)[:, None, :], B, 0).to(device, dtype)
                full = bool((ranks == r).all())
                sites[layer][site] = LoraSite(
                    (layer, site), A.contiguous(), B.contiguous(), scale.to(device),
                    None if full else ranks.to(device, torch.int32))
                continue
            # Fused site: S slices sharing one shrink; scales folded into B, zero padding.
            h_in = shapes[names[0]][0]
            A4 = torch.zeros(len(names), L, r, h_in, device=device, dtype=dtype)  # [S, L, r, h_in]
            Bs, ranks_f = [], torch.zeros(L, dtype=torch.int64)
            for s, n in enumerate(names):
                h_out = shapes[n][1]
                B_s = torch.zeros(L, h_out, r, device=device, dtype=dtype)          # [L, h_out_s, r]
                if n in mods:
                    A, B, scale, ranks = mods[n]
                    rm = A.shape[1]
                    used = (cols[None, :rm] < ranks[:, None]).to(A.device)          # [L, rm]
                    A4[s, :, :rm] = torch.where(used[:, :, None], A, 0).to(device, dtype)
                    Bf = B.float() * scale.to(B.device)[:, None, None]
                    B_s[:, :, :rm] = torch.where(used[:, None, :], Bf, 0).to(device, dtype)
                    ranks_f = torch.maximum(ranks_f, ranks)
                Bs.append(B_s)
            full = bool((ranks_f == r).all())
            sites[layer][site] = LoraSite(
                (layer, site), A4, tuple(Bs), torch.ones(L, dtype=torch.float32, device=device),
                None if full else ranks_f.to(device, torch.int32))
    return sites, int(L or 0)


@dataclass
class StackedSite:
    """A site of mode "stacked": y [T, N] = (x W_ext^T + b_ext)[:, :N] +
    ((x W_ext^T)[:, N:] * mask(idx)) @ Bt."""
    w_ext: Tensor                      # [N + E, h_in]: W, then A rows (s, a, j), zero padding
    b_ext: Optional[Tensor]            # [N + E] or None
    bt: Tensor                         # [E, N]: scale_a B_s[a, :, j]^T at row (s, a, j)
    col_adapter: Tensor                # [E] int32: the adapter of each extra column (-2: pad)
    layout: tuple                      # (S, L, r, E): sites with equal layouts share a mask
    slice_starts: tuple = ()           # first column of slices 1 .. S-1 (bt is block-diagonal)


def build_stacked_site(w: Tensor, b: Optional[Tensor], site: LoraSite) -> StackedSite:
    """The mode-"stacked" weights of one site: w [N, h_in], b [N] or None (the base layer),
    site.A [L, r, h_in] or [S, L, r, h_in] (zero past each rank), site.B [L, N, r] or S
    slices [L, N_s, r] (columns of y in order)."""
    A4 = site.A if site.A.dim() == 4 else site.A.unsqueeze(0)             # [S, L, r, h_in]
    S, L, r, h_in = A4.shape
    Bs = [site.B] if isinstance(site.B, Tensor) else list(site.B)
    N = w.shape[0]
    E = -(-S * L * r // STACK_ROWS) * STACK_ROWS
    w_ext = torch.zeros(N + E, h_in, device=w.device, dtype=w.dtype)
    w_ext[:N] = w
    w_ext[N:N + S * L * r] = A4.reshape(S * L * r, h_in)
    b_ext = None
    if b is not None:
        b_ext = torch.zeros(N + E, device=b.device, dtype=b.dtype)
        b_ext[:N] = b
    bt = torch.zeros(E, N, device=w.device, dtype=w.dtype)
    col, starts = 0, []
    for s_i, B_s in enumerate(Bs):                                         # [L, N_s, r]
        n_s = B_s.shape[1]
        if s_i:
            starts.append(col)
        scaled = B_s.float() * site.scale.float()[:, None, None]
        rows = slice(s_i * L * r, (s_i + 1) * L * r)
        bt[rows, col:col + n_s] = scaled.permute(0, 2, 1).reshape(L * r, n_s).to(w.dtype)
        col += n_s
    if col != N:
        _fail("stacked site", f"B slices covering the {N} output columns", col)
    layout = (S, L, r, E)
    return StackedSite(w_ext, b_ext, bt, ek.stacked_col_adapter(layout, w.device), layout,
                       tuple(starts))


# ---------------------------------------------------------------------------------------
# LoRA metadata: static device buffers (graphs) or host-built (eager)
# ---------------------------------------------------------------------------------------
def host_meta(idx_host: Tensor, device) -> LoraMeta:
    """make_meta on the host copy of idx, moved to the device (no device read)."""
    m = make_meta(idx_host.to(torch.int32), chunks=False)   # the engine's modes need none
    return LoraMeta(idx=m.idx.to(device), seg_starts=m.seg_starts.to(device),
                    seg_adapter=m.seg_adapter.to(device), num_segments=m.num_segments,
                    max_seg_len=m.max_seg_len,
                    groups=[(a, pos.to(device)) for a, pos in m.groups])


@dataclass
class _LoraCtx:
    idx: Tensor                                   # [T] int32, device
    meta: Optional[LoraMeta]
    site_metas: Optional[dict] = None             # cheat_bmm: per-site gathered weights
    masks: dict = field(default_factory=dict)     # "stacked": layout -> [T, E] mask, per forward


# ---------------------------------------------------------------------------------------
# Sampling: counter-based Gumbel noise, the torch version and the Triton kernel
# ---------------------------------------------------------------------------------------
def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32) without int64 overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def _mix32_t(x: Tensor) -> Tensor:
    """lowbias32 integer hash (uint32 arithmetic held in int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed: Tensor, step: Tensor, rows: int, V: int) -> Tensor:
    """g [rows, V] fp32, Gumbel(0, 1) from hash(seed, step, row, token); seed, step: int64
    tensors [1] on the target device. The Triton kernel computes the same values."""
    dev = seed.device
    row = torch.arange(rows, device=dev, dtype=torch.int64)[:, None]            # [rows, 1]
    col = torch.arange(V, device=dev, dtype=torch.int64)[None, :]               # [1, V]
    rk = _mix32_t((seed & M32) ^ _mix32_t((_mul32(step & M32, 0x9E3779B9) + row) & M32))
    h = _mix32_t(rk ^ _mul32(col, 0x85EBCA6B))                                  # [rows, V]
    u = ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)                           # (0, 1)
    return -torch.log(-torch.log(u))


def sample_top_p_torch(logits: Tensor, params: Tensor, seed: Tensor, step: Tensor,
                       max_rounds: int = SAMPLER_MAX_ROUNDS) -> Tensor:
    """Exact temperature + top-p sample per row (algorithm: module docstring), tokens [B]
    int64. params = fp32 [2] (1 / temperature, top_p); seed, step int64 [1]. Device
    tensors only: no host sync on a GPU (all rounds run); on a CPU it stops when all rows
    are done."""
    B, V = logits.shape
    inv_t, top_p = params[0], params[1]
    z = logits.float() * inv_t                                                   # [B, V]
    amax = z.argmax(-1)                                                          # [B]
    z_max = z.gather(1, amax[:, None])
    e = torch.exp(z - z_max)                                                     # [B, V]
    total = e.sum(-1)
    key = z + gumbel_noise(seed, step, B, V)
    neg_inf = float("-inf")
    pivot = torch.full((B,), neg_inf, device=z.device)      # a fill, not a host copy
    tok = amax.clone()
    done = (top_p <= 0).expand(B).clone()           # top_p <= 0: greedy (never happens via generate)
    for _ in range(max_rounds):
        k = torch.where(z > pivot[:, None], key, neg_inf)
        w = k.argmax(-1)
        w = torch.where(k.gather(1, w[:, None]).squeeze(1) > neg_inf, w, amax)
        zw = z.gather(1, w[:, None])                                             # [B, 1]
        mass = torch.where(z > zw, e, 0.0).sum(-1) / total
        ok = (mass < top_p) | (top_p >= 1.0)
        tok = torch.where(ok & ~done, w, tok)
        pivot = torch.where(done | ok, pivot, zw.squeeze(1))
        done = done | ok
        if not z.is_cuda and bool(done.all()):
            break
    return tok


if triton is not None:
    @triton.jit
    def _mix32(x):
        # lowbias32 on uint32 (wrapping multiplies): the same bits as _mix32_t
        x ^= x >> 16
        x *= 0x7FEB352D
        x ^= x >> 15
        x *= 0x846CA68B
        x ^= x >> 16
        return x

    @triton.jit
    def _top_p_chunk_scan(base, rkey, inv_t, lo, hi, BLOCK_V: tl.constexpr):
        """Pass 1 over logits [lo, hi) of one row: (max z, sum exp(z - max), first argmax,
        best race key z + g, its first index)."""
        offs = tl.arange(0, BLOCK_V)
        NEG_INF: tl.constexpr = float("-inf")
        # per-lane running max of z (from a finite floor, so that exp(m_l - m_new) is never
        # exp(-inf + inf) = NaN on lanes that have seen no token yet) and sum exp(z - m_l)
        m_l = tl.full([BLOCK_V], -3.0e38, tl.float32)
        s_l = tl.zeros([BLOCK_V], tl.float32)
        best_i = tl.zeros([BLOCK_V], tl.int32)             # per-lane first argmax of z
        bk = tl.full([BLOCK_V], NEG_INF, tl.float32)       # per-lane best race key z + g
        bi = tl.zeros([BLOCK_V], tl.int32)
        for start in range(lo, hi, BLOCK_V):
            o = start + offs
            z = tl.load(base + o, mask=o < hi, other=NEG_INF).to(tl.float32) * inv_t
            m_new = tl.maximum(m_l, z)
            s_l = s_l * tl.exp(m_l - m_new) + tl.exp(z - m_new)
            best_i = tl.where(z > m_l, o, best_i)
            m_l = m_new
            h = _mix32(rkey ^ (o.to(tl.uint32) * 0x85EBCA6B))
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)     # (0, 1)
            key = tl.where(o < hi, z - tl.log(-tl.log(u)), NEG_INF)
            upd = key > bk
            bk = tl.where(upd, key, bk)
            bi = tl.where(upd, o, bi)
        return _reduce_scan(m_l, s_l, best_i, bk, bi, hi)

    @triton.jit
    def _reduce_scan(m, s, a, k, w, none):
        """Per-lane (or per-chunk) scan results -> one: (max z, sum exp(z - max z), first
        argmax, best race key, its first index); `none` is an index past every real one."""
        z_max = tl.max(m, 0)
        amax = tl.min(tl.where(m == z_max, a, none), 0)
        total = tl.sum(s * tl.exp(m - z_max), 0)
        kw = tl.max(k, 0)
        return z_max, total, amax, kw, tl.min(tl.where(k == kw, w, none), 0)

    @triton.jit
    def _row_key(seed_ptr, step_ptr, row):
        seed = tl.load(seed_ptr).to(tl.uint32)
        step = tl.load(step_ptr).to(tl.uint32)
        return _mix32(seed ^ _mix32(step * 0x9E3779B9 + row.to(tl.uint32)))

    @triton.jit
    def _combine_chunks(fstats_ptr, istats_ptr, row, P, V, PP: tl.constexpr):
        """The row's chunk results [P] -> (z_max, total, amax, kw, w) of the whole row; ties
        go to the smallest index, as in one scan."""
        c = tl.arange(0, PP)
        m = c < P
        NEG_INF: tl.constexpr = float("-inf")
        fb = fstats_ptr + (row * P + c) * 3
        ib = istats_ptr + (row * P + c) * 2
        m_c = tl.load(fb, mask=m, other=-3.0e38)
        s_c = tl.load(fb + 1, mask=m, other=0.0)
        k_c = tl.load(fb + 2, mask=m, other=NEG_INF)
        a_c = tl.load(ib, mask=m, other=V)
        w_c = tl.load(ib + 1, mask=m, other=V)
        return _reduce_scan(m_c, s_c, a_c, k_c, w_c, V)

    @triton.jit
    def _top_p_stats_kernel(logits_ptr, params_ptr, seed_ptr, step_ptr, fstats_ptr, istats_ptr,
                            V, stride_lb, CHUNK, P, BLOCK_V: tl.constexpr):
        # Split sampler, launch 1 of 3: program (row, chunk c) scans logits [c CHUNK,
        # (c + 1) CHUNK) and stores (max, sum exp, race key) fp32 and (argmax, race index).
        row = tl.program_id(0)
        c = tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride_lb
        lo = c * CHUNK
        z_max, total, amax, kw, w = _top_p_chunk_scan(
            base, _row_key(seed_ptr, step_ptr, row), tl.load(params_ptr), lo,
            tl.minimum(lo + CHUNK, V), BLOCK_V)
        fb = fstats_ptr + (row * P + c) * 3
        tl.store(fb, z_max)
        tl.store(fb + 1, total)
        tl.store(fb + 2, kw)
        ib = istats_ptr + (row * P + c) * 2
        tl.store(ib, amax)
        tl.store(ib + 1, w)

    @triton.jit
    def _top_p_mass_kernel(logits_ptr, params_ptr, fstats_ptr, istats_ptr, mass_ptr,
                           V, stride_lb, CHUNK, P, PP: tl.constexpr, BLOCK_V: tl.constexpr):
        # Split sampler, launch 2 of 3: program (row, chunk c) combines the row's chunk
        # results into the race winner w, then sums exp(z - z_max) over its chunk's tokens
        # more probable than w (the nucleus check of round 0).
        row = tl.program_id(0)
        c = tl.program_id(1)
        inv_t = tl.load(params_ptr)
        base = logits_ptr + row.to(tl.int64) * stride_lb
        z_max, total, amax, kw, w = _combine_chunks(fstats_ptr, istats_ptr, row, P, V, PP)
        w = tl.where(kw > float("-inf"), w, amax)
        zw = tl.load(base + w).to(tl.float32) * inv_t
        offs = tl.arange(0, BLOCK_V)
        macc = tl.zeros([BLOCK_V], tl.float32)
        lo = c * CHUNK
        hi = tl.minimum(lo + CHUNK, V)
        for start in range(lo, hi, BLOCK_V):
            o = start + offs
            z = tl.load(base + o, mask=o < hi, other=float("-inf")).to(tl.float32) * inv_t
            macc += tl.where(z > zw, tl.exp(z - z_max), 0.0)
        tl.store(mass_ptr + row * P + c, tl.sum(macc, 0))

    @triton.jit
    def _top_p_sample_kernel(
        # pointers: logits [B, V] (any float dtype, unit stride along V); params fp32 [2]
        # (1 / temperature, top_p); seed, step int64 [1]; out int64 [B]; SPLIT only: the
        # chunk results of the two launches before, fp32 [B, P, 3], int32 [B, P, 2], [B, P]
        logits_ptr, params_ptr, seed_ptr, step_ptr, out_ptr, fstats_ptr, istats_ptr, mass_ptr,
        # sizes and strides
        V, stride_lb, P,
        # constexprs: logits per iteration, race rounds, split (P chunks, PP = pow2 >= P)
        BLOCK_V: tl.constexpr, MAX_ROUNDS: tl.constexpr, SPLIT: tl.constexpr, PP: tl.constexpr,
    ):
        # One program per row; each pass streams the row (2 V bytes in bf16, from L2 right
        # after lm_head wrote it). Pass 1 gives max, argmax, the softmax normaliser (online,
        # per lane) and the first race winner; pass 2 its mass check. Usually that is all:
        # another race + mass pass only follows a rejection (probability <= 1 - top_p).
        # SPLIT: pass 1 and round 0's mass pass were done by P programs per row (launches 1
        # and 2); this program combines them and runs only the rare later rounds.
        row = tl.program_id(0)
        inv_t = tl.load(params_ptr)
        top_p = tl.load(params_ptr + 1)
        rkey = _row_key(seed_ptr, step_ptr, row)
        base = logits_ptr + row.to(tl.int64) * stride_lb
        offs = tl.arange(0, BLOCK_V)
        NEG_INF: tl.constexpr = float("-inf")
        if SPLIT:
            z_max, total, amax, kw, w = _combine_chunks(fstats_ptr, istats_ptr, row, P, V, PP)
        else:
            z_max, total, amax, kw, w = _top_p_chunk_scan(base, rkey, inv_t, 0, V, BLOCK_V)
        # rounds: accept the race winner w if it is in the nucleus, else raise the pivot
        # to z_w and rerun the race over {z > pivot}
        pivot = z_max * 0.0 + NEG_INF
        tok = amax
        done = (top_p <= 0.0).to(tl.int32)
        for r in range(MAX_ROUNDS):
            if done == 0:
                if r > 0:
                    bk = tl.full([BLOCK_V], NEG_INF, tl.float32)
                    bi = tl.zeros([BLOCK_V], tl.int32)
                    for start in range(0, V, BLOCK_V):
                        o = start + offs
                        z = tl.load(base + o, mask=o < V, other=NEG_INF).to(tl.float32) * inv_t
                        h = _mix32(rkey ^ (o.to(tl.uint32) * 0x85EBCA6B))
                        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                        key = tl.where(z > pivot, z - tl.log(-tl.log(u)), NEG_INF)
                        upd = key > bk
                        bk = tl.where(upd, key, bk)
                        bi = tl.where(upd, o, bi)
                    kw = tl.max(bk, 0)
                    w = tl.min(tl.where(bk == kw, bi, V), 0)
                w = tl.where(kw > NEG_INF, w, amax)
                zw = tl.load(base + w).to(tl.float32) * inv_t
                ok = top_p >= 1.0
                if top_p < 1.0:
                    if SPLIT and r == 0:
                        c = tl.arange(0, PP)
                        mass = tl.sum(tl.load(mass_ptr + row * P + c, mask=c < P, other=0.0), 0)
                    else:
                        macc = tl.zeros([BLOCK_V], tl.float32)
                        for start in range(0, V, BLOCK_V):
                            o = start + offs
                            z = tl.load(base + o, mask=o < V, other=NEG_INF).to(tl.float32) * inv_t
                            macc += tl.where(z > zw, tl.exp(z - z_max), 0.0)
                        mass = tl.sum(macc, 0)
                    ok = mass / total < top_p
                tok = tl.where(ok, w, tok)
                pivot = tl.where(ok, pivot, zw)
                done = ok.to(tl.int32)
        tl.store(out_ptr + row, tok.to(tl.int64))


def sampler_split(B: int, V: int, block: int, target_programs: int = SAMPLER_SPLIT_PROGRAMS) -> int:
    """Chunks per row for the split sampler: enough programs to cover the GPU (B * P >=
    target_programs), each chunk at least one BLOCK_V iteration, at most 64 chunks."""
    p = 1
    while B * p < target_programs and p < 64 and triton.cdiv(V, 2 * p) >= block:
        p *= 2
    return p


def sample_top_p_triton(logits: Tensor, params: Tensor, seed: Tensor, step: Tensor,
                        out: Optional[Tensor] = None, split: Optional[bool] = None,
                        block_v: Optional[int] = None) -> Tensor:
    """The Triton version of sample_top_p_torch (same tokens for the same inputs); out [B]
    int64. No host sync, no data-dependent host work: safe inside a CUDA graph.
    split: one program per row (False; ~215 us per step at 64 x 128256 on the H200, the
    profile in README) or P programs per row for the scan and the nucleus check, then one
    per row to combine (True: three launches). None = SAMPLER_SPLIT_DEFAULT. block_v:
    logits per iteration (a power of two; default SAMPLER_BLOCK_V; tests use small ones
    to get many chunks from a small vocabulary)."""
    if triton is None:
        raise RuntimeError("sampler: triton is not installed (use sampler='torch')")
    B, V = logits.shape
    if logits.stride(1) != 1:
        _fail("logits", "unit stride along the vocabulary", logits.stride())
    if out is None:
        out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    block = min(block_v or SAMPLER_BLOCK_V, triton.next_power_of_2(V))
    warps = 8 if block >= 2048 else 4
    split = SAMPLER_SPLIT_DEFAULT if split is None else split
    P = sampler_split(B, V, block) if split else 1
    if P == 1:
        _top_p_sample_kernel[(B,)](logits, params, seed, step, out, out, out, out, V,
                                   logits.stride(0), 1, BLOCK_V=block,
                                   MAX_ROUNDS=SAMPLER_MAX_ROUNDS, SPLIT=False, PP=1,
                                   num_warps=warps)
        return out
    # chunk = whole BLOCK_V iterations, so every chunk but the last is full and none is empty
    chunk = triton.cdiv(triton.cdiv(V, P), block) * block
    P = triton.cdiv(V, chunk)
    PP = triton.next_power_of_2(P)
    dev = logits.device
    fstats = torch.empty(B, P, 3, dtype=torch.float32, device=dev)
    istats = torch.empty(B, P, 2, dtype=torch.int32, device=dev)
    mass = torch.empty(B, P, dtype=torch.float32, device=dev)
    _top_p_stats_kernel[(B, P)](logits, params, seed, step, fstats, istats, V, logits.stride(0),
                                chunk, P, BLOCK_V=block, num_warps=warps)
    _top_p_mass_kernel[(B, P)](logits, params, fstats, istats, mass, V, logits.stride(0), chunk,
                               P, PP=PP, BLOCK_V=block, num_warps=warps)
    _top_p_sample_kernel[(B,)](logits, params, seed, step, out, fstats, istats, mass, V,
                               logits.stride(0), P, BLOCK_V=block,
                               MAX_ROUNDS=SAMPLER_MAX_ROUNDS, SPLIT=True, PP=PP, num_warps=warps)
    return out


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------
@dataclass
class _Layer:
    ln1: Tensor
    wqkv: Tensor                       # [(H + 2 Hkv) d, hidden]
    bqkv: Optional[Tensor]
    wo: Tensor
    bo: Optional[Tensor]
    ln2: Tensor
    wgu: Tensor                        # [2 I, hidden]
    bgu: Optional[Tensor]
    wd: Tensor
    bd: Optional[Tensor]
    lora: dict = field(default_factory=dict)
    stacked: dict = field(default_factory=dict)   # site -> StackedSite (mode "stacked")


class _State:
    """Static device buffers read and written by the decode step (graph inputs/outputs)."""

    def __init__(self, max_batch: int, max_seq: int, vocab: int, device, dtype):
        i64 = dict(dtype=torch.int64, device=device)
        self.tok = torch.zeros(max_batch, **i64)                       # next input token
        self.start = torch.zeros(max_batch, **i64)                     # first slot of each row
        self.cur = torch.zeros(1, **i64)                               # slot written this step
        self.step = torch.zeros(1, **i64)                              # output column / noise step
        self.idx = torch.full((max_batch,), -1, dtype=torch.int32, device=device)
        self.done = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.out = torch.zeros(max_batch, max_seq, **i64)              # generated tokens
        self.eos = torch.full((MAX_EOS_IDS,), -1, **i64)
        self.pad = torch.zeros(1, **i64)
        self.params = torch.ones(2, dtype=torch.float32, device=device)  # 1/T, top_p
        self.seed = torch.zeros(1, **i64)
        self.slots = torch.arange(max_seq, **i64)
        self.last_logits = torch.zeros(max_batch, vocab, dtype=dtype, device=device)


class MultiLoraEngine:
    """Compact Llama forward + multi-LoRA + static KV cache + CUDA-graph decode.

    model: a transformers LlamaForCausalLM (any wrappers with .base_layer / .base around
    its Linear layers are looked through). lora: {module path: (A, B, scale, ranks)} or
    None. mode: a multilora_impl registry name ('none' = no LoRA). max_batch, max_seq:
    sizes of the KV cache and static buffers (prompt + new tokens <= max_seq). dtype,
    device: default the model's. batch_buckets: decode batch sizes that get their own
    graph (default powers of two up to max_batch, and max_batch). attn_bucket: attention
    length granularity (slots). sampler: 'auto' (Triton on CUDA, torch on the CPU),
    'triton', 'triton_split' (the Triton sampler with P programs per row: three launches,
    no faster than 'triton' on the H200) or 'torch'. fused_elementwise: the decode step uses
    engine_kernels' fused residual add + RMSNorm, RoPE + K/V cache write and SiLU * up (4
    small kernels per layer instead of 11); 'auto' = on CUDA with triton. attention: 'auto'
    ('triton' on CUDA, else 'sdpa'), 'sdpa', 'matmul' or 'triton' (decode; module
    docstring). lora_overlap: False (the LoRA after each base GEMM, in place), "delta"
    (or True; CUDA, graph-safe modes: each site's whole LoRA runs on a side stream into a
    zeroed delta while the base GEMM runs, then y += delta: a zero and an add more per
    site), or "shrink" (modes with halves,
    MODES[...].halves(): the shrink runs on a side stream beside the base GEMM, both only
    read x, then the expand adds into the GEMM's output in place: no extra kernel; on the
    CPU the same halves run in order). A mode without what the option needs runs the plain
    path; `overlap` says what each mode actually does. Measure against the plain path."""

    @torch.no_grad()
    def __init__(self, model, lora: Optional[dict] = None, mode: str = "none",
                 max_batch: int = 64, max_seq: int = 2048, dtype: Optional[torch.dtype] = None,
                 device: Union[str, torch.device, None] = None,
                 batch_buckets: Optional[Sequence[int]] = None, attn_bucket: int = ATTN_BUCKET,
                 sampler: str = "auto", attention: str = "auto",
                 fused_elementwise: Union[bool, str] = "auto",
                 lora_overlap: Union[bool, str] = False):
        cfg = model.config
        inner = getattr(model, "model", model)
        w0 = inner.embed_tokens.weight
        self.device = torch.device(device) if device is not None else w0.device
        self.dtype = dtype or w0.dtype
        self.config = cfg
        self.hidden = cfg.hidden_size
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or self.hidden // self.n_heads
        self.inter = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.vocab = cfg.vocab_size
        self.scaling = self.head_dim ** -0.5
        if getattr(cfg, "hidden_act", "silu") not in ("silu", "swish"):
            _fail("model", "a Llama MLP with silu", cfg.hidden_act)
        if max_batch < 1 or max_seq < 2:
            _fail("max_batch / max_seq", ">= 1 / >= 2", (max_batch, max_seq))
        self.max_batch = max_batch
        self.attn_bucket = attn_bucket
        self.max_seq = max_seq
        self.seq_alloc = -(-max_seq // attn_bucket) * attn_bucket      # whole buckets
        dev, dt = self.device, self.dtype

        def W(t):
            return None if t is None else t.detach().to(dev, dt)

        def lin(mod):
            base = getattr(mod, "base_layer", None) or getattr(mod, "base", None) or mod
            return base.weight, base.bias

        self.embed = W(inner.embed_tokens.weight)
        self.norm = W(inner.norm.weight)
        head = lin(model.lm_head)[0] if hasattr(model, "lm_head") else inner.embed_tokens.weight
        tied = head is inner.embed_tokens.weight or head.data_ptr() == inner.embed_tokens.weight.data_ptr()
        self.lm_head = self.embed if tied else W(head)        # tied: one tensor, no copy
        self.layers: list[_Layer] = []
        for blk in inner.layers:
            at, mlp = blk.self_attn, blk.mlp
            (wq, bq), (wk, bk), (wv, bv), (wo, bo) = (lin(at.q_proj), lin(at.k_proj),
                                                      lin(at.v_proj), lin(at.o_proj))
            (wg, bg), (wu, bu), (wd, bd) = lin(mlp.gate_proj), lin(mlp.up_proj), lin(mlp.down_proj)
            cat_b = (lambda *bs: None if bs[0] is None else W(torch.cat(bs)))
            self.layers.append(_Layer(
                ln1=W(blk.input_layernorm.weight), wqkv=W(torch.cat([wq, wk, wv])),
                bqkv=cat_b(bq, bk, bv), wo=W(wo), bo=W(bo),
                ln2=W(blk.post_attention_layernorm.weight), wgu=W(torch.cat([wg, wu])),
                bgu=cat_b(bg, bu), wd=W(wd), bd=W(bd)))
        d, H, Hkv = self.head_dim, self.n_heads, self.n_kv
        shapes = {"q_proj": (self.hidden, H * d), "k_proj": (self.hidden, Hkv * d),
                  "v_proj": (self.hidden, Hkv * d), "o_proj": (H * d, self.hidden),
                  "gate_proj": (self.hidden, self.inter), "up_proj": (self.hidden, self.inter),
                  "down_proj": (self.inter, self.hidden)}
        sites, self.num_adapters = build_lora_sites(lora, len(self.layers), shapes, dev, dt)
        for layer, s in zip(self.layers, sites):
            layer.lora = s
        self.cos, self.sin = _rope_tables(model, cfg, d, self.seq_alloc, dev, dt)
        n_layers = len(self.layers)
        self.k_cache = torch.zeros(n_layers, max_batch, Hkv, self.seq_alloc, d, device=dev, dtype=dt)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.state = _State(max_batch, self.seq_alloc, self.vocab, dev, dt)
        if batch_buckets is None:
            batch_buckets = [1 << i for i in range(max_batch.bit_length()) if 1 << i <= max_batch]
        self.batch_buckets = sorted(set(int(b) for b in batch_buckets if 1 <= b <= max_batch)
                                    | {max_batch})
        if sampler not in ("auto", "triton", "triton_split", "torch"):
            _fail("sampler", "'auto', 'triton', 'triton_split' or 'torch'", sampler)
        gpu_triton = dev.type == "cuda" and triton is not None
        if fused_elementwise == "auto":
            fused_elementwise = gpu_triton
        if not isinstance(fused_elementwise, bool):
            _fail("fused_elementwise", "True, False or 'auto'", repr(fused_elementwise))
        if fused_elementwise and triton is None:
            _fail("fused_elementwise", "triton installed", "no triton")
        self.fused_elementwise = fused_elementwise
        self.sampler = ("triton" if gpu_triton else "torch") if sampler == "auto" else sampler
        if attention == "auto":
            attention = "triton" if gpu_triton else "sdpa"
        if attention not in ("sdpa", "matmul", "triton"):
            _fail("attention", "'auto', 'sdpa', 'matmul' or 'triton'", attention)
        if attention == "triton" and triton is None:
            _fail("attention", "triton installed for 'triton'", "no triton")
        self.attention = attention
        kinds = {False: None, None: None, "off": None, True: "delta", "delta": "delta",
                 "shrink": "shrink"}
        if not isinstance(lora_overlap, (bool, str, type(None))) or lora_overlap not in kinds:
            _fail("lora_overlap", "False, 'off', True / 'delta' or 'shrink'", repr(lora_overlap))
        self.lora_overlap = kinds[lora_overlap]
        # High priority: torch hands out streams of one priority round-robin from one pool of
        # 32, so a default-priority side stream could be the very stream a later capture
        # runs on (then every wait is a no-op and nothing overlaps); this one cannot.
        self._side_stream = torch.cuda.Stream(dev, priority=-1) \
            if dev.type == "cuda" and self.lora_overlap else None
        self.overlap: Optional[str] = None              # what the current mode does (set_mode)
        self._halves = None
        self._metas: dict[int, LoraMeta] = {}          # batch bucket -> static meta
        self._graphs: dict[tuple, "torch.cuda.CUDAGraph"] = {}
        self._pool = None
        self._site_metas: dict[int, tuple] = {}         # bucket -> (assignment, {site: meta})
        self.set_mode(mode)

    # ---------------------------------------------------------------- configuration
    def set_mode(self, mode: str) -> None:
        """Select the registry mode (drops captured graphs; weights and cache stay). An
        unknown name raises ValueError and leaves the current mode in place."""
        new_mode = None if mode == "none" else ENGINE_ONLY_MODES.get(mode) or get_mode(mode)
        if mode == "stacked":
            how = os.environ.get(STACKED_EXPAND_ENV) or \
                (STACKED_EXPAND_CHOICES[0] if self.device.type == "cuda" and triton is not None
                 else "torch")
            if how not in STACKED_EXPAND_CHOICES or (how != "torch" and triton is None):
                _fail(STACKED_EXPAND_ENV, "'triton_norm', 'triton', 'triton_folded' (all need "
                      "triton) or 'torch'", repr(how))
            self._build_stacked()
            self.stacked_expand = how
        self.mode_name = mode
        self.mode = new_mode
        self._stacked = mode == "stacked"
        self._fn = None if self.mode is None else self.mode.resolve()
        self._halves = self.mode.halves() if self.mode is not None and not self._stacked \
            and self.lora_overlap == "shrink" else None
        if self.lora_overlap == "delta" and self._side_stream is not None \
                and self.mode is not None and self.mode.graph_safe and not self._stacked:
            self.overlap = "delta"
        elif self._halves is not None:
            self.overlap = "shrink"
        else:
            self.overlap = None
        self._graphs.clear()
        self._site_metas.clear()

    def graph_capable(self, mode: Optional[str] = None) -> bool:
        """Can the decode step of `mode` (default: the current one) be a CUDA graph here?"""
        name = self.mode_name if mode is None else mode
        return self.device.type == "cuda" and (
            name == "none" or (ENGINE_ONLY_MODES.get(name) or get_mode(name)).graph_safe)

    @torch.no_grad()
    def _build_stacked(self) -> None:
        """Mode "stacked": each LoRA site's W_ext (the base weight with every adapter's A
        rows under it) and Bt, once; the layer's base weight becomes a view of W_ext's
        first N rows, so the other modes read the same numbers and nothing is stored twice
        (but o and down, which the engine shares with the model, are then copies)."""
        for layer in self.layers:
            for site, (wname, bname) in _SITE_WEIGHTS.items():
                s = layer.lora.get(site)
                if s is None or site in layer.stacked:
                    continue
                w, b = getattr(layer, wname), getattr(layer, bname)
                st = build_stacked_site(w, b, s)
                layer.stacked[site] = st
                N = w.shape[0]
                setattr(layer, wname, st.w_ext[:N])
                setattr(layer, bname, None if st.b_ext is None else st.b_ext[:N])

    def _bucket(self, B: int) -> int:
        return next(b for b in self.batch_buckets if b >= B)

    def _len_bucket(self, n: int) -> int:
        return min(-(-n // self.attn_bucket) * self.attn_bucket, self.seq_alloc)

    # ---------------------------------------------------------------- forward pieces
    def _linear_lora(self, x: Tensor, w: Tensor, b: Optional[Tensor], layer: _Layer, site: str,
                     ctx: Optional[_LoraCtx]) -> Tensor:
        """y = x W^T (+ b), then y += the site's multi-LoRA through the registry mode.
        lora_overlap (class docstring): "delta", the mode writes a zeroed delta on a side
        stream while the base GEMM runs (both only read x), and one add joins them;
        "shrink", the mode's shrink runs there instead and its expand adds into y."""
        s = layer.lora.get(site)
        if s is None or ctx is None or self._fn is None:
            return F.linear(x, w, b)
        if self._stacked:
            st, y, v = self._stacked_gemm(x, layer, site)
            if self.stacked_expand != "torch":                           # mask in the kernel
                return ek.stacked_expand(y, v, st.bt, ctx.idx, st.layout, st.slice_starts)
            mask = ctx.masks.get(st.layout)
            if mask is None:                 # once per forward and layout, not per layer
                mask = ctx.masks[st.layout] = ek.stacked_mask(ctx.idx, st.col_adapter, v.dtype)
            return ek.stacked_expand_torch(y, v, st.bt, mask)
        meta = ctx.site_metas[s.key] if ctx.site_metas is not None else ctx.meta
        if self.overlap is None:
            y = F.linear(x, w, b)
            self._fn(y, x, s.A, s.B, ctx.idx, s.scale, s.ranks, meta)
            return y
        if self.overlap == "shrink":
            shrink, expand = self._halves
            if self._side_stream is None:                                 # CPU: in order
                v = shrink(x, s.A, ctx.idx, s.ranks, meta)
                y = F.linear(x, w, b)
            else:
                main = torch.cuda.current_stream(self.device)
                v = self._on_side(main, lambda: shrink(x, s.A, ctx.idx, s.ranks, meta))
                y = F.linear(x, w, b)
                main.wait_stream(self._side_stream)
                # v (a side-stream block) is reused only by a later side allocation, and
                # every site's side work starts by waiting for main (after this expand);
                # x is not reused before main's next op, which follows the shrink's read.
            expand(y, v, s.B, ctx.idx, s.scale, s.ranks, meta)
            return y
        main, side = torch.cuda.current_stream(self.device), self._side_stream

        def lora_delta() -> Tensor:
            delta = torch.zeros(x.shape[0], w.shape[0], dtype=x.dtype, device=x.device)
            self._fn(delta, x, s.A, s.B, ctx.idx, s.scale, s.ranks, meta)
            return delta
        delta = self._on_side(main, lora_delta)
        y = F.linear(x, w, b)
        main.wait_stream(side)
        # No record_stream needed: delta (a side-stream block) is only reused by a later
        # side allocation, and every site's side work starts by waiting for main (after
        # this add); x is not reused before main's next op, which follows side's read.
        return y.add_(delta)

    def _on_side(self, main, work):
        """work() on the side stream once main's queued work (x) is done; on an error the
        side stream rejoins main first (a CUDA-graph capture must end with it joined)."""
        side = self._side_stream
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                return work()
        except BaseException:
            main.wait_stream(side)
            raise

    def _linear_lora_deferred(self, x: Tensor, w: Tensor, b: Optional[Tensor], layer: _Layer,
                              site: str, ctx: Optional[_LoraCtx], slices: int
                              ) -> tuple[Tensor, Optional[tuple]]:
        """(y, None) as _linear_lora gives it, or, for mode "stacked" at a site its expand
        choice folds (STACKED_FOLD_SITES) with `slices` slices, (y without its LoRA,
        (v, bt, idx, layout)): the expand for the next fused kernel to add
        (rope_qkv_to_cache's lora for q/k/v, add_rms_norm's for o / down, stacked_silu_mul
        for gate/up)."""
        st = layer.stacked.get(site)
        if not self._stacked or site not in STACKED_FOLD_SITES[self.stacked_expand] \
                or st is None or ctx is None or st.layout[0] != slices:
            return self._linear_lora(x, w, b, layer, site, ctx), None
        st, y, v = self._stacked_gemm(x, layer, site)
        return y, (v, st.bt, ctx.idx, st.layout)

    @staticmethod
    def _stacked_gemm(x: Tensor, layer: _Layer, site: str) -> tuple:
        """Mode "stacked": the site's one GEMM, x W_ext^T (+ b_ext) [T, N + E], as (its
        StackedSite, y [T, N], v [T, E]): row-strided views of it, which the consumers take."""
        st = layer.stacked[site]
        out = F.linear(x, st.w_ext, st.b_ext)
        N = st.bt.shape[1]
        return st, out[:, :N], out[:, N:]

    def _mlp(self, x: Tensor, layer: _Layer, ctx) -> Tensor:
        h = _rms_norm(x, layer.ln2, self.eps)
        gu = self._linear_lora(h, layer.wgu, layer.bgu, layer, "gate_up", ctx)   # [T, 2 I]
        m = ek.silu_mul_torch(gu)                                                # [T, I]
        return x + self._linear_lora(m, layer.wd, layer.bd, layer, "down", ctx)

    def _qkv(self, x: Tensor, layer: _Layer, ctx, cos: Tensor, sin: Tensor
             ) -> tuple[Tensor, Tensor, Tensor]:
        """x [T, hidden] -> q [T, H, d], k, v [T, Hkv, d], RoPE applied (cos, sin [T, 1, d])."""
        T = x.shape[0]
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        h = _rms_norm(x, layer.ln1, self.eps)
        qkv = self._linear_lora(h, layer.wqkv, layer.bqkv, layer, "qkv", ctx)  # [T, (H + 2 Hkv) d]
        qk = ek.rope_torch(qkv[:, :(H + Hkv) * d].view(T, H + Hkv, d), cos, sin)  # [T, H + Hkv, d]
        v = qkv[:, (H + Hkv) * d:].view(T, Hkv, d)
        return qk[:, :H], qk[:, H:], v

    def _prefill_forward(self, ids: Tensor, pos: Tensor, key_valid: Tensor, ctx: Optional[_LoraCtx],
                         write_cache: bool, last_only: bool) -> Tensor:
        """ids, pos [B, S], key_valid [B, S] bool -> logits [B, V] (last_only) or [B, S, V].
        With write_cache, K/V of rows 0..B-1 go to cache slots 0..S-1."""
        B, S = ids.shape
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        G = H // Hkv
        flat = pos.reshape(-1)
        cos, sin = self.cos[flat][:, None], self.sin[flat][:, None]        # [T, 1, d]
        ar = torch.arange(S, device=ids.device)
        causal = ar[None, :] <= ar[:, None]                                # [S(q), S(k)]
        # pad queries may see themselves only: no fully masked row, hence no NaN anywhere
        allowed = (causal[None] & key_valid[:, None, :]) | torch.eye(S, dtype=torch.bool,
                                                                        device=ids.device)[None]
        allowed = allowed[:, None]                                         # [B, 1, S, S]
        if ctx is not None:
            ctx.masks.clear()
        x = F.embedding(ids.reshape(-1), self.embed)                       # [T, hidden]
        for li, layer in enumerate(self.layers):
            q, k, v = self._qkv(x, layer, ctx, cos, sin)
            q = q.reshape(B, S, H, d).transpose(1, 2)                      # [B, H, S, d]
            k = k.reshape(B, S, Hkv, d).transpose(1, 2)                    # [B, Hkv, S, d]
            v = v.reshape(B, S, Hkv, d).transpose(1, 2)
            if write_cache:
                self.k_cache[li, :B, :, :S] = k
                self.v_cache[li, :B, :, :S] = v
            if G > 1:
                k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.scaling)
            a = a.transpose(1, 2).reshape(B * S, H * d)                    # [T, H d]
            x = self._mlp(x + self._linear_lora(a, layer.wo, layer.bo, layer, "o", ctx), layer, ctx)
        if last_only:
            x = x.view(B, S, -1)[:, -1]                                    # [B, hidden]
        x = _rms_norm(x, self.norm, self.eps)
        logits = F.linear(x, self.lm_head)
        return logits if last_only else logits.view(B, S, -1)

    def _decode_forward(self, Bb: int, Sb: int, ctx: Optional[_LoraCtx]) -> Tensor:
        """One token per row for rows 0..Bb-1 from the static state; attends over cache
        slots [0, Sb). Returns logits [Bb, V]. No host sync, static shapes."""
        st = self.state
        if ctx is not None:
            ctx.masks.clear()        # "stacked": masks from idx inside this step (and graph)
        H, Hkv, d = self.n_heads, self.n_kv, self.head_dim
        G = H // Hkv
        start = st.start[:Bb]
        pos = st.cur - start                                               # [Bb]
        fused = self.fused_elementwise
        if not fused:
            cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]      # [Bb, 1, d]
        if self.attention != "triton":
            bias = ek.decode_bias(st.slots[:Sb], start, st.cur, self.dtype)  # [Bb, 1, 1, Sb]
        x = F.embedding(st.tok[:Bb], self.embed)                           # [Bb, hidden]
        if fused:   # h: the next sublayer's normed input; x is updated in place
            h = ek.add_rms_norm(x, None, self.layers[0].ln1, self.eps)
        for li, layer in enumerate(self.layers):
            if fused:        # "stacked": a folded site's expand is inside the next kernel
                qkv, qkv_lora = self._linear_lora_deferred(h, layer.wqkv, layer.bqkv, layer,
                                                           "qkv", ctx, 3)
                q = ek.rope_qkv_to_cache(qkv, self.cos, self.sin, pos, self.k_cache[li],
                                         self.v_cache[li], st.cur, H, Hkv, qkv_lora)  # [Bb, H, d]
            else:
                q, k, v = self._qkv(x, layer, ctx, cos, sin)               # [Bb, H or Hkv, d]
                self.k_cache[li, :Bb].index_copy_(2, st.cur, k[:, :, None, :])
                self.v_cache[li, :Bb].index_copy_(2, st.cur, v[:, :, None, :])
            if self.attention == "triton":                 # only slots start[b]..cur are read
                a = ek.decode_attention(q, self.k_cache[li], self.v_cache[li], start, st.cur,
                                        Sb, self.scaling)                   # [Bb, H d]
            else:
                K = self.k_cache[li, :Bb, :, :Sb]                          # [Bb, Hkv, Sb, d]
                Vc = self.v_cache[li, :Bb, :, :Sb]
                qg = q.reshape(Bb, Hkv, G, d)           # the G query heads of a KV head = rows
                if self.attention == "sdpa":
                    a = F.scaled_dot_product_attention(qg, K, Vc, attn_mask=bias, scale=self.scaling)
                else:
                    s = torch.matmul(qg, K.transpose(-1, -2)).float() * self.scaling + bias
                    a = torch.matmul(torch.softmax(s, dim=-1).to(self.dtype), Vc)
                a = a.reshape(Bb, H * d)                                   # [Bb, H d]
            if fused:
                o, o_lora = self._linear_lora_deferred(a, layer.wo, layer.bo, layer, "o", ctx, 1)
                h = ek.add_rms_norm(x, o, layer.ln2, self.eps, o_lora)    # x += o
                gu, gu_lora = self._linear_lora_deferred(h, layer.wgu, layer.bgu, layer,
                                                         "gate_up", ctx, 2)
                m = ek.silu_mul(gu) if gu_lora is None else ek.stacked_silu_mul(gu, *gu_lora)
                dn, dn_lora = self._linear_lora_deferred(m, layer.wd, layer.bd, layer, "down",
                                                         ctx, 1)
                nxt = self.layers[li + 1].ln1 if li + 1 < len(self.layers) else self.norm
                h = ek.add_rms_norm(x, dn, nxt, self.eps, dn_lora)        # x += down
            else:
                o = self._linear_lora(a, layer.wo, layer.bo, layer, "o", ctx)
                x = self._mlp(x + o, layer, ctx)
        if not fused:
            h = _rms_norm(x, self.norm, self.eps)
        return F.linear(h, self.lm_head)                                   # [Bb, V]

    def _sample(self, logits: Tensor, greedy: bool) -> Tensor:
        st = self.state
        if greedy:
            return logits.argmax(-1)
        if self.sampler in ("triton", "triton_split"):
            return sample_top_p_triton(logits, st.params, st.seed, st.step,
                                       split=self.sampler == "triton_split")
        return sample_top_p_torch(logits, st.params, st.seed, st.step)

    def _emit(self, nxt: Tensor, rows: int) -> None:
        """EOS bookkeeping and output of sampled tokens nxt [rows] (rows 0..rows-1)."""
        st = self.state
        done = st.done[:rows]
        nxt = torch.where(done, st.pad, nxt)                               # ended rows: pad
        st.out[:rows].index_copy_(1, st.step, nxt[:, None])
        done |= (nxt[:, None] == st.eos[None, :]).any(-1)
        st.tok[:rows] = nxt

    def _decode_step(self, Bb: int, Sb: int, greedy: bool, keep_logits: bool,
                     ctx: Optional[_LoraCtx]) -> None:
        logits = self._decode_forward(Bb, Sb, ctx)
        if keep_logits:
            self.state.last_logits[:Bb].copy_(logits)
        self._emit(self._sample(logits, greedy), Bb)
        self.state.cur.add_(1)
        self.state.step.add_(1)

    # ---------------------------------------------------------------- LoRA context
    def _decode_ctx(self, Bb: int, idx_rows: list[int], graph: bool) -> Optional[_LoraCtx]:
        """Device metadata for the decode batch (rows sorted, bucket padding = -1)."""
        if self.mode is None:
            return None
        idx_host = torch.tensor(idx_rows + [-1] * (Bb - len(idx_rows)), dtype=torch.int32)
        if not self.mode.graph_safe:                  # loop, gbmm: host meta, eager step
            meta = host_meta(idx_host, self.device)
            return _LoraCtx(meta.idx, meta)
        if Bb not in self._metas:
            self._metas[Bb] = make_static_meta(Bb, self.device, idx=self.state.idx[:Bb])
        meta = self._metas[Bb]
        fill_static_meta(meta, idx_host)
        site_metas = None
        if self.mode.prepare is not None:             # cheat_bmm: gathered weights per site
            assign = tuple(idx_host.tolist())
            old = self._site_metas.get(Bb)
            if old is None or old[0] != assign:
                for key in [k for k in self._graphs if k[0] == Bb]:
                    del self._graphs[key]             # they captured the old gathered tensors
                self._site_metas.pop(Bb, None)
                dummy = torch.empty(0, device=self.device)
                sm = {s.key: self.mode.make_meta(dummy, s.A, s.B, meta.idx, s.scale, s.ranks)
                      for layer in self.layers for s in layer.lora.values()}
                self._site_metas[Bb] = (assign, sm)
            site_metas = self._site_metas[Bb][1]
        return _LoraCtx(meta.idx, meta, site_metas)

    def _prefill_ctx(self, idx_tokens: Tensor) -> Optional[_LoraCtx]:
        """idx_tokens [T] int32 on the host (pads = -1)."""
        if self.mode is None:
            return None
        meta = host_meta(idx_tokens, self.device)
        if self.mode.prepare is not None:
            meta = None                               # cheat_bmm gathers per call (not stored)
        return _LoraCtx(idx_tokens.to(self.device), meta)

    # ---------------------------------------------------------------- graphs
    def _capture(self, Bb: int, Sb: int, greedy: bool, keep_logits: bool, ctx) -> None:
        key = (Bb, Sb, greedy, keep_logits)
        if key in self._graphs:
            return
        st = self.state
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # The warm-up steps write cache slot 0..1 and output columns 0..1: generate()
        # resets the state and the prefill rewrites the cache afterwards.
        st.cur.zero_(); st.step.zero_(); st.start.zero_(); st.tok.zero_(); st.done.zero_()
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            for _ in range(2):                        # JIT, autotune, cuBLAS handles, lazy init
                self._decode_step(Bb, Sb, greedy, keep_logits, ctx)
        s.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool, stream=s):
            self._decode_step(Bb, Sb, greedy, keep_logits, ctx)
        torch.cuda.current_stream(self.device).wait_stream(s)
        self._graphs[key] = g

    # ---------------------------------------------------------------- public API
    @torch.inference_mode()
    def forward_logits(self, input_ids, adapter_idx: Optional[Sequence[int]] = None,
                       attention_mask: Optional[Tensor] = None,
                       position_ids: Optional[Tensor] = None) -> Tensor:
        """Full-prefill logits [B, S, V] fp32 (the oracle path; the KV cache is not touched).
        input_ids: [B, S] tensor (with attention_mask [B, S], 1 = token) or a list of token
        lists (left-padded here). position_ids default: cumsum(mask) - 1, as in generation.
        adapter_idx: adapter per request, -1 = none (default: none)."""
        if not isinstance(input_ids, Tensor):
            ids, mask = self._left_pad(input_ids, 0)
        else:
            ids = input_ids.to(self.device, torch.int64)
            mask = (torch.ones_like(ids) if attention_mask is None
                    else attention_mask.to(self.device, torch.int64))
        B, S = ids.shape
        if S > self.seq_alloc:
            _fail("input_ids", f"at most {self.seq_alloc} positions (max_seq)", S)
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if position_ids is None \
            else position_ids.to(self.device, torch.int64)
        adapter_idx = self._check_adapters(adapter_idx, B)
        idx_tok = torch.tensor(adapter_idx, dtype=torch.int32)[:, None].expand(B, S)
        idx_tok = torch.where(mask.cpu().bool(), idx_tok, -1).reshape(-1)
        ctx = self._prefill_ctx(idx_tok)
        return self._prefill_forward(ids, pos, mask.bool(), ctx, write_cache=False,
                                     last_only=False).float()

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], adapter_idx: Optional[Sequence[int]] = None,
                 max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, ignore_eos: bool = False,
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: int = 0,
                 use_graph: bool = True, progress: bool = False, keep_logits: bool = False,
                 check_sync: bool = False) -> tuple[list[list[int]], dict]:
        """Generate max_new_tokens per request (fewer when every request has hit EOS,
        checked every EOS_CHECK_EVERY steps). Returns (new tokens per request, each cut
        after its first EOS unless ignore_eos; stats). stats: prefill_s, decode_s, time_s,
        capture_s (graph capture, untimed), steps (decode steps after the prefill),
        total_tokens, ms_per_step, tokens_per_s (total_tokens / time_s),
        decode_tokens_per_s, graph, batch_bucket, peak_memory_gb; with keep_logits the
        last step's logits 'last_logits' [B, V] fp32. temperature 0 = greedy.
        check_sync: torch.cuda.set_sync_debug_mode('error') around the decode loop."""
        B = len(prompts)
        if not 1 <= B <= self.max_batch:
            _fail("prompts", f"1..{self.max_batch} requests (max_batch)", B)
        lens = [len(p) for p in prompts]
        if min(lens) < 1:
            _fail("prompts", "at least one token per request", f"an empty prompt (request {lens.index(0)})")
        S = max(lens)
        if max_new_tokens < 1 or S + max_new_tokens > self.max_seq:
            _fail("max_new_tokens", f"1..{self.max_seq - S} (prompt {S} + new <= max_seq "
                  f"{self.max_seq})", max_new_tokens)
        if temperature < 0 or not 0 < top_p <= 1:
            _fail("temperature / top_p", ">= 0 / in (0, 1]", (temperature, top_p))
        adapter_idx = self._check_adapters(adapter_idx, B)
        eos = self._eos_ids(eos_token_id)
        check_eos = not ignore_eos and len(eos) > 0
        greedy = temperature == 0
        graph = use_graph and self.graph_capable()
        st, dev = self.state, self.device

        order = sorted(range(B), key=lambda b: adapter_idx[b])    # stable: adapter runs
        Bb = self._bucket(B)
        rows_idx = [adapter_idx[b] for b in order]
        rows_prompts = [prompts[b] for b in order]
        t_cap = time.perf_counter()
        ctx = self._decode_ctx(Bb, rows_idx, graph)
        last_cur = S + max_new_tokens - 2                         # slot of the last fed token
        if graph:
            for Sb in sorted({self._len_bucket(c + 1) for c in range(S, last_cur + 1)}):
                self._capture(Bb, Sb, greedy, keep_logits, ctx)
        self._sync()
        capture_s = time.perf_counter() - t_cap

        # Fill the static state for this batch (host -> device copies, before timing).
        ids, mask = self._left_pad(rows_prompts, pad_token_id)
        pads = [S - n for n in (len(p) for p in rows_prompts)] + [S] * (Bb - B)
        st.start[:Bb].copy_(torch.tensor(pads, dtype=torch.int64))
        st.eos.fill_(-1)
        if check_eos:
            st.eos[:len(eos)].copy_(torch.tensor(eos, dtype=torch.int64))
        st.pad.fill_(pad_token_id)
        st.params.copy_(torch.tensor([1.0 / temperature if temperature > 0 else 1.0, top_p]))
        st.seed.fill_(seed)
        st.done.zero_()
        st.tok.fill_(pad_token_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        idx_tok = torch.tensor(rows_idx, dtype=torch.int32)[:, None].expand(B, S)
        idx_tok = torch.where(mask.cpu().bool(), idx_tok, -1).reshape(-1)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)

        self._sync()
        t0 = time.perf_counter()
        pctx = self._prefill_ctx(idx_tok)
        logits = self._prefill_forward(ids, pos, mask.bool(), pctx, write_cache=True,
                                       last_only=True)                   # [B, V]
        st.step.zero_()
        self._emit(self._sample(logits, greedy), B)
        if keep_logits:
            st.last_logits[:B].copy_(logits)
        st.step.fill_(1)
        st.cur.fill_(S)
        self._sync()
        t1 = time.perf_counter()

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=max_new_tokens, initial=1, desc=f"generate {self.mode_name}",
                       unit="tok", leave=False)
        steps = 0
        check_sync = check_sync and dev.type == "cuda"
        if check_sync:
            torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(1, max_new_tokens):
                Sb = self._len_bucket(S + step)                  # slots 0 .. S + step - 1
                if graph:
                    self._graphs[(Bb, Sb, greedy, keep_logits)].replay()
                else:
                    self._decode_step(Bb, Sb, greedy, keep_logits, ctx)
                steps = step
                if bar is not None:
                    bar.update(1)
                if check_eos and step % EOS_CHECK_EVERY == 0 and bool(st.done[:B].all()):
                    break
        finally:
            if check_sync:
                torch.cuda.set_sync_debug_mode("default")
            if bar is not None:
                bar.close()
        self._sync()
        t2 = time.perf_counter()

        out = st.out[:B, :steps + 1].cpu()                       # [B, n] sorted rows
        tokens: list[list[int]] = [[]] * B
        for r, b in enumerate(order):
            row = out[r].tolist()
            if check_eos:
                cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
                row = row[:cut]
            tokens[b] = row
        total = B * (steps + 1)
        stats = dict(mode=self.mode_name, graph=graph, batch_bucket=Bb, prefill_s=t1 - t0,
                     decode_s=t2 - t1, time_s=t2 - t0, capture_s=capture_s, steps=steps,
                     total_tokens=total, ms_per_step=1e3 * (t2 - t1) / max(steps, 1),
                     tokens_per_s=total / (t2 - t0),
                     decode_tokens_per_s=B * steps / (t2 - t1) if steps else float("nan"),
                     sampler="greedy" if greedy else self.sampler)
        if dev.type == "cuda":
            stats["peak_memory_gb"] = torch.cuda.max_memory_allocated(dev) / 2 ** 30
        if keep_logits:
            inv = [order.index(b) for b in range(B)]
            stats["last_logits"] = st.last_logits[inv].float().cpu()
        return tokens, stats

    # ---------------------------------------------------------------- helpers
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _left_pad(self, prompts: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
        S = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), S), pad, dtype=torch.int64)
        mask = torch.zeros((len(prompts), S), dtype=torch.int64)
        for b, p in enumerate(prompts):
            if len(p) == 0:
                _fail("prompts", "at least one token per request", f"an empty prompt (request {b})")
            ids[b, S - len(p):] = torch.as_tensor(list(p), dtype=torch.int64)
            mask[b, S - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _check_adapters(self, adapter_idx, B: int) -> list[int]:
        if adapter_idx is None:
            return [-1] * B
        a = [int(i) for i in adapter_idx]
        if len(a) != B:
            _fail("adapter_idx", f"{B} entries (one per request)", len(a))
        bad = [i for i in a if not -1 <= i < self.num_adapters]
        if bad:
            _fail("adapter_idx", f"values in [-1, {self.num_adapters - 1}] "
                  f"({self.num_adapters} adapters loaded)", bad[0])
        return a

    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is None:
            eos_token_id = getattr(self.config, "eos_token_id", None)
        if eos_token_id is None:
            return []
        ids = [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(e) for e in eos_token_id]
        if len(ids) > MAX_EOS_IDS:
            _fail("eos_token_id", f"at most {MAX_EOS_IDS} ids", len(ids))
        return ids
