"""multilora_engine: logits against Hugging Face (no LoRA) and PEFT's mixed-batch forward
(every mode, prefill and decode paths), greedy generation against HF generate, the
sampler (reproducible, exact top-p, Triton == torch), the LoRA dict checks.

CPU tier: a tiny random LlamaForCausalLM in fp32 (one config with llama3 RoPE scaling, one
with tied embeddings); Triton modes run in the interpreter (conftest). GPU tier
(pytest -m gpu): Llama-3-8B shapes with 2 layers in bf16, CUDA-graph decode for every
graph-capable mode against PEFT, graph replay == eager step, no host sync in the loop.
"""
import copy
import math

import pytest
import torch

import multilora_engine as me
from multilora_impl import MODES, TOLERANCE, logits_bound, relative_error

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, max_position_embeddings=256,
            initializer_range=0.1, bos_token_id=1, eos_token_id=2, pad_token_id=0)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# registry modes that run on the CPU, and the engine-only "stacked" (A stacked under W)
CPU_MODES = [m for m, e in MODES.items() if m != "none" and not e.needs_cuda] + ["stacked"]
# 5 requests, unequal prompts; "__base__" = no adapter. Sorting by adapter reorders them.
REQ_ADAPTERS = ["a0", "__base__", "a2", "a1", "a0"]
PROMPT_LENS = [7, 3, 9, 5, 6]
# (rank, alpha, rslora, targets): mixed ranks and target sets, so fused sites have holes
ADAPTERS = {"a0": (4, 8, False, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                 "down_proj"]),
            "a1": (8, 8, True, ["q_proj", "v_proj", "down_proj"]),
            "a2": (2, 6, False, ["k_proj", "o_proj", "gate_proj", "up_proj"])}


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py


def make_model(kind: str = "llama3", device="cpu", dtype=torch.float32, seed: int = 0, **over):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = dict(TINY, **over)
    if kind == "llama3":
        cfg["rope_scaling"] = dict(LLAMA3_ROPE)
    elif kind == "tied":
        cfg["tie_word_embeddings"] = True
    torch.manual_seed(seed)
    with torch.device(device):
        m = LlamaForCausalLM(LlamaConfig(**cfg))
    return m.to(dtype).eval()


def make_prompts(lens, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def left_pad(prompts, device="cpu"):
    S = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), S, dtype=torch.long)
    mask = torch.zeros(len(prompts), S, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, S - len(p):] = torch.tensor(p)
        mask[b, S - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def masked_error(out, ref, mask):
    sel = mask.bool().cpu()
    return relative_error(out.float().cpu()[sel], ref.float().cpu()[sel])


def make_peft(model, seed=5, b_std=0.3):
    """PeftModel with ADAPTERS (random nonzero A and B) and the engine's lora dict built
    from its weights, padded entries past each module's rank poisoned with NaN."""
    from peft import LoraConfig, get_peft_model
    pm = None
    for name, (r, alpha, rs, targets) in ADAPTERS.items():
        cfg = LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=targets,
                         lora_dropout=0.0, init_lora_weights=False)
        if pm is None:
            pm = get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    pm.eval()
    names = list(ADAPTERS)
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for path, mod in pm.named_modules():
        if not hasattr(mod, "lora_A") or not len(mod.lora_A):
            continue
        key = path.replace("base_model.model.", "", 1)
        h_in, h_out = mod.base_layer.in_features, mod.base_layer.out_features
        present = [n for n in names if n in mod.lora_A]
        r_max = max(mod.lora_A[n].weight.shape[0] for n in present)
        w = mod.base_layer.weight
        A = torch.full((len(names), r_max, h_in), float("nan"), dtype=w.dtype)
        B = torch.full((len(names), h_out, r_max), float("nan"), dtype=w.dtype)
        scale = torch.zeros(len(names))
        ranks = torch.zeros(len(names), dtype=torch.int32)
        with torch.no_grad():
            for i, n in enumerate(names):
                if n not in mod.lora_A:
                    continue
                a, b = mod.lora_A[n].weight, mod.lora_B[n].weight
                r = a.shape[0]
                a.copy_(torch.randn(a.shape, generator=g) / math.sqrt(h_in))
                b.copy_(torch.randn(b.shape, generator=g) * b_std / math.sqrt(r))
                A[i, :r], B[i, :, :r] = a.cpu(), b.cpu()
                scale[i], ranks[i] = mod.scaling[n], r
        lora[key] = (A.to(w.device), B.to(w.device), scale.to(w.device), ranks.to(w.device))
    return pm, lora


@pytest.fixture(scope="module")
def peft_setup():
    base = make_model("llama3")
    model = copy.deepcopy(base)
    pm, lora = make_peft(model)
    prompts = make_prompts(PROMPT_LENS, TINY["vocab_size"])
    adapter_idx = [list(ADAPTERS).index(n) if n in ADAPTERS else -1 for n in REQ_ADAPTERS]
    return base, pm, lora, prompts, adapter_idx


def peft_logits(pm, prompts, names):
    ids, mask, pos = left_pad(prompts, next(pm.parameters()).device)
    with torch.no_grad():
        out = pm(input_ids=ids, attention_mask=mask, position_ids=pos, adapter_names=names).logits
    return out.float(), mask


# ---------------------------------------------------------------------------------------
# Model: RoPE and logits without LoRA
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("rope", [None, LLAMA3_ROPE, {"rope_type": "linear", "factor": 4.0}])
def test_rope_inv_freq_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = LlamaConfig(**dict(TINY, rope_scaling=rope, rope_theta=5e5))
    inv, scaling = me.rope_inv_freq(cfg, 16)
    ref = LlamaRotaryEmbedding(cfg)
    assert torch.equal(inv, ref.inv_freq) and scaling == ref.attention_scaling


@pytest.mark.parametrize("kind", ["llama3", "tied"])
def test_logits_match_hf_no_lora(kind):
    m = make_model(kind)
    if kind == "tied":
        assert m.lm_head.weight is m.model.embed_tokens.weight
    eng = me.MultiLoraEngine(m, None, "none", max_batch=8, max_seq=64)
    prompts = make_prompts([7, 2, 12, 5], TINY["vocab_size"], seed=2)
    ids, mask, pos = left_pad(prompts)
    with torch.no_grad():
        ref = m(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    out = eng.forward_logits(ids, None, mask)
    assert out.shape == ref.shape
    assert masked_error(out, ref, mask) <= 1e-5
    out2 = eng.forward_logits(prompts)                   # list input: same left padding
    assert torch.equal(out2, out)


@pytest.mark.parametrize("kind,attention", [("llama3", "sdpa"), ("tied", "sdpa"),
                                            ("llama3", "matmul")])
def test_greedy_generation_matches_hf_generate(kind, attention):
    m = make_model(kind)
    eng = me.MultiLoraEngine(m, None, "none", max_batch=8, max_seq=64, attention=attention)
    prompts = make_prompts([7, 2, 12, 5], TINY["vocab_size"], seed=3)
    toks, stats = eng.generate(prompts, max_new_tokens=10, ignore_eos=True)
    ids, mask, _ = left_pad(prompts)
    with torch.no_grad():
        hf = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert toks == hf[:, ids.shape[1]:].tolist()
    assert stats["steps"] == 9 and stats["total_tokens"] == 40 and not stats["graph"]


def test_eos_cuts_rows_and_stops_early():
    m = make_model("tied")
    eng = me.MultiLoraEngine(m, None, "none", max_batch=4, max_seq=128)
    prompts = make_prompts([4, 6, 5], TINY["vocab_size"], seed=4)
    full, _ = eng.generate(prompts, max_new_tokens=12, ignore_eos=True)
    eos = full[0][3]                                     # request 0 ends at its 4th token
    cut, _ = eng.generate(prompts, max_new_tokens=12, eos_token_id=eos)
    for f, c in zip(full, cut):
        n = f.index(eos) + 1 if eos in f else len(f)
        assert c == f[:n]
    # every request ends at its first token: the loop stops at the first check
    all_eos = sorted({t[0] for t in full})
    toks, stats = eng.generate(prompts, max_new_tokens=3 * me.EOS_CHECK_EVERY, eos_token_id=all_eos)
    assert all(len(t) == 1 for t in toks)
    assert stats["steps"] == me.EOS_CHECK_EVERY


# ---------------------------------------------------------------------------------------
# LoRA: the PEFT oracle, prefill (forward_logits) and decode (generate) paths
# ---------------------------------------------------------------------------------------
def test_peft_oracle_sees_lora(peft_setup):
    """The adapters change the logits a lot (else the oracle tests could not fail)."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    ref, mask = peft_logits(pm, prompts, REQ_ADAPTERS)
    eng = me.MultiLoraEngine(base, lora, "none", max_batch=8, max_seq=64)
    none = eng.forward_logits(prompts, adapter_idx)
    assert masked_error(none, ref, mask) > 0.05
    # rows without adapter equal the base model, in PEFT and here
    assert masked_error(none[1:2], ref[1:2], mask[1:2]) <= 1e-5


@pytest.mark.parametrize("mode", CPU_MODES)
def test_logits_match_peft(peft_setup, mode):
    base, pm, lora, prompts, adapter_idx = peft_setup
    ref, mask = peft_logits(pm, prompts, REQ_ADAPTERS)
    eng = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64)
    out = eng.forward_logits(prompts, adapter_idx)
    assert torch.isfinite(out).all()                     # NaN pads were zeroed, not read
    assert masked_error(out, ref, mask) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode", ["bgmv_triton", "sgmv_triton", "gbmm"])
def test_shrink_overlap_equals_plain_path(peft_setup, mode):
    """lora_overlap="shrink" runs the mode's halves (shrink, base GEMM, expand; on the CPU in
    that order, on a GPU the shrink on a side stream): the same kernels as the plain path,
    so the same logits bit for bit, and PEFT's within tolerance. A mode without halves
    (gbmm) runs the plain path and says so."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    plain = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64)
    split = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64, lora_overlap="shrink")
    assert split.overlap == ("shrink" if MODES[mode].halves() else None) and plain.overlap is None
    assert (split.overlap is None) == (mode == "gbmm")
    kw = dict(max_new_tokens=3, ignore_eos=True, keep_logits=True)
    t1, s1 = plain.generate(prompts, adapter_idx, **kw)
    t2, s2 = split.generate(prompts, adapter_idx, **kw)
    assert t1 == t2 and torch.equal(s1["last_logits"], s2["last_logits"])
    seqs = [p + t[:-1] for p, t in zip(prompts, t2)]
    ref, _ = peft_logits(pm, seqs, REQ_ADAPTERS)
    assert relative_error(s2["last_logits"], ref[:, -1]) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode,attention", [("none", "sdpa"), ("bgmv_triton", "sdpa"),
                                            ("bgmv_triton", "triton"), ("stacked", "triton")])
def test_fused_elementwise_and_split_sampler_match_plain_path(peft_setup, mode, attention):
    """fused_elementwise (engine_kernels: residual add + RMSNorm, RoPE + K/V cache write,
    SiLU * up, in the interpreter here), the split sampler and the Triton decode attention:
    greedy tokens equal, last decode logits within fp32 rounding of the plain path and
    within tolerance of PEFT; sampled tokens equal the plain sampler's (same seed)."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    plain = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64)
    fused = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64, attention=attention,
                               fused_elementwise=True, sampler="triton_split")
    kw = dict(max_new_tokens=4, ignore_eos=True, keep_logits=True)
    t1, s1 = plain.generate(prompts, adapter_idx, **kw)
    t2, s2 = fused.generate(prompts, adapter_idx, **kw)
    assert t1 == t2
    assert relative_error(s2["last_logits"], s1["last_logits"]) <= 1e-5
    if mode != "none":
        seqs = [p + t[:-1] for p, t in zip(prompts, t2)]
        ref, _ = peft_logits(pm, seqs, REQ_ADAPTERS)
        assert relative_error(s2["last_logits"], ref[:, -1]) <= TOLERANCE[torch.float32]
    kw = dict(max_new_tokens=3, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)
    assert plain.generate(prompts, adapter_idx, **kw)[0] == fused.generate(prompts, adapter_idx, **kw)[0]
    with pytest.raises(ValueError, match="^fused_elementwise"):
        me.MultiLoraEngine(base, lora, mode, max_batch=2, max_seq=16, fused_elementwise=1)


@pytest.mark.parametrize("how", ["triton_folded", "triton_norm", "triton"])
def test_stacked_folded_expand_matches_torch_form(peft_setup, monkeypatch, how):
    """Mode "stacked" in the fused decode step with the Triton expand (interpreter):
    "triton_folded" folds every expand (q/k/v into the RoPE kernel, o / down into
    add_rms_norm, gate/up into stacked_silu_mul), "triton_norm" the o / down ones only,
    "triton" launches stacked_expand at every site; all give the torch form's greedy
    tokens, its last decode logits within fp32 rounding, and PEFT's logits; sampled
    tokens equal too."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, "torch")
    ref_eng = me.MultiLoraEngine(base, lora, "stacked", max_batch=8, max_seq=64,
                                 fused_elementwise=True, attention="triton")
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, how)
    eng = me.MultiLoraEngine(base, lora, "stacked", max_batch=8, max_seq=64,
                             fused_elementwise=True, attention="triton")
    assert (ref_eng.stacked_expand, eng.stacked_expand) == ("torch", how)
    calls = []
    for name in ("stacked_expand", "stacked_silu_mul"):
        orig = getattr(me.ek, name)
        monkeypatch.setattr(me.ek, name,
                            lambda *a, _o=orig, _n=name, **k: calls.append(_n) or _o(*a, **k))
    kw = dict(max_new_tokens=4, ignore_eos=True, keep_logits=True)
    t1, s1 = ref_eng.generate(prompts, adapter_idx, **kw)
    assert not calls                                   # the torch form uses neither kernel
    t2, s2 = eng.generate(prompts, adapter_idx, **kw)
    assert ("stacked_silu_mul" in calls) == (how == "triton_folded")     # folded only there
    prefill = sum(len(layer.lora) for layer in eng.layers)      # one expand per site
    folded = me.STACKED_FOLD_SITES[how]
    per_step = sum(len([s for s in layer.lora if s not in folded]) for layer in eng.layers)
    assert per_step < prefill or how == "triton"
    decode_steps = kw["max_new_tokens"] - 1                     # the first token: prefill
    assert calls.count("stacked_expand") == prefill + decode_steps * per_step
    assert t1 == t2
    assert relative_error(s2["last_logits"], s1["last_logits"]) <= 1e-5
    seqs = [p + t[:-1] for p, t in zip(prompts, t2)]
    ref, _ = peft_logits(pm, seqs, REQ_ADAPTERS)
    assert relative_error(s2["last_logits"], ref[:, -1]) <= TOLERANCE[torch.float32]
    kw = dict(max_new_tokens=3, ignore_eos=True, temperature=0.8, top_p=0.9, seed=3)
    assert ref_eng.generate(prompts, adapter_idx, **kw)[0] == \
        eng.generate(prompts, adapter_idx, **kw)[0]


def test_split_sampler_equals_torch_across_chunks():
    """Many chunks per row (small block_v), a partial last chunk and a cross-chunk tie for
    the argmax: the split Triton sampler draws the torch sampler's tokens."""
    g = torch.Generator().manual_seed(7)
    for V in (300, 1000):
        logits = torch.randn(5, V, generator=g) * 2.0
        logits[1, 17] = logits[1, 900 % V] = 9.0
        for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.05)]:
            for step in (0, 17):
                args = (logits, _params(temperature, top_p), torch.tensor([123]), torch.tensor([step]))
                out = me.sample_top_p_triton(*args, split=True, block_v=32)
                assert torch.equal(out, me.sample_top_p_torch(*args)), (V, temperature, top_p, step)
        assert me.sampler_split(5, V, 32) > 4                # the split path really ran


def test_lora_overlap_option_checked(peft_setup):
    base, _, lora, _, _ = peft_setup
    with pytest.raises(ValueError, match="^lora_overlap"):
        me.MultiLoraEngine(base, lora, "bgmv_triton", max_batch=2, max_seq=16, lora_overlap="x")


def test_stacked_mode_shares_weights_and_follows_idx(peft_setup):
    """Mode "stacked": the base weights become views of the stacked ones (the other modes
    then give bitwise the logits of a fresh engine), and two assignments in a row each
    give gbmm's logits (the masks come from idx in every forward, none is kept)."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    eng = me.MultiLoraEngine(base, lora, "stacked", max_batch=8, max_seq=64)
    layer = eng.layers[0]
    for site, (wname, _) in me._SITE_WEIGHTS.items():
        if site in layer.stacked:
            w = getattr(layer, wname)
            assert w.data_ptr() == layer.stacked[site].w_ext.data_ptr()
            assert layer.stacked[site].w_ext.shape[0] - w.shape[0] == \
                layer.stacked[site].bt.shape[0]
    ref_eng = me.MultiLoraEngine(base, lora, "gbmm", max_batch=8, max_seq=64)
    other = [(a + 1) % 3 if a >= 0 else -1 for a in adapter_idx]
    other[0] = -1
    kw = dict(max_new_tokens=3, ignore_eos=True, keep_logits=True)
    for assign in (adapter_idx, other, adapter_idx):
        t1, s1 = eng.generate(prompts, assign, **kw)
        t2, s2 = ref_eng.generate(prompts, assign, **kw)
        assert t1 == t2, assign
        assert relative_error(s1["last_logits"], s2["last_logits"]) <= TOLERANCE[torch.float32]
    eng.set_mode("none")
    fresh = me.MultiLoraEngine(base, lora, "none", max_batch=8, max_seq=64)
    assert torch.equal(eng.forward_logits(prompts, adapter_idx),
                       fresh.forward_logits(prompts, adapter_idx))
    with pytest.raises(ValueError, match="inside MultiLoraEngine only"):
        me.ENGINE_ONLY_MODES["stacked"](None, None, None, None, None, None)


def test_stacked_mode_triton_expand_in_the_engine(peft_setup, monkeypatch):
    """MULTILORA_STACKED_EXPAND=triton (here in the interpreter, outside the fused step): the
    engine's "stacked" LoRA through engine_kernels.stacked_expand gives PEFT's logits and
    greedy tokens, as the torch form does; a bad value names the variable."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, "triton")
    eng = me.MultiLoraEngine(base, lora, "stacked", max_batch=8, max_seq=64)
    assert eng.stacked_expand == "triton"
    ref, mask = peft_logits(pm, prompts, REQ_ADAPTERS)
    assert masked_error(eng.forward_logits(prompts, adapter_idx), ref, mask) <= TOLERANCE[torch.float32]
    kw = dict(max_new_tokens=3, ignore_eos=True, keep_logits=True)
    t1, s1 = eng.generate(prompts, adapter_idx, **kw)
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, "torch")
    eng.set_mode("stacked")
    assert eng.stacked_expand == "torch"
    t2, s2 = eng.generate(prompts, adapter_idx, **kw)
    assert t1 == t2
    assert relative_error(s1["last_logits"], s2["last_logits"]) <= TOLERANCE[torch.float32]
    eng.set_mode("gbmm")
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, "cuda")
    with pytest.raises(ValueError, match=f"^{me.STACKED_EXPAND_ENV}"):
        eng.set_mode("stacked")
    assert eng.mode_name == "gbmm"                  # the failed switch changed nothing


@pytest.mark.parametrize("mode", CPU_MODES)
def test_decode_matches_peft(peft_setup, mode):
    """Greedy decode with LoRA: every token is PEFT's argmax at its position and the last
    step's logits equal PEFT's forward over the whole sequence (cache, sorting, decode
    metadata all exercised)."""
    base, pm, lora, prompts, adapter_idx = peft_setup
    eng = me.MultiLoraEngine(base, lora, mode, max_batch=8, max_seq=64)
    n = 4
    toks, stats = eng.generate(prompts, adapter_idx, max_new_tokens=n, ignore_eos=True,
                               keep_logits=True)
    seqs = [p + t[:-1] for p, t in zip(prompts, toks)]
    ref, mask = peft_logits(pm, seqs, REQ_ADAPTERS)                     # [B, S', V]
    assert relative_error(stats["last_logits"], ref[:, -1]) <= TOLERANCE[torch.float32]
    S = max(len(s) for s in seqs)
    for b, t in enumerate(toks):
        assert t == ref[b, S - n:].argmax(-1).tolist(), (mode, b)


def test_lora_sites_fuse_and_validate(peft_setup):
    base, pm, lora, prompts, adapter_idx = peft_setup
    eng = me.MultiLoraEngine(base, lora, "none", max_batch=2, max_seq=16)
    site = eng.layers[0].lora["qkv"]
    assert site.A.shape == (3, 3, 8, 64) and len(site.B) == 3
    assert site.ranks.tolist() == [4, 8, 2]              # per-adapter max over q, k, v
    assert torch.equal(site.scale, torch.ones(3))        # folded into B
    assert torch.isfinite(site.A).all() and all(torch.isfinite(b).all() for b in site.B)
    q = lora["model.layers.0.self_attn.q_proj"]
    torch.testing.assert_close(site.B[0][1], q[1][1] * q[2][1])          # a1: r = 8 = r_max
    assert (site.B[1][1] == 0).all()                     # a1 has no k_proj: zero slice
    assert set(eng.layers[1].lora) == {"qkv", "o", "gate_up", "down"}
    o = eng.layers[1].lora["o"]                          # a single site keeps its scale, ranks
    assert o.ranks.tolist() == [4, 0, 2] and torch.isfinite(o.A).all() and torch.isfinite(o.B).all()
    bad = dict(lora)
    bad["model.layers.0.self_attn.q_proj"] = (q[0][:, :, :10], q[1], q[2], q[3])
    with pytest.raises(ValueError, match="A"):
        me.MultiLoraEngine(base, bad, "none", max_batch=2, max_seq=16)
    with pytest.raises(ValueError, match="lora"):
        me.MultiLoraEngine(base, {"model.layers.0.self_attn.qq_proj": q}, "none", max_batch=2,
                           max_seq=16)
    with pytest.raises(ValueError, match="adapter_idx"):
        eng.generate(prompts[:2], [0, 3], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.generate(prompts[:2], [0, 1], max_new_tokens=16)
    assert not eng.graph_capable() and not eng.graph_capable("bgmv_triton")   # CPU


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def _params(temperature, top_p):
    return torch.tensor([1.0 / temperature, top_p], dtype=torch.float32)


def _nucleus(p: torch.Tensor, top_p: float) -> set:
    ps, order = p.sort(descending=True)
    keep = (ps.cumsum(0) - ps) < top_p
    return set(order[keep].tolist())


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (1.0, 0.05)])
def test_sampler_triton_equals_torch(temperature, top_p):
    """The kernel (interpreter) draws the same tokens as the torch version, several steps."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(5, 300, generator=g) * 2.0
    for step in (0, 1, 17):
        args = (logits, _params(temperature, top_p), torch.tensor([123]), torch.tensor([step]))
        ref = me.sample_top_p_torch(*args)
        assert torch.equal(me.sample_top_p_triton(*args), ref)


def test_sampler_distribution_and_top_p():
    """Many rows of the same logits (each row its own noise): frequencies follow softmax
    within the nucleus, and nothing outside it is ever drawn."""
    z = torch.tensor([2.0, 1.5, 1.2, 0.4, 0.0, -0.5, -1.0, -3.0])
    n = 20000
    logits = z.expand(n, -1).contiguous()
    for temperature, top_p in [(1.0, 1.0), (0.8, 0.75), (1.0, 0.3)]:
        p = torch.softmax(z / temperature, -1)
        nuc = _nucleus(p, top_p)
        tok = me.sample_top_p_torch(logits, _params(temperature, top_p), torch.tensor([9]),
                                    torch.tensor([3]))
        counts = torch.bincount(tok, minlength=len(z)).double()
        assert set(torch.nonzero(counts).flatten().tolist()) == nuc
        q = torch.zeros_like(p, dtype=torch.float64)
        q[list(nuc)] = p[list(nuc)].double()
        q /= q.sum()
        sd = (q * (1 - q) / n).sqrt().clamp(min=1e-12)
        assert ((counts / n - q).abs() <= 5 * sd + 1e-9).all(), (temperature, top_p, counts / n, q)


def test_sampling_reproducible_and_tiny_top_p_is_greedy(peft_setup):
    base, pm, lora, prompts, adapter_idx = peft_setup
    eng = me.MultiLoraEngine(base, lora, "gbmm", max_batch=8, max_seq=64)
    kw = dict(max_new_tokens=8, ignore_eos=True, temperature=0.9, top_p=0.95)
    a, _ = eng.generate(prompts, adapter_idx, seed=11, **kw)
    b, _ = eng.generate(prompts, adapter_idx, seed=11, **kw)
    c, _ = eng.generate(prompts, adapter_idx, seed=12, **kw)
    assert a == b and a != c
    greedy, _ = eng.generate(prompts, adapter_idx, max_new_tokens=8, ignore_eos=True)
    tiny, _ = eng.generate(prompts, adapter_idx, seed=5, max_new_tokens=8, ignore_eos=True,
                           temperature=1.0, top_p=1e-6)
    assert tiny == greedy and a != greedy
    # batch-size bucket and row sorting do not change a request's tokens
    one, _ = eng.generate([prompts[3]], [adapter_idx[3]], max_new_tokens=8, ignore_eos=True)
    assert one[0] == greedy[3]


# ---------------------------------------------------------------------------------------
# GPU tier: Llama-3-8B shapes (2 layers), bf16, CUDA graphs
# ---------------------------------------------------------------------------------------
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                 max_position_embeddings=8192, initializer_range=0.02,
                 rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE, original_max_position_embeddings=8192))
GPU_MODES = [m for m in MODES if m != "none"] + ["stacked"]
GPU_GATE: dict = {}     # set by gpu_setup
GPU_REQ = ["a0", "__base__", "a2", "a1", "a0", "a1", "a2", "__base__", "a0", "a1", "a0"]


@pytest.fixture(scope="module")
def gpu_setup():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(**dict(LLAMA3_8B, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            base = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(old)
    pm, lora = make_peft(copy.deepcopy(base), b_std=0.05)
    lens = [60, 17, 33, 58, 5, 41, 60, 12, 26, 49, 3]          # crosses the 64-slot bucket
    prompts = make_prompts(lens, cfg.vocab_size, seed=8)
    # The oracle runs in fp32 (same bf16-valued weights, upcast): a bf16 PEFT oracle
    # carries its own rounding. The bf16 bound is the e2e rule, logits_bound, with the
    # noise of PEFT's own bf16 logits against its fp32 ones on these prompts.
    ref16, mask16 = peft_logits(pm, prompts, GPU_REQ)
    pm = pm.float()
    ref32, _ = peft_logits(pm, prompts, GPU_REQ)
    GPU_GATE["bf16"] = logits_bound(torch.bfloat16, masked_error(ref16, ref32, mask16))
    print(f"bf16 gate {GPU_GATE['bf16']:.3g}")
    adapter_idx = [list(ADAPTERS).index(n) if n in ADAPTERS else -1 for n in GPU_REQ]
    return base, pm, lora, prompts, adapter_idx


def _gpu_engine(gpu_setup, mode):
    base, pm, lora, prompts, adapter_idx = gpu_setup
    return me.MultiLoraEngine(base, lora, mode, max_batch=16, max_seq=192)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", GPU_MODES)
def test_gpu_prefill_and_graph_decode_match_peft(gpu_setup, mode):
    """bf16, every mode: prefill logits and the last decode step's logits (a CUDA graph
    for graph-capable modes) against PEFT's mixed-batch forward."""
    base, pm, lora, prompts, adapter_idx = gpu_setup
    eng = _gpu_engine(gpu_setup, mode)
    ref, mask = peft_logits(pm, prompts, GPU_REQ)
    err = masked_error(eng.forward_logits(prompts, adapter_idx), ref, mask)
    assert err <= GPU_GATE["bf16"], ("prefill", mode, err)
    toks, stats = eng.generate(prompts, adapter_idx, max_new_tokens=12, ignore_eos=True,
                               keep_logits=True)
    assert stats["graph"] == eng.graph_capable()
    seqs = [p + t[:-1] for p, t in zip(prompts, toks)]
    ref, _ = peft_logits(pm, seqs, GPU_REQ)
    err = relative_error(stats["last_logits"], ref[:, -1])
    assert err <= GPU_GATE["bf16"], ("decode", mode, err)


@pytest.mark.gpu
@pytest.mark.parametrize("how", ["triton", "triton_folded", "torch"])
def test_gpu_stacked_expand_forms_match_peft(gpu_setup, monkeypatch, how):
    """Mode "stacked" in graph mode at Llama-3-8B shapes with the other expand forms
    (the default, "triton_norm", runs in the tests above; "triton_folded" folds every
    expand into the fused elementwise kernels): decode logits against PEFT, and the same
    logits as the default within bf16 noise."""
    base, pm, lora, prompts, adapter_idx = gpu_setup
    kw = dict(max_new_tokens=12, ignore_eos=True, keep_logits=True)
    default = _gpu_engine(gpu_setup, "stacked")
    assert default.stacked_expand == "triton_norm" and default.fused_elementwise
    t1, s1 = default.generate(prompts, adapter_idx, **kw)
    monkeypatch.setenv(me.STACKED_EXPAND_ENV, how)
    eng = _gpu_engine(gpu_setup, "stacked")
    t2, s2 = eng.generate(prompts, adapter_idx, **kw)
    assert s1["graph"] and s2["graph"]
    seqs = [p + t[:-1] for p, t in zip(prompts, t2)]
    ref, _ = peft_logits(pm, seqs, GPU_REQ)
    assert relative_error(s2["last_logits"], ref[:, -1]) <= GPU_GATE["bf16"]
    if t1 == t2:        # same sequences: the logits differ only by the forms' rounding
        assert relative_error(s1["last_logits"], s2["last_logits"]) <= GPU_GATE["bf16"]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["none", "bgmv_triton", "sgmv_triton", "bgmv_cuda", "cheat_bmm",
                                  "stacked"])
def test_gpu_graph_replay_equals_eager_and_never_syncs(gpu_setup, mode):
    base, pm, lora, prompts, adapter_idx = gpu_setup
    eng = _gpu_engine(gpu_setup, mode)
    assert eng.graph_capable()
    kw = dict(max_new_tokens=20, ignore_eos=True, temperature=0.7, top_p=0.9, seed=3,
              keep_logits=True)
    g_toks, g_stats = eng.generate(prompts, adapter_idx, use_graph=True, check_sync=True, **kw)
    e_toks, e_stats = eng.generate(prompts, adapter_idx, use_graph=False, **kw)
    assert g_stats["graph"] and not e_stats["graph"]
    assert g_toks == e_toks
    assert relative_error(g_stats["last_logits"], e_stats["last_logits"]) <= 1e-3
    # a second assignment reuses the graphs (cheat_bmm recaptures) and is still right
    other = [(a + 1) % 3 if a >= 0 else -1 for a in adapter_idx]
    g2, _ = eng.generate(prompts, other, use_graph=True, **kw)
    e2, _ = eng.generate(prompts, other, use_graph=False, **kw)
    assert g2 == e2


@pytest.mark.gpu
@pytest.mark.parametrize("mode,opts", [("bgmv_triton", dict(lora_overlap=True)),
                                       ("sgmv_triton", dict(lora_overlap=True)),
                                       ("bgmv_cuda", dict(lora_overlap="shrink")),
                                       ("bgmv_triton", dict(lora_overlap="shrink")),
                                       ("sgmv_triton", dict(lora_overlap="shrink")),
                                       ("bgmv_triton", dict(attention="matmul")),
                                       ("bgmv_cuda", dict(fused_elementwise=True,
                                                          sampler="triton_split")),
                                       ("bgmv_cuda", dict(attention="triton")),
                                       ("bgmv_triton", dict(attention="triton",
                                                            fused_elementwise=True)),
                                       ("none", dict(fused_elementwise=True))])
def test_gpu_options_match_peft(gpu_setup, mode, opts):
    """lora_overlap (LoRA on a side stream inside the graph) and matmul attention: decode
    logits against PEFT. (Overlap rounds the delta to bf16 before the add, so its tokens
    may differ from the in-place path after a near-tie: compared through logits only.)"""
    base, pm, lora, prompts, adapter_idx = gpu_setup
    eng = me.MultiLoraEngine(base, lora, mode, max_batch=16, max_seq=192, **opts)
    assert eng.overlap == {True: "delta", "shrink": "shrink"}.get(opts.get("lora_overlap"))
    toks, stats = eng.generate(prompts, adapter_idx, max_new_tokens=12, ignore_eos=True,
                               keep_logits=True, check_sync=True)
    assert stats["graph"]
    seqs = [p + t[:-1] for p, t in zip(prompts, toks)]
    if mode == "none":      # no LoRA: the plain engine path on the same sequences
        plain = me.MultiLoraEngine(base, lora, "none", max_batch=16, max_seq=192)
        ref = plain.forward_logits(seqs, adapter_idx)
        S = max(len(q) for q in seqs)
        ref = torch.stack([ref[b, S - 1] for b in range(len(seqs))])[:, None]
    else:
        ref, _ = peft_logits(pm, seqs, GPU_REQ)
    assert relative_error(stats["last_logits"], ref[:, -1]) <= GPU_GATE["bf16"]


@pytest.mark.gpu
def test_gpu_eager_step_never_syncs(gpu_setup):
    eng = _gpu_engine(gpu_setup, "bgmv_triton")
    base, pm, lora, prompts, adapter_idx = gpu_setup
    eng.generate(prompts, adapter_idx, max_new_tokens=6, ignore_eos=True, temperature=0.7,
                 top_p=0.9, use_graph=False, check_sync=True)


def _gpu_sampler_inputs():
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(64, 128256, device="cuda", generator=g) * 1.8).to(torch.bfloat16)
    return logits, torch.tensor([5], device="cuda"), torch.tensor([2], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("split", [False, True])
def test_gpu_sampler_triton_equals_torch(split):
    """Llama-3's vocabulary at batch 64: both Triton samplers (one program per row, and
    the split one: stats, mass and combine kernels) draw exactly the torch sampler's tokens."""
    logits, seed, step = _gpu_sampler_inputs()
    for temperature, top_p in [(0.7, 0.9), (1.0, 1.0), (0.5, 0.2), (1.2, 0.05)]:
        params = _params(temperature, top_p).cuda()
        ref = me.sample_top_p_torch(logits, params, seed, step)
        out = me.sample_top_p_triton(logits, params, seed, step, split=split)
        assert (out != ref).sum().item() == 0, (temperature, top_p)
    if split:
        assert me.sampler_split(64, 128256, me.SAMPLER_BLOCK_V) > 1   # the split path ran


@pytest.mark.gpu
def test_gpu_sampler_timing():
    import triton
    logits, seed, step = _gpu_sampler_inputs()
    params = _params(0.7, 0.9).cuda()
    times = {}
    for split in (False, True):
        fn = lambda: me.sample_top_p_triton(logits, params, seed, step, split=split)
        times[split] = 1e3 * triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])[0]
    sort_us = 1e3 * triton.testing.do_bench(lambda: logits.float().softmax(-1).sort(-1, descending=True),
                                            quantiles=[0.5, 0.2, 0.8])[0]
    print(f"top-p sampler, 64 x 128256 bf16: Triton {times[False]:.0f} us, split {times[True]:.0f} us; "
          f"softmax + sort alone {sort_us:.0f} us")
    assert max(times.values()) < 500
