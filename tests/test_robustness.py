"""Robustness: every mode survives hostile input, with nothing silently wrong.

- Seeded random sweeps of every mode against the float64 reference: random T, h_in, 1-3
  output slices of differing h_out, L, mixed ranks (0 and r_max included), fp32 / fp16 /
  bf16, int32 / int64 idx, share of -1 rows 0..1, segment layouts (random tokens, request
  runs, single-token segments, one long segment, all -1). CPU: tiny sizes, Triton in the
  interpreter; GPU (-m gpu): thousands of cases at real-ish sizes, every dtype.
- NaN / Inf in x or in a used A row reach exactly the rows (and slice) that use them.
- Bad input: empty batch, overlapping y (a stride-0 expand view: ValueError), strided y and
  x (correct result), unknown mode, out-of-range idx with the MULTILORA_CHECK debug flag off
  (the documented outcome per mode) and on (ValueError), inconsistent SGMV segments.
- Loaders: missing / corrupt files, an adapter for another model, unknown target, rank over
  the maximum, unknown adapter in a request; after failed loads the loaded ones still work.
- The engine under load: many requests of random lengths and adapters (some none) in
  batches; a sample equals its single-request run (order and adapter kept).
The GPU out-of-range case (test_gpu_out_of_range_idx_unchecked) is also the
compute-sanitizer target of tests/gpu_run.sh (SANITIZE=1).
"""
import json
import os
import random

import pytest
import torch

import multilora_impl as mi
from multilora_impl import (MAX_RANK, MODES, TOLERANCE, get_mode, lora_reference, make_lora_inputs,
                            make_meta, poison_skip_rows, relative_error, skip_rows_untouched)

CPU_MODES = [m for m, e in MODES.items() if m != "none" and not e.needs_cuda]
GPU_MODES = [m for m in MODES if m != "none"]
KERNEL_MODES = ["bgmv_triton", "sgmv_triton", "bgmv_cuda"]
TRITON_MODES = ["bgmv_triton", "sgmv_triton"]
HOST_MODES = ["loop", "gbmm", "cheat_bmm"]          # read idx on the host anyway
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = ("random", "runs", "single", "long", "none")
N_CPU_CASES = 60                                       # per mode: 300 CPU cases in all
N_GPU_CASES = int(os.environ.get("MULTILORA_GPU_CASES", "1000"))   # per mode on the H200


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest.py


# ---------------------------------------------------------------------------------------
# Random cases
# ---------------------------------------------------------------------------------------
def make_idx(rng: random.Random, layout: str, T: int, L: int, none_share: float) -> list[int]:
    """Adapter per token for one segment layout (-1 = no LoRA)."""
    pick = lambda: -1 if rng.random() < none_share else rng.randrange(L)   # noqa: E731
    if layout == "random":                      # any token any adapter
        return [pick() for _ in range(T)]
    if layout == "runs":                        # requests: runs of random length
        out = []
        while len(out) < T:
            out += [pick()] * rng.randint(1, max(1, T // 2))
        return out[:T]
    if layout == "single":                      # every token its own segment
        a = [pick() for _ in range(T)]
        for t in range(1, T):
            if a[t] == a[t - 1]:
                a[t] = -1 if a[t] >= 0 and L == 1 else (a[t] + 1) % L if a[t] >= 0 else 0
        return a
    if layout == "long":                        # one adapter for all (one long segment)
        return [rng.randrange(L)] * T
    return [-1] * T                             # "none": every row skipped


def random_case(seed: int, big: bool = False, dtypes=DTYPES) -> dict:
    """One random problem: sizes, ranks, dtype, idx. big: GPU-sized."""
    rng = random.Random(seed)
    if big:
        T = rng.choice([1, 2, 3, 7, 16, 33, 64, 133, 256, rng.randint(1, 1024)])
        h_in = rng.choice([64, 128, 1000, 2048, 4096, 8 * rng.randint(1, 700)])
        h_outs = [rng.choice([8, 64, 1000, 1024, 4096, rng.randint(1, 6000)])
                  for _ in range(rng.randint(1, 3))]
        L = rng.randint(1, 64)
        r_max = rng.choice([1, 4, 8, 16, 32, 64, 100, MAX_RANK])
    else:
        T = rng.choice([1, 2, 3, 5, 7, 12, 19])
        h_in = 8 * rng.randint(1, 9)                   # multiple of 8: bgmv_cuda's rule too
        h_outs = [rng.randint(1, 40) for _ in range(rng.randint(1, 3))]
        L = rng.randint(1, 5)
        r_max = rng.choice([1, 2, 3, 4, 8, 16, MAX_RANK if rng.random() < 0.3 else 5])
    ranks = None
    if rng.random() < 0.7:                             # mixed ranks, 0 and r_max included
        ranks = [rng.choice([0, r_max, rng.randint(0, r_max)]) for _ in range(L)]
        ranks[rng.randrange(L)] = r_max
    layout = rng.choice(LAYOUTS)
    none_share = rng.choice([0.0, 0.0, 0.3, 0.7, 1.0])
    idx = make_idx(rng, layout, T, L, none_share)
    return dict(T=T, h_in=h_in, h_outs=h_outs, L=L, r_max=r_max, ranks=ranks, layout=layout,
                dtype=rng.choice(dtypes), idx_dtype=rng.choice([torch.int32, torch.int64]),
                idx=idx, sliced=len(h_outs) > 1 or rng.random() < 0.5, seed=seed,
                rank_major=rng.random() < 0.3)     # B stored rank-major (to_rank_major)


def case_inputs(c: dict, device="cpu") -> tuple[dict, torch.Tensor]:
    h_out = c["h_outs"] if c["sliced"] else c["h_outs"][0]
    inp = make_lora_inputs(c["T"], c["h_in"], h_out, c["L"], c["r_max"], c["dtype"], device,
                           ranks=c["ranks"], seed=c["seed"], rank_major=c["rank_major"])
    return inp, torch.tensor(c["idx"], dtype=c["idx_dtype"], device=device)


def run_case(mode: str, c: dict, device="cpu") -> None:
    inp, idx = case_inputs(c, device)
    err = mi.check_mode(mode, inp, idx)                # also: -1 rows bit-identical
    assert err < TOLERANCE[c["dtype"]], \
        f"{mode}: rel err {err:.2e} on {dict((k, v) for k, v in c.items() if k != 'idx')}"


@pytest.mark.parametrize("seed", range(N_CPU_CASES))
@pytest.mark.parametrize("mode", CPU_MODES)
def test_random_sweep(mode, seed):
    run_case(mode, random_case(1000 * seed + 7))


def test_sweep_covers_the_space():
    """The CPU seeds really reach every layout, dtype, slice count, rank 0 and r_max."""
    cs = [random_case(1000 * s + 7) for s in range(N_CPU_CASES)]
    assert {c["layout"] for c in cs} == set(LAYOUTS)
    assert {c["dtype"] for c in cs} == set(DTYPES)
    assert {len(c["h_outs"]) for c in cs} == {1, 2, 3}
    assert {c["idx_dtype"] for c in cs} == {torch.int32, torch.int64}
    assert any(c["ranks"] and 0 in c["ranks"] for c in cs)
    assert any(c["r_max"] == MAX_RANK for c in cs)
    assert any(c["T"] == 1 for c in cs)
    assert {c["rank_major"] for c in cs} == {False, True}
    assert any(c["rank_major"] and c["ranks"] for c in cs)


# ---------------------------------------------------------------------------------------
# NaN / Inf: propagated into (and only into) the rows and slice that use them
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("mode", CPU_MODES)
def test_nan_inf_propagate_only_where_used(mode, seed):
    T, h_in, h_outs, L, r_max = 9, 24, [12, 20], 3, 4
    ranks = [4, 0, 2]
    inp = make_lora_inputs(T, h_in, h_outs, L, r_max, torch.float32, ranks=ranks, seed=seed)
    idx = torch.tensor([0, 2, -1, 1, 0, 2, -1, 2, 1], dtype=torch.int32)
    x, A = inp["x"].clone(), inp["A"].clone()
    x[0, 3] = float("nan")                 # adapter 0: row 0 becomes NaN, every slice
    x[2, 5] = float("inf")                 # idx -1: row untouched
    x[3, 1] = float("inf")                 # adapter 1 has rank 0: row untouched
    x[5, 0] = float("-inf") if seed else float("inf")   # adapter 2: row non-finite
    A[1, 2, 1, 7] = float("nan")           # slice 1 of adapter 2, a used row (r 1 < 2)
    inp = dict(inp, x=x, A=A)
    y0 = poison_skip_rows(inp["y"], idx)
    y = y0.clone()
    mode_ = get_mode(mode)
    mode_(y, x, A, inp["B"], idx, inp["scale"], inp["ranks"],
          mode_.make_meta(x, A, inp["B"], idx, inp["scale"], inp["ranks"]))
    bad = torch.zeros(T, sum(h_outs), dtype=torch.bool)
    bad[[0, 5]] = True                     # bad x rows with an adapter of rank > 0
    bad[[1, 5, 7], h_outs[0]:] = True      # adapter 2's slice 1 (its A row holds NaN)
    assert torch.equal(~torch.isfinite(y), bad), mode
    assert skip_rows_untouched(y, y0, idx)
    ref = lora_reference(y0, x, A, inp["B"], idx, inp["scale"], inp["ranks"])
    assert torch.equal(~torch.isfinite(ref), bad)            # the reference agrees
    assert relative_error(y[~bad], ref[~bad]) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------
@pytest.fixture
def small():
    inp = make_lora_inputs(6, 16, [8, 4], L=3, r_max=4, dtype=torch.float32,
                           ranks=[4, 2, 0], seed=3)
    idx = torch.tensor([0, 1, 1, -1, 2, 0], dtype=torch.int32)
    return inp, idx


def call(mode, inp, idx, y=None, x=None, meta=None, **over):
    a = dict(inp, **over)
    y = a["y"].clone() if y is None else y
    get_mode(mode)(y, a["x"] if x is None else x, a["A"], a["B"], idx, a["scale"], a["ranks"],
                   meta)
    return y


@pytest.mark.parametrize("mode", CPU_MODES)
def test_empty_batch_raises(mode, small):
    inp, _ = small
    x0, y0 = inp["x"][:0], inp["y"][:0]
    with pytest.raises(ValueError, match=r"^x: .*T >= 1"):
        get_mode(mode)(y0, x0, inp["A"], inp["B"], torch.zeros(0, dtype=torch.int32),
                       inp["scale"], inp["ranks"])


@pytest.mark.parametrize("mode", CPU_MODES)
def test_overlapping_y_raises_strided_y_and_x_work(mode, small):
    """Decision: y whose rows overlap (stride-0 expand view) is refused, since in-place
    updates of shared memory would be silently wrong; a y or x with larger row strides
    (column slices of wider tensors) or a transposed x gives the right answer."""
    inp, idx = small
    T, h = inp["y"].shape
    y_exp = torch.randn(h).expand(T, h)                     # strides (0, 1)
    with pytest.raises(ValueError, match=r"^y: .*rows that do not overlap"):
        call(mode, inp, idx, y=y_exp)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"],
                         inp["ranks"])
    wide = torch.full((T, h + 5), 7.0)
    y = wide[:, 2:2 + h]                                    # strides (h + 5, 1)
    y.copy_(inp["y"])
    x_t = inp["x"].t().contiguous().t()                     # strides (1, T): column-major
    call(mode, inp, idx, y=y, x=x_t)
    assert relative_error(y, ref) < TOLERANCE[torch.float32]
    assert torch.all(wide[:, :2] == 7) and torch.all(wide[:, 2 + h:] == 7)


def test_unknown_mode_leaves_state():
    import multilora_engine as me
    import multilora_model as mm
    with pytest.raises(ValueError, match=r"^mode: expected one of .*'bgmv_tritn'"):
        get_mode("bgmv_tritn")
    ctx = mm.LoraContext()
    ctx.set_mode("gbmm")
    with pytest.raises(ValueError, match="mode"):
        ctx.set_mode("nope")
    assert ctx.mode.name == "gbmm"
    model = mm.build_random_model("tiny", num_layers=1)
    eng = me.MultiLoraEngine(model, None, "gbmm", max_batch=2, max_seq=16)
    with pytest.raises(ValueError, match="mode"):
        eng.set_mode("nope")
    assert eng.mode_name == "gbmm" and eng.mode.name == "gbmm"


@pytest.mark.parametrize("mode", CPU_MODES)
def test_out_of_range_idx_flag_off(mode, small, monkeypatch):
    """The documented outcome without MULTILORA_CHECK: Triton kernels treat idx outside
    [-1, L) as -1 (row untouched, no out-of-bounds access); the host-side modes raise for
    idx >= L and treat idx < -1 as -1. (bgmv_cuda: NaN rows, see the GPU test.)"""
    monkeypatch.delenv("MULTILORA_CHECK", raising=False)
    inp, _ = small
    idx = torch.tensor([0, 7, 1, -1, -5, 0], dtype=torch.int32)      # 7 >= L, -5 < -1
    as_none = torch.tensor([0, -1, 1, -1, -1, 0], dtype=torch.int32)
    meta = make_meta(idx)
    if mode in HOST_MODES:
        with pytest.raises(ValueError, match=r"^idx: expected values in \[-1, 2\], got 7"):
            call(mode, inp, idx)
        idx, meta = torch.tensor([0, -5, 1, -1, -5, 0], dtype=torch.int32), None
    y = call(mode, inp, idx, meta=meta)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], as_none, inp["scale"],
                         inp["ranks"])
    assert relative_error(y, ref) < TOLERANCE[torch.float32]
    assert torch.equal(y[[1, 3, 4]], inp["y"][[1, 3, 4]])
    # ranks outside [0, r_max] in the Triton kernels: clamped to [0, r_max]
    if mode in TRITON_MODES:
        ranks = torch.tensor([9, -3, 2], dtype=torch.int32)
        A = inp["A"].nan_to_num(0.0)
        B = [b.nan_to_num(0.0) for b in inp["B"]]
        y = call(mode, inp, as_none, A=A, B=B, ranks=ranks, meta=make_meta(as_none))
        ref = lora_reference(inp["y"], inp["x"], A, B, as_none, inp["scale"],
                             torch.tensor([4, 0, 2], dtype=torch.int32))
        assert relative_error(y, ref) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("mode", CPU_MODES)
def test_debug_flag_checks_values(mode, small, monkeypatch):
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    inp, idx = small
    bad = idx.clone()
    bad[2] = 3
    meta = make_meta(bad)
    with pytest.raises(ValueError, match=r"^idx: expected values in \[-1, 2\]"):
        call(mode, inp, bad, meta=meta)
    bad[2] = -2
    with pytest.raises(ValueError, match=r"^idx: expected values in \[-1, 2\]"):
        call(mode, inp, bad, meta=make_meta(bad))
    with pytest.raises(ValueError, match=r"^ranks: expected values in \[0, r_max=4\]"):
        call(mode, inp, idx, ranks=torch.tensor([4, 5, 0], dtype=torch.int32))
    y = call(mode, inp, idx)                                 # good input still runs
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert relative_error(y, ref) < TOLERANCE[torch.float32]
    monkeypatch.setenv("MULTILORA_CHECK", "0")               # "0" is off
    assert not mi.debug_checks()


def test_debug_flag_bgmv_triton_shrink_expand(small, monkeypatch):
    """bgmv_shrink / bgmv_expand bypass check_lora_args: they honour the flag themselves."""
    from bgmv_triton.bgmv_triton import bgmv_expand, bgmv_shrink
    inp, idx = small
    bad = idx.clone()
    bad[0] = 3
    monkeypatch.delenv("MULTILORA_CHECK", raising=False)
    v = bgmv_shrink(inp["x"], inp["A"], bad, inp["ranks"])          # no check: runs
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    with pytest.raises(ValueError, match=r"^idx: "):
        bgmv_shrink(inp["x"], inp["A"], bad, inp["ranks"])
    with pytest.raises(ValueError, match=r"^idx: "):
        bgmv_expand(inp["y"].clone(), v, inp["B"], bad, inp["scale"], inp["ranks"])
    with pytest.raises(ValueError, match=r"^ranks: "):
        bgmv_shrink(inp["x"], inp["A"], idx, torch.tensor([4, 2, 6], dtype=torch.int32))


def test_debug_flag_sgmv_segments(small, monkeypatch):
    """Segment metadata is checked under the flag (values, and that it rebuilds idx);
    without it a given meta is trusted (no host read)."""
    from sgmv_triton.sgmv_expand_triton import sgmv_expand
    from sgmv_triton.sgmv_shrink_triton import sgmv_shrink
    inp, idx = small
    other = make_meta(torch.tensor([0, 0, 1, -1, 2, 0], dtype=torch.int32))  # not idx's
    short = make_meta(idx)
    short.seg_starts = short.seg_starts.clone()
    short.seg_starts[-1] = 5                                        # does not end at T
    long_seg = make_meta(idx)
    long_seg.max_seg_len = 1                                        # under the longest (2)
    monkeypatch.delenv("MULTILORA_CHECK", raising=False)
    call("sgmv_triton", inp, idx, meta=other)                       # trusted, runs
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    with pytest.raises(ValueError, match=r"^meta: expected segments that rebuild idx"):
        call("sgmv_triton", inp, idx, meta=other)
    with pytest.raises(ValueError, match=r"^seg_starts: expected first entry 0 and last entry T=6"):
        call("sgmv_triton", inp, idx, meta=short)
    with pytest.raises(ValueError, match=r"^max_seg_len: "):
        call("sgmv_triton", inp, idx, meta=long_seg)
    m = make_meta(idx)
    bad_ad = m.seg_adapter.clone()
    bad_ad[0] = 3
    with pytest.raises(ValueError, match=r"^seg_adapter: expected values in \[-1, 2\]"):
        sgmv_shrink(inp["x"], inp["A"], m.seg_starts, bad_ad, inp["ranks"])
    v = torch.zeros(6, 2, 4)
    with pytest.raises(ValueError, match=r"^seg_adapter: "):
        sgmv_expand(inp["y"].clone(), v, inp["B"], m.seg_starts, bad_ad, inp["scale"],
                    inp["ranks"])


# ---------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    import multilora_model as mm
    out = tmp_path_factory.mktemp("robust_adapters")
    base = mm.build_random_model("tiny", seed=0)
    good = mm.make_random_adapters(base, 2, 4, targets=["q_proj", "down_proj"], seed=1,
                                   prefix="good")
    dirs = {}
    for ad in good:
        dirs[ad.name] = str(out / ad.name)
        mm.save_peft_adapter(ad, dirs[ad.name])
    return base, dirs, out


def _copy_dir(src, dst, **replace):
    os.makedirs(dst, exist_ok=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        data = replace.get(f, open(os.path.join(src, f), "rb").read())
        if data is not None:
            open(os.path.join(dst, f), "wb").write(data)


def test_loader_bad_files_name_the_file(tiny_model):
    import multilora_model as mm
    base, dirs, out = tiny_model
    src = dirs["good0"]
    w = open(os.path.join(src, "adapter_model.safetensors"), "rb").read()
    cfg = json.load(open(os.path.join(src, "adapter_config.json")))
    cases = {
        "nocfg": (dict(**{"adapter_config.json": None}), FileNotFoundError,
                  r"nocfg.*missing file .*adapter_config\.json"),
        "trunc": ({"adapter_model.safetensors": w[:len(w) // 2]}, ValueError,
                  r"trunc/adapter_model\.safetensors: "),
        "trunc_data": ({"adapter_model.safetensors": w[:-7]}, ValueError,
                       r"trunc_data/adapter_model\.safetensors: "),
        "garbage": ({"adapter_model.safetensors": b"\x00garbage"}, ValueError,
                    r"garbage/adapter_model\.safetensors: not a readable safetensors file"),
        "badjson": ({"adapter_config.json": b"{\"r\": 4,"}, ValueError,
                    r"badjson/adapter_config\.json: not valid JSON"),
        "target": ({"adapter_config.json": json.dumps(
            dict(cfg, target_modules=["q_proj", "foo_proj"])).encode()}, ValueError,
            r"target/adapter_config\.json: unknown target module 'foo_proj'"),
    }
    for name, (replace, exc, pattern) in cases.items():
        _copy_dir(src, str(out / name), **replace)
        with pytest.raises(exc, match=pattern):
            mm.load_peft_adapter(str(out / name), base)


def test_loader_adapter_for_another_model_and_rank(tiny_model):
    import multilora_model as mm
    base, _, out = tiny_model
    other = mm.build_random_model("tiny", hidden_size=48, seed=2)
    ad = mm.make_random_adapters(other, 1, 4, targets=["q_proj"], prefix="h48")[0]
    mm.save_peft_adapter(ad, str(out / "h48"))
    with pytest.raises(ValueError, match=r"h48/adapter_model\.safetensors: .*q_proj\.lora_A has "
                                         r"shape \(4, 48\), expected \[r, 64\]"):
        mm.load_peft_adapter(str(out / "h48"), base)
    big = mm.make_random_adapters(base, 1, MAX_RANK, targets=["v_proj"], prefix="big")[0]
    big.weights = {k: (torch.cat([a, a[:1]]), torch.cat([b, b[:, :1]], 1))
                   for k, (a, b) in big.weights.items()}                 # rank MAX_RANK + 1
    mm.save_peft_adapter(big, str(out / "big"))
    with pytest.raises(ValueError, match=rf"big/adapter_model\.safetensors: .*rank "
                                         rf"{MAX_RANK + 1}, over the supported maximum"):
        mm.load_peft_adapter(str(out / "big"), base)
    with pytest.raises(ValueError, match=r"request 1: unknown adapter 'nope'"):
        mm.resolve_adapters(["good0", "nope"], ["good0", "good1"])


def test_failed_loads_leave_loaded_adapters_usable(tiny_model):
    """Load two adapters and inject; then failed loads and a failed injection (duplicate
    name, adapter for another model) change nothing: same logits as before."""
    import copy
    import multilora_model as mm
    base, dirs, out = tiny_model
    model = copy.deepcopy(base)
    ads = [mm.load_peft_adapter(d, model) for d in dirs.values()]
    ctx = mm.inject_multilora(model, ads, "gbmm")
    prompts = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    idx = mm.resolve_adapters(["good0", None, "good1"], ctx.adapter_names)
    before, mask = mm.forward_logits(model, ctx, prompts, idx)
    for bad in ("trunc", "garbage", "nocfg", "h48"):
        if os.path.isdir(out / bad):
            with pytest.raises((ValueError, FileNotFoundError)):
                mm.load_peft_adapter(str(out / bad), model)
    with pytest.raises(ValueError, match="duplicate names"):
        mm.inject_multilora(model, ads + [ads[0]], "gbmm")
    alien = mm.LoraAdapter("alien", {"model.layers.0.mlp.nope": ads[0].weights[
        "model.layers.0.self_attn.q_proj"]}, {"model.layers.0.mlp.nope": 1.0}, {})
    with pytest.raises(ValueError, match="nope"):
        mm.inject_multilora(model, ads + [alien], "gbmm")
    after, _ = mm.forward_logits(model, ctx, prompts, idx)
    assert torch.equal(before, after)
    plain, _ = mm.forward_logits(base, None, prompts, [0, 0, 0])
    assert relative_error(after[0][mask[0].bool()], plain[0][mask[0].bool()]) > 1e-3


# ---------------------------------------------------------------------------------------
# The engine under load
# ---------------------------------------------------------------------------------------
def engine_load(mode: str, n_requests: int, batch: int, n_sample: int, device, dtype,
                max_new: int, seed: int = 0) -> None:
    """n_requests of random prompt lengths and adapters (some none) through generate() in
    batches; a sample is rerun alone with its adapter and must give the same tokens, and
    the same request with another adapter must differ (the adapter matters)."""
    import multilora_engine as me
    import multilora_model as mm
    rng = random.Random(seed)
    model = mm.build_random_model("tiny", device=device, dtype=dtype, seed=seed,
                                  initializer_range=0.2)
    L = 4
    ads = mm.make_random_adapters(model, L, 4, seed=seed + 1, init_scale=2.0)
    eng = me.MultiLoraEngine(model, mm.stack_all(model, ads), mode, max_batch=batch,
                             max_seq=64)
    V = model.config.vocab_size
    reqs = [([rng.randrange(3, V) for _ in range(rng.randint(1, 24))], rng.randrange(-1, L))
            for _ in range(n_requests)]
    outs = []
    for b0 in range(0, n_requests, batch):
        chunk = reqs[b0:b0 + batch]
        toks, _ = eng.generate([p for p, _ in chunk], [a for _, a in chunk], max_new_tokens=max_new,
                               ignore_eos=True)
        assert len(toks) == len(chunk) and all(len(t) == max_new for t in toks)
        outs += toks
    assert len(outs) == n_requests
    sample = rng.sample(range(n_requests), n_sample)
    differs = 0
    for r in sample:
        p, a = reqs[r]
        single, _ = eng.generate([p], [a], max_new_tokens=max_new, ignore_eos=True)
        assert single[0] == outs[r], f"request {r} (adapter {a}): batched != single"
        other, _ = eng.generate([p], [(a + 2) % L if a >= 0 else 0], max_new_tokens=max_new,
                                ignore_eos=True)
        differs += other[0] != outs[r]
    assert differs >= n_sample // 2, "adapters barely change the output: test too weak"


@pytest.mark.parametrize("mode", ["gbmm", "stacked"])
def test_engine_load_cpu(mode):
    engine_load(mode, n_requests=40, batch=8, n_sample=6, device="cpu",
                dtype=torch.float32, max_new=4)


# ---------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu): thousands of cases, sanitizer targets, the engine under load
# ---------------------------------------------------------------------------------------
GPU_SWEEP_CHUNKS = 8       # items per mode, so shards can split (each random shape compiles
                           # its own Triton specialisations: sgmv_triton needs many processes)


@pytest.mark.gpu
@pytest.mark.parametrize("chunk", range(GPU_SWEEP_CHUNKS))
@pytest.mark.parametrize("mode", GPU_MODES)
def test_gpu_random_sweep(mode, chunk):
    """N_GPU_CASES random cases per mode at real-ish sizes, all dtypes (this chunk's share)."""
    n = N_GPU_CASES if mode not in ("loop", "gbmm") else N_GPU_CASES // 10
    for s in range(chunk, n, GPU_SWEEP_CHUNKS):
        c = random_case(77 + s, big=True)
        if mode == "loop" and c["T"] > 256:
            continue
        run_case(mode, c, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", KERNEL_MODES)
def test_gpu_out_of_range_idx_unchecked(mode, monkeypatch):
    """Checking off, idx / ranks out of range on the GPU: no crash, no out-of-bounds access
    (run under compute-sanitizer memcheck by gpu_run.sh), the documented outcome: Triton
    treats such tokens as -1; bgmv_cuda writes NaN into their rows. Other rows exact."""
    monkeypatch.delenv("MULTILORA_CHECK", raising=False)
    T, L = 64, 4
    inp = make_lora_inputs(T, 256, [128, 64], L, 16, torch.float16, "cuda",
                           ranks=[16, 8, 0, 3], seed=9)
    g = torch.Generator().manual_seed(9)
    idx = torch.randint(-1, L, (T,), generator=g, dtype=torch.int32)
    oob = torch.zeros(T, dtype=torch.bool)
    oob[::5] = True
    idx[oob] = torch.tensor([L, 1 << 20, -2, -(1 << 30), 2 ** 31 - 1], dtype=torch.int32).repeat(
        T)[:int(oob.sum())]
    y = call(mode, inp, idx.cuda(), meta=make_meta(idx.cuda()) if mode == "sgmv_triton" else None)
    torch.cuda.synchronize()
    as_none = torch.where(oob, -1, idx)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], as_none, inp["scale"],
                         inp["ranks"])
    ok = ~oob.cuda()
    assert relative_error(y[ok], ref[ok.cpu()]) < TOLERANCE[torch.float16]
    if mode == "bgmv_cuda":
        assert torch.isnan(y[~ok]).all()
    else:
        assert torch.equal(y[~ok], inp["y"][~ok])
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    with pytest.raises(ValueError, match=r"^idx: "):
        call(mode, inp, idx.cuda(), meta=make_meta(idx.cuda()))


@pytest.mark.gpu
def test_gpu_debug_flag_bgmv_cuda_shrink_expand(monkeypatch):
    from bgmv_cuda.bgmv_cuda import bgmv_expand, bgmv_shrink
    inp = make_lora_inputs(8, 64, 32, 3, 8, torch.float16, "cuda", ranks=[8, 2, 0], seed=1)
    idx = torch.tensor([0, 1, 2, -1, 3, 0, 1, 2], dtype=torch.int32, device="cuda")
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    with pytest.raises(ValueError, match=r"^idx: "):
        bgmv_shrink(inp["x"], inp["A"], idx, inp["ranks"])
    v = torch.zeros(8, 1, 8, device="cuda")
    with pytest.raises(ValueError, match=r"^idx: "):
        bgmv_expand(inp["y"].clone(), v, inp["B"], idx, inp["scale"], inp["ranks"])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["bgmv_triton", "bgmv_cuda", "sgmv_triton", "stacked"])
def test_gpu_engine_load(mode):
    """1,000 requests in batches of 64 on a 2-layer random Llama (fp32: batched and
    single runs must agree token for token), 40 sampled against single runs."""
    engine_load(mode, n_requests=1000, batch=64, n_sample=40, device="cuda",
                dtype=torch.float32, max_new=8)
