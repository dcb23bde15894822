"""SGMV (sgmv_triton/): the Triton shrink/expand kernels, their custom ops and the
sgmv_triton mode, against the float64 reference on idx rebuilt from the segments.

CPU tier: the kernels in the Triton interpreter at small, awkward sizes (single-token
segments, -1 runs, segments over several token blocks, ragged, mixed ranks with NaN
pads, several output slices, fp16/bf16/fp32, split-K), the per-segment torch loop,
static (graph-style) segment buffers, bad inputs, opcheck.
GPU tier (`pytest -m gpu`): Llama-3-8B sizes in bf16, all dtypes, torch.compile
(fullgraph) and CUDA-graph capture/replay with new inputs and assignments.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from multilora_impl import (LLAMA3_8B_LAYERS, TOLERANCE, LoraMode, build_segments, check_mode,
                            idx_from_segments, lora_reference, make_lora_inputs, make_meta,
                            relative_error)
from sgmv_triton.sgmv_expand_triton import sgmv_expand
from sgmv_triton.sgmv_lora import fill_static_meta, make_static_meta, sgmv_lora
from sgmv_triton.sgmv_shrink_triton import sgmv_shrink
from sgmv_triton.sgmv_torch_sequential import (sgmv_expand_sequential, sgmv_sequential_lora,
                                               sgmv_shrink_sequential, sgmv_torch_sequential)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SGMV = LoraMode("sgmv_triton", sgmv_lora)


def idx_of(lens, adapters, device="cpu") -> torch.Tensor:
    """idx [T] int32 from segment lengths and their adapters."""
    return torch.repeat_interleave(torch.tensor(adapters, dtype=torch.int32),
                                   torch.tensor(lens)).to(device)


def ragged_idx(n_requests: int, max_len: int, L: int, seed: int, device="cpu",
               no_lora_share: float = 0.25) -> torch.Tensor:
    """Random request lengths 1..max_len, random adapters, some -1 requests."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (n_requests,), generator=g).tolist()
    ad = torch.randint(0, L, (n_requests,), generator=g)
    ad[torch.rand(n_requests, generator=g) < no_lora_share] = -1
    return idx_of(lens, ad.tolist(), device)


def check_direct(inp: dict, idx: torch.Tensor, **kw) -> float:
    """Shrink + expand called directly (block overrides, split-K, max_seg_len), with the
    -1 rows checked bit-identical; returns the relative error."""
    st, ad = build_segments(idx)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    y = inp["y"].clone()
    msl = kw.pop("max_seg_len", None)
    block_m = kw.pop("block_m", 0)
    v = sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], max_seg_len=msl, block_m=block_m,
                    check=True, **kw)
    sgmv_expand(y, v, inp["B"], st, ad, inp["scale"], inp["ranks"], max_seg_len=msl,
                block_m=block_m, check=True)
    skip = idx < 0
    assert torch.equal(y[skip], inp["y"][skip]), "rows with idx = -1 were modified"
    return relative_error(y, ref)


# ---------------------------------------------------------------------------------------
# CPU tier: the kernels in the interpreter
# ---------------------------------------------------------------------------------------
# (lens, adapters, h_in, h_out (list = slices), L, r_max, ranks)
CASES = {
    "single_token": ([1] * 7, [0, 1, 2, 0, -1, 1, 2], 40, 24, 3, 8, None),
    "ragged_minus1_slices": ([3, 9, 1, 14, 5, 2], [-1, 2, 0, -1, 3, 1], 72, [40, 16, 24], 4, 16,
                             [16, 1, 7, 12]),
    "rank48_slice_straddle": ([11, 20, 6], [1, 0, 2], 200, [24, 16, 16], 3, 48, [48, 17, 33]),
    "rank128_even_k": ([19, 4, 10], [0, 2, 1], 128, 136, 3, 128, [128, 1, 70]),
    "four_slices": ([6, 8, 7], [1, -1, 0], 33, [16, 8, 24, 8], 2, 8, None),
    "identical_long": ([70], [1], 48, 40, 2, 16, [3, 16]),
    "rank1": ([5, 9, 2], [1, 0, -1], 24, 20, 2, 1, None),
    # r_max not a multiple of 8: the expand masks at the rank itself (no rounded-up loads)
    "rank12_rows_unaligned": ([4, 7, 3], [2, 0, 1], 40, [24, 16], 3, 12, [12, 5, 9]),
}


def test_expand_loads_vectors_with_ranks():
    """Compiled for sm_90 (Triton's own ptxas, no GPU), the expand with ranks issues the same
    global loads as without: 16-byte cp.async for B, no scalar 2-byte loads (before PERF_LOG
    v40 the loaded rank bound made every B load a 2-byte scalar one: mixed ranks ran 60%
    slower than all ranks at 64), plus the one load of the rank."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_sm90_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, script, "--sgmv-expand-loads"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["has_ranks"]: r["loads"] for r in (json.loads(line) for line in out.stdout.splitlines()
                                                 if line.startswith("{"))}
    plain, ranked = rows[False], dict(rows[True])
    assert plain.get("cp.async.cg.shared.global 16", 0) >= 4, plain       # B in 16-byte copies
    assert not any(".b16" in op or ".u16" in op for op in ranked), ranked
    ranked["ld.global.b32"] -= 1                                             # ranks[adapter]
    assert ranked == plain, (ranked, plain)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
def test_sgmv_mode(case, dtype):
    lens, adapters, h_in, h_out, L, r_max, ranks = CASES[case]
    idx = idx_of(lens, adapters)
    inp = make_lora_inputs(len(idx), h_in, h_out, L, r_max, dtype, ranks=ranks,
                           seed=10 * list(CASES).index(case) + DTYPES.index(dtype))
    err = check_mode(SGMV, inp, idx)
    assert err < TOLERANCE[dtype], f"{case} {dtype}: rel err {err:.2e}"


def test_default_tiles_and_split_rule():
    """The H200 defaults of PERF_LOG v8: the shrink splits h_in only while the grid is under
    SPLIT_K_PROGRAMS programs; the 16-bit expand takes [16, 256] tiles at any segment length."""
    from sgmv_triton.sgmv_expand_triton import expand_config
    from sgmv_triton.sgmv_shrink_triton import SPLIT_K_PROGRAMS, pick_split_k
    assert [pick_split_k(n) for n in (1, 8, 64, 100, 128, 200, SPLIT_K_PROGRAMS, 4096)] == \
        [4, 4, 4, 4, 2, 2, 1, 1]
    for dtype in (torch.bfloat16, torch.float16):
        for seg in (1, 64, 512, None):
            cfg = expand_config(dtype, 16, seg)
            assert (cfg["BLOCK_M"], cfg["BLOCK_N"]) == (16, 256), (dtype, seg)
    assert (expand_config(torch.float32, 16, 512)["BLOCK_M"], expand_config(torch.float32, 16, 8)["BLOCK_M"]) == (64, 16)


def test_auto_split_is_deterministic_and_layout_free():
    """split_k=0 picks the split from T and the columns only and adds the partial sums in a
    fixed order: one segment or three of the same adapter give the same bits (as eager and
    CUDA-graph calls must), and the split really ran (bits differ from split_k=1)."""
    g = torch.Generator().manual_seed(11)
    x, A = torch.randn(48, 512, generator=g), torch.randn(2, 16, 512, generator=g)
    one = (torch.tensor([0, 48], dtype=torch.int32), torch.tensor([1], dtype=torch.int32))
    three = (torch.tensor([0, 5, 16, 48], dtype=torch.int32), torch.tensor([1, 1, 1], dtype=torch.int32))
    v1 = sgmv_shrink(x, A, *one)
    assert torch.equal(v1, sgmv_shrink(x, A, *three, max_seg_len=32))
    ref = x.double() @ A[1].double().T
    assert torch.allclose(v1[:, 0].double(), ref, rtol=1e-5, atol=1e-4)
    assert not torch.equal(v1, sgmv_shrink(x, A, *one, split_k=1))


def test_partials_added_by_the_expand():
    """partials=True (sgmv_lora's path): the shrink returns its split-K partial sums
    [n, T, S, r_max] unsummed and the expand adds them in order 0, 1, ... as it loads v:
    the partials sum to the summed v, the expand of the partials matches the expand of their
    sum in order, sgmv_lora equals its halves bitwise, and a wrong v shape is refused."""
    from sgmv_triton.sgmv_lora import lora_expand, lora_shrink
    from multilora_impl import make_meta
    inp = make_lora_inputs(21, 256, [24, 16], 3, 16, torch.float32, "cpu", ranks=[16, 5, 9], seed=5)
    idx = torch.tensor([0] * 6 + [-1] * 3 + [2] * 9 + [1] * 3, dtype=torch.int32)
    st, ad = build_segments(idx)
    parts = sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], split_k=4, partials=True)
    v = sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], split_k=4)
    assert parts.shape == (4, 21, 2, 16) and torch.allclose(parts.sum(0), v, rtol=1e-6, atol=1e-6)
    in_order = parts[0] + parts[1] + parts[2] + parts[3]
    y1, y2 = inp["y"].clone(), inp["y"].clone()
    sgmv_expand(y1, parts, inp["B"], st, ad, inp["scale"], inp["ranks"])
    sgmv_expand(y2, in_order, inp["B"], st, ad, inp["scale"], inp["ranks"])
    assert torch.equal(y1, y2)
    meta = make_meta(idx)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    full, halves = inp["y"].clone(), inp["y"].clone()
    sgmv_lora(full, *args, meta)
    vh = lora_shrink(inp["x"], inp["A"], idx, inp["ranks"], meta)
    assert vh.dim() == 4                                     # T = 21: the auto split splits
    lora_expand(halves, vh, inp["B"], idx, inp["scale"], inp["ranks"], meta)
    assert torch.equal(full, halves)
    with pytest.raises(ValueError, match="^v: "):
        sgmv_expand(y1, parts[:, :20], inp["B"], st, ad, inp["scale"], inp["ranks"])
    with pytest.raises(ValueError, match="^v: "):
        sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], v=v, split_k=4, partials=True)


@pytest.mark.parametrize("block_m,max_seg_len,split_k", [(16, None, 1), (16, 53, 3), (32, 60, 2)])
def test_long_segments_blocks_split_k(block_m, max_seg_len, split_k):
    # Segments of 53 and 41 tokens span several 16-row blocks; max_seg_len None sizes the
    # grid by T (surplus programs exit); split-K adds partial sums into a zeroed v.
    idx = idx_of([53, 2, 41, 7], [1, -1, 0, 1])
    inp = make_lora_inputs(len(idx), 150, [24, 40], 2, 16, torch.float32, ranks=[16, 5], seed=3)
    err = check_direct(inp, idx, block_m=block_m, max_seg_len=max_seg_len, split_k=split_k)
    assert err < TOLERANCE[torch.float32], f"rel err {err:.2e}"


def test_shrink_v_padding_and_minus1_rows_are_zero():
    # v is fully defined: padded rank columns and -1 rows are 0 (so the op is deterministic).
    idx = idx_of([5, 4, 6], [0, -1, 1])
    inp = make_lora_inputs(len(idx), 40, 16, 2, 16, torch.float32, ranks=[3, 16])
    st, ad = build_segments(idx)
    v = torch.full((len(idx), 1, 16), float("nan"))
    sgmv_shrink(inp["x"], inp["A"], st, ad, inp["ranks"], v=v)
    assert torch.equal(v[5:9], torch.zeros(4, 1, 16))
    assert torch.equal(v[:5, :, 3:], torch.zeros(5, 1, 13))
    ref = inp["x"][:5].double() @ inp["A"][0, :3].double().T
    assert torch.allclose(v[:5, 0, :3].double(), ref, rtol=1e-5, atol=1e-6)


def test_static_meta_padded_buffers():
    # Graph-style buffers sized for T segments, refilled with two assignments in turn.
    T = 21
    meta = make_static_meta(T, "cpu")
    inp = make_lora_inputs(T, 40, [16, 24], 3, 8, torch.float16, ranks=[8, 2, 5], seed=5)
    for seed in (0, 1):
        idx = ragged_idx(6, 7, 3, seed)[:T]
        idx = torch.cat([idx, torch.full((T - len(idx),), 2, dtype=torch.int32)])
        fill_static_meta(meta, idx)
        err = check_mode(SGMV, inp, idx, meta=meta)
        assert err < TOLERANCE[torch.float16]


def test_sequential_matches_reference():
    for seed in range(3):
        idx = ragged_idx(7, 9, 4, seed)
        st, ad = build_segments(idx)
        assert torch.equal(idx_from_segments(st, ad), idx.long())
        inp = make_lora_inputs(len(idx), 36, [20, 12], 4, 12, torch.float32,
                               ranks=[12, 1, 6, 9], seed=seed)
        ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx_from_segments(st, ad),
                             inp["scale"], inp["ranks"])
        y = inp["y"].clone()
        sgmv_torch_sequential(y, inp["x"], inp["A"], inp["B"], st, ad, inp["scale"], inp["ranks"])
        assert relative_error(y, ref) < 1e-6
        # In float64 it is the run_sgmv_*.py validation reference: equal to lora_reference.
        v64 = sgmv_shrink_sequential(inp["x"], inp["A"], st, ad, inp["ranks"], torch.float64)
        y64 = inp["y"].double()
        sgmv_expand_sequential(y64, v64, inp["B"], st, ad, inp["scale"], inp["ranks"])
        assert relative_error(y64, ref) < 1e-12
    err = check_mode(LoraMode("seq", sgmv_sequential_lora), inp, idx)
    assert err < 1e-6


# ---------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument
# ---------------------------------------------------------------------------------------
def _small():
    idx = idx_of([3, 2], [0, 1])
    inp = make_lora_inputs(5, 16, 8, 2, 4, torch.float32)
    st, ad = build_segments(idx)
    return inp, idx, st, ad


def test_bad_inputs():
    inp, idx, st, ad = _small()
    x, A, B, y, scale = inp["x"], inp["A"], inp["B"], inp["y"], inp["scale"]
    v = torch.zeros(5, 1, 4)
    bad_shrink = [
        ("x", dict(x=x.to(torch.int32))),
        ("A", dict(A=A[:, :, :8])),
        ("A", dict(A=A.half())),
        ("seg_starts", dict(seg_starts=st[:-1])),
        ("seg_starts", dict(seg_starts=st.long())),
        ("seg_adapter", dict(seg_adapter=ad[:0], seg_starts=st[:1])),
        ("ranks", dict(ranks=torch.tensor([4.0, 2.0]))),
        ("v", dict(v=torch.zeros(5, 1, 4, dtype=torch.float16))),
        ("max_seg_len", dict(max_seg_len=0)),
        ("split_k", dict(split_k=-1)),
        ("block_m", dict(block_m=24)),
        ("block_k", dict(block_k=8)),
    ]
    base = dict(x=x, A=A, seg_starts=st, seg_adapter=ad)
    for arg, kw in bad_shrink:
        with pytest.raises(ValueError, match=f"^{arg}"):
            sgmv_shrink(**{**base, **kw})
    bad_expand = [
        ("y", dict(y=y[:, :4])),
        ("v", dict(v=v[:, :, :2])),
        ("B", dict(B=B.half())),
        ("B\\[1\\]", dict(B=(B, B[:, :, :2]))),
        ("scale", dict(scale=scale.double())),
        ("seg_adapter", dict(seg_adapter=ad.to(torch.int64))),
        ("block_n", dict(block_n=100)),
    ]
    base = dict(y=y.clone(), v=v, B=B, seg_starts=st, seg_adapter=ad, scale=scale)
    for arg, kw in bad_expand:
        with pytest.raises(ValueError, match=f"^{arg}"):
            sgmv_expand(**{**base, **kw})


def test_corrupt_segments_stay_in_bounds():
    # Without check=True the values are not read on the host; the kernels clamp segment
    # bounds to [0, T] (the interpreter would crash on an out-of-bounds access).
    inp, idx, st, ad = _small()
    corrupt = torch.tensor([-4, 3, 99], dtype=torch.int32)
    v = sgmv_shrink(inp["x"], inp["A"], corrupt, ad, max_seg_len=200)
    y = inp["y"].clone()
    sgmv_expand(y, v, inp["B"], corrupt, ad, inp["scale"], max_seg_len=200)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    assert relative_error(y, ref) < TOLERANCE[torch.float32]


def test_bad_values_with_check():
    inp, idx, st, ad = _small()
    x, A = inp["x"], inp["A"]
    bad = [
        ("seg_starts", dict(seg_starts=torch.tensor([0, 3, 4], dtype=torch.int32))),  # ends at 4
        ("seg_starts", dict(seg_starts=torch.tensor([0, 4, 3, 5], dtype=torch.int32),
                            seg_adapter=torch.tensor([0, 1, 0], dtype=torch.int32))),
        ("seg_adapter", dict(seg_adapter=torch.tensor([0, 2], dtype=torch.int32))),
        ("max_seg_len", dict(max_seg_len=2)),
        ("ranks", dict(ranks=torch.tensor([4, 5], dtype=torch.int32))),
    ]
    for arg, kw in bad:
        with pytest.raises(ValueError, match=f"^{arg}"):
            sgmv_shrink(**{**dict(x=x, A=A, seg_starts=st, seg_adapter=ad, check=True), **kw})
    # The mode checks idx itself when it builds meta, and meta against idx with check=True.
    y = inp["y"].clone()
    with pytest.raises(ValueError, match="^idx"):
        sgmv_lora(y, x, A, inp["B"], torch.tensor([0, 0, 0, 2, 2], dtype=torch.int32),
                  inp["scale"])
    with pytest.raises(ValueError, match="^meta"):
        sgmv_lora(y, x, A, inp["B"], idx, inp["scale"], meta=make_meta(idx.flip(0)), check=True)
    assert torch.equal(y, inp["y"])


def test_opcheck():
    idx = idx_of([3, 2, 4], [1, -1, 0])
    inp = make_lora_inputs(len(idx), 24, [16, 8], 2, 8, torch.float32, ranks=[8, 3])
    st, ad = build_segments(idx)
    A = inp["A"]
    v = torch.zeros(len(idx), 2, 8)
    torch.library.opcheck(torch.ops.multilora.sgmv_shrink.default,
                          (v, inp["x"], A, st, ad, inp["ranks"], 4, 1, 0, 0))
    torch.library.opcheck(torch.ops.multilora.sgmv_expand.default,
                          (inp["y"].clone(), v.normal_(), list(inp["B"]), st, ad, inp["scale"],
                           inp["ranks"], None, 0, 0))


@pytest.mark.parametrize("script", ["run_sgmv_shrink", "run_sgmv_expand"])
def test_run_scripts_quick(script, tmp_path, capsys):
    import importlib
    import json
    mod = importlib.import_module(f"sgmv_triton.{script}")
    args = mod.build_parser().parse_args(["--quick", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert mod.main(args) == 0
    name = script.replace("run_", "")
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["points"] and all(p["ok"] and p["err"] < 1e-2 for p in data["points"])
    assert "rel err" in capsys.readouterr().out


def test_compile_fullgraph_cpu():
    # No graph break through the wrappers and both custom ops (aot_eager: no C++ compiler
    # needed on the CPU; the GPU test below uses Inductor).
    idx = idx_of([4, 3, 6], [2, -1, 0])
    inp = make_lora_inputs(len(idx), 40, [16, 8, 8], 3, 8, torch.float32, ranks=[8, 3, 5])
    meta = make_meta(idx)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])

    def step(y, x):
        sgmv_lora(y, x, inp["A"], inp["B"], meta.idx, inp["scale"], inp["ranks"], meta)
        return y

    torch._dynamo.reset()
    y = torch.compile(step, fullgraph=True, backend="aot_eager")(inp["y"].clone(), inp["x"])
    assert relative_error(y, ref) < TOLERANCE[torch.float32]


# ---------------------------------------------------------------------------------------
# GPU tier: real sizes, compile, CUDA graphs
# ---------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("proj", list(LLAMA3_8B_LAYERS))
@pytest.mark.parametrize("workload", ["8x512", "ragged"])
def test_gpu_llama3_8b_bf16(proj, workload):
    h_in, h_out = LLAMA3_8B_LAYERS[proj]
    L = 16
    idx = (idx_of([512] * 8, [0, 3, -1, 7, 7, 12, 1, 15], "cuda") if workload == "8x512"
           else ragged_idx(24, 400, L, seed=1, device="cuda"))
    inp = make_lora_inputs(len(idx), h_in, h_out, L, 16, torch.bfloat16, device="cuda", seed=2)
    err = check_mode(SGMV, inp, idx)
    assert err < TOLERANCE[torch.bfloat16], f"{proj} {workload}: rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_gpu_dtypes_mixed_ranks(dtype):
    # A few thousand ragged tokens, ranks 1..128 with NaN pads, q/k/v slices.
    L = 8
    idx = ragged_idx(20, 300, L, seed=4, device="cuda")
    inp = make_lora_inputs(len(idx), 4096, [4096, 1024, 1024], L, 128, dtype, device="cuda",
                           ranks=[1, 8, 16, 33, 64, 100, 127, 128], seed=6)
    err = check_mode(SGMV, inp, idx)
    assert err < TOLERANCE[dtype], f"{dtype}: rel err {err:.2e}"


@pytest.mark.gpu
def test_gpu_bf16_expand_keeps_v_precision():
    # The expand splits fp32 v into bf16 hi + lo: its error must stay at the level of the
    # fp32 per-segment loop (output rounding only), not the ~3x of a bf16-rounded v.
    idx = ragged_idx(8, 400, 8, seed=12, device="cuda", no_lora_share=0.0)
    inp = make_lora_inputs(len(idx), 4096, [4096, 1024, 1024], 8, 64, torch.bfloat16,
                           device="cuda", seed=13)
    err = check_mode(SGMV, inp, idx)
    err_loop = check_mode(LoraMode("seq", sgmv_sequential_lora), inp, idx)
    assert err < 1.3 * err_loop, f"sgmv {err:.2e} vs fp32 loop {err_loop:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [1, 4])
def test_gpu_short_segments_split_k(split_k):
    idx = ragged_idx(64, 12, 32, seed=7, device="cuda")
    inp = make_lora_inputs(len(idx), 4096, [4096, 1024, 1024], 32, 16, torch.bfloat16,
                           device="cuda", seed=8)
    # adjacent requests with one adapter merge, so the longest segment can exceed 12
    err = check_direct(inp, idx, max_seg_len=make_meta(idx).max_seg_len, split_k=split_k)
    assert err < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_no_sync_and_compile_fullgraph():
    idx = ragged_idx(8, 300, 8, seed=9, device="cuda")
    inp = make_lora_inputs(len(idx), 4096, [4096, 1024, 1024], 8, 16, torch.bfloat16,
                           device="cuda", ranks=[16, 4, 8, 16, 1, 12, 16, 9], seed=10)
    meta = make_meta(idx)
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])

    def step(y, x):
        sgmv_lora(y, x, inp["A"], inp["B"], meta.idx, inp["scale"], inp["ranks"], meta)
        return y

    y = inp["y"].clone()
    step(y, inp["x"])                       # JIT compile outside the sync check
    y = inp["y"].clone()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(y, inp["x"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert relative_error(y, ref) < TOLERANCE[torch.bfloat16]

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    y = compiled(inp["y"].clone(), inp["x"])
    assert relative_error(y, ref) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_new_inputs_and_assignments():
    T, L = 1024, 8
    ranks = [16, 4, 8, 16, 1, 12, 16, 9]
    meta = make_static_meta(T, "cuda")
    base = make_lora_inputs(T, 4096, [4096, 1024, 1024], L, 16, torch.bfloat16, device="cuda",
                            ranks=ranks, seed=11)
    x_buf, y_buf = base["x"].clone(), base["y"].clone()
    A, B, scale, rk = base["A"], base["B"], base["scale"], base["ranks"]

    fill_static_meta(meta, idx_of([T], [0], "cuda"))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):                     # warm-up: JIT outside the capture
        sgmv_lora(y_buf, x_buf, A, B, meta.idx, scale, rk, meta)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sgmv_lora(y_buf, x_buf, A, B, meta.idx, scale, rk, meta)

    for seed in range(3):
        new = make_lora_inputs(T, 4096, [4096, 1024, 1024], L, 16, torch.bfloat16,
                               device="cuda", ranks=ranks, seed=100 + seed)
        idx = ragged_idx(40, 60, L, seed=seed, device="cuda")
        idx = torch.cat([idx, torch.full((T,), 3, dtype=torch.int32, device="cuda")])[:T]
        if seed == 2:
            idx = torch.arange(T, dtype=torch.int32, device="cuda") % L   # T segments of 1
        x_buf.copy_(new["x"])
        y_buf.copy_(new["y"])
        fill_static_meta(meta, idx)
        g.replay()
        torch.cuda.synchronize()
        ref = lora_reference(new["y"], new["x"], A, B, idx, scale, rk)
        skip = idx < 0
        assert torch.equal(y_buf[skip], new["y"][skip])
        assert relative_error(y_buf, ref) < TOLERANCE[torch.bfloat16], f"replay {seed}"
