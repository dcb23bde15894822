"""Tests of the Triton BGMV kernels (bgmv_triton/bgmv_triton.py) against the float64
reference. CPU tier: the Triton interpreter at small, awkward sizes (conftest sets
TRITON_INTERPRET=1 without CUDA). GPU tier (`pytest -m gpu`): Llama-3-8B shapes,
torch.compile(fullgraph=True), CUDA-graph capture and replay with new inputs, PDL on / off."""
import os
import re
import subprocess
import sys

import pytest
import torch
from triton.runtime.jit import JITFunction

from multilora_impl import (LLAMA3_8B_LAYERS, TOLERANCE, check_mode, lora_reference,
                            make_lora_inputs, make_workload, relative_error)
from bgmv_triton import bgmv_triton as bt
from bgmv_triton.bgmv_triton import (DEFAULT_NUM_SMS, bgmv_expand, bgmv_lora, bgmv_shrink,
                                     pdl_enabled, pick_split_k)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


def make_idx(T: int, L: int, no_lora_share: float, seed: int, dtype=torch.int32) -> torch.Tensor:
    """Uniform adapters, a share of -1 rows, and at least one -1 row when T >= 3."""
    idx = make_workload("uniform", T, L, no_lora_share=no_lora_share, seed=seed)
    if T >= 3:
        idx[T // 2] = -1
    return idx.to(dtype)


def shrink_reference(x, A, idx, ranks) -> torch.Tensor:
    """v [T, S, r_max] float64: x @ A[s, i, :r].T, zero on -1 rows and past the rank."""
    A4 = A if A.dim() == 4 else A.unsqueeze(0)
    S, L, r_max, _ = A4.shape
    v = torch.zeros(x.shape[0], S, r_max, dtype=torch.float64)
    x64, A64 = x.double().cpu(), A4.double().cpu()
    for t, i in enumerate(idx.tolist()):
        if i >= 0:
            r = r_max if ranks is None else int(ranks[i])
            v[t, :, :r] = torch.einsum("k,srk->sr", x64[t], A64[:, i, :r])
    return v


def split_fn(split_k, atomic):
    """A bgmv_lora-like call that forces the shrink variant (expand PDL-launched, as in
    bgmv_lora, where the device supports it)."""
    def fn(y, x, A, B, idx, scale, ranks):
        v = bgmv_shrink(x, A, idx, ranks, split_k=split_k, atomic=atomic)
        bgmv_expand(y, v, B, idx, scale, ranks, after_shrink=True)
    return fn


def check_fn(fn, inp, idx) -> float:
    """Run fn on a copy of y; return the relative error to the float64 reference. Rows with
    idx = -1 start as -0.0 and must keep those exact bits: a kernel that stores y + 0 there
    (instead of not storing) turns them into +0.0 and fails."""
    skip = idx < 0
    y0 = inp["y"].clone()
    y0[skip] = -0.0
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    ref = lora_reference(y0, *args)
    y = y0.clone()
    fn(y, *args)
    bits = {2: torch.int16, 4: torch.int32}[y.element_size()]
    assert torch.equal(y[skip].view(bits), y0[skip].view(bits)), "rows with idx = -1 written"
    return relative_error(y, ref)


# ---------------------------------------------------------------------------------------
# CPU tier (interpreter): awkward sizes, slices, mixed ranks with NaN pads, -1 rows
# ---------------------------------------------------------------------------------------
# (T, h_in, h_out or slices, L, r_max, ranks, dtype, idx dtype, share of -1 rows)
CASES = {
    "T1-fp32": (1, 40, 24, 2, 8, None, F32, torch.int32, 0.0),
    "T3-bf16-qkv-mixed": (3, 72, [24, 56, 24], 4, 16, [16, 1, 0, 7], BF16, torch.int64, 0.0),
    "T7-fp16-2slices-r128": (7, 72, [56, 24], 3, 128, [128, 9, 64], F16, torch.int32, 0.2),
    "T33-fp32-mixed": (33, 40, 56, 5, 16, [3, 16, 8, 1, 12], F32, torch.int64, 0.25),
    "T33-bf16-2slices": (33, 72, [24, 56], 6, 32, None, BF16, torch.int32, 0.2),
    "T33-fp16-r1": (33, 40, 24, 3, 1, None, F16, torch.int64, 0.1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bgmv_lora_matches_reference(case, device):
    T, h_in, h_out, L, r_max, ranks, dtype, idx_dtype, share = CASES[case]
    inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, device, ranks=ranks, seed=T)
    idx = make_idx(T, L, share, seed=T + 1, dtype=idx_dtype).to(device)
    err = check_fn(bgmv_lora, inp, idx)
    assert err < TOLERANCE[dtype], f"{case}: rel err {err:.2e}"


def test_registry_entry_and_strided_inputs(device):
    """Through MODES["bgmv_triton"], with x, A, B_s and y all non-contiguous views."""
    T, h_in, h_outs, L, r_max = 7, 40, [24, 56], 3, 16
    inp = make_lora_inputs(T, h_in, h_outs, L, r_max, F16, device, ranks=[16, 4, 11], seed=9)
    wide_x = torch.randn(T, h_in + 8, dtype=F16, device=device)
    wide_x[:, 3:3 + h_in] = inp["x"]
    inp["x"] = wide_x[:, 3:3 + h_in]                                  # row stride h_in + 8
    wide_A = torch.randn(2, L, r_max + 2, h_in, dtype=F16, device=device)
    wide_A[:, :, :r_max] = inp["A"]
    inp["A"] = wide_A[:, :, :r_max]                                   # rank stride padded
    inp["B"] = tuple(b.transpose(1, 2).contiguous().transpose(1, 2) for b in inp["B"])
    assert inp["B"][0].stride(2) != 1                                 # r not contiguous
    wide_y = torch.randn(T, sum(h_outs) + 5, dtype=F16, device=device)
    wide_y[:, :sum(h_outs)] = inp["y"]
    inp["y"] = wide_y[:, :sum(h_outs)]
    idx = torch.tensor([2, -1, 0, 1, -1, 2, 1], dtype=torch.int32, device=device)
    err = check_mode("bgmv_triton", inp, idx)
    assert err < TOLERANCE[F16], f"rel err {err:.2e}"


def test_out_of_range_idx_is_skipped(device):
    """idx >= L cannot be checked without a host sync: the kernels treat it like -1
    (no out-of-bounds read, row untouched) rather than reading another tensor's memory."""
    inp = make_lora_inputs(3, 40, 24, 2, 8, F32, device, seed=4)
    idx = torch.tensor([1, 2, 0], dtype=torch.int32, device=device)   # 2 == L
    y = inp["y"].clone()
    bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    assert torch.equal(y[1], inp["y"][1])
    assert not torch.equal(y[0], inp["y"][0])


def test_rank_above_r_max_is_clamped(device):
    """ranks[i] > r_max breaks the contract; the kernels clamp it to r_max instead of
    reading past the rank dim (here into NaN rows / columns of a wider buffer)."""
    T, h_in, h_out, L, r_max = 3, 40, 24, 2, 6                  # BLOCK_R = 8 > r_max
    inp = make_lora_inputs(T, h_in, h_out, L, r_max, F32, device, ranks=[6, 3], seed=8)
    wide_A = torch.full((L, 8, h_in), float("nan"), device=device)
    wide_A[:, :r_max] = torch.nan_to_num(inp["A"])
    wide_B = torch.full((L, h_out, 8), float("nan"), device=device)
    wide_B[:, :, :r_max] = torch.nan_to_num(inp["B"])
    A, B = wide_A[:, :r_max], wide_B[:, :, :r_max]
    idx = torch.tensor([0, 1, 0], dtype=torch.int32, device=device)
    bad_ranks = torch.tensor([8, 3], dtype=torch.int32, device=device)
    y = inp["y"].clone()
    bgmv_lora(y, inp["x"], A, B, idx, inp["scale"], bad_ranks)
    ref = lora_reference(inp["y"], inp["x"], A, B, idx, inp["scale"], inp["ranks"])
    assert relative_error(y, ref) < TOLERANCE[F32]


# split_k None = picked by shape; h_in = 330 gives 3 chunks of 128 with a ragged last one
# (BLOCK_K = 64 at r_max = 64); h_in = 1100 makes the automatic rule split (T * S < SMs).
@pytest.mark.parametrize("split_k,atomic,h_in,r_max", [
    (1, False, 330, 64), (3, False, 330, 64), (3, True, 330, 64), (None, False, 1100, 8)])
def test_split_k_forced(split_k, atomic, h_in, r_max, device):
    T, L = 3, 3
    if split_k is None:
        assert pick_split_k(T, 2, h_in, r_max, DEFAULT_NUM_SMS) > 1
    ranks = [r_max, 1, r_max // 2 + 3]
    inp = make_lora_inputs(T, h_in, [24, 56], L, r_max, F16, device, ranks=ranks, seed=7)
    idx = torch.tensor([2, -1, 0], dtype=torch.int64, device=device)
    # v itself: exact zeros on -1 rows and past each rank, no NaN from the pads.
    v = bgmv_shrink(inp["x"], inp["A"], idx, inp["ranks"], split_k=split_k, atomic=atomic)
    v_ref = shrink_reference(inp["x"], inp["A"], idx, inp["ranks"])
    assert (v.double()[v_ref == 0] == 0).all()
    assert relative_error(v, v_ref) < 1e-5
    err = check_fn(split_fn(split_k, atomic), inp, idx)
    assert err < TOLERANCE[F16], f"rel err {err:.2e}"


def test_split_rule():
    # Decode at T = 1 on q/k/v (S = 3) with h_in = 4096 splits; a full grid or a short
    # h_in does not.
    assert pick_split_k(1, 3, 4096, 16, 132) > 1
    assert pick_split_k(1, 1, 14336, 128, 132) > 1
    assert pick_split_k(256, 1, 4096, 16, 132) == 1
    assert pick_split_k(1, 1, 576, 16, 132) == 1


def test_v_out_param_and_shrink_only(device):
    # A given v (non-contiguous view) is filled in place and returned.
    inp = make_lora_inputs(3, 40, 24, 2, 8, F32, device, ranks=[8, 5], seed=3)
    idx = torch.tensor([1, -1, 0], dtype=torch.int32, device=device)
    buf = torch.full((3, 2, 8), float("nan"), dtype=F32, device=device)
    v = buf[:, :1, :]                                     # [T, S=1, r_max], strided
    out = bgmv_shrink(inp["x"], inp["A"], idx, inp["ranks"], v=v)
    assert out is v
    assert relative_error(v, shrink_reference(inp["x"], inp["A"], idx, inp["ranks"])) < 1e-6
    assert torch.isnan(buf[:, 1:, :]).all()               # outside the view untouched


# ---------------------------------------------------------------------------------------
# Programmatic dependent launch: the switch and the launch options (CPU)
# ---------------------------------------------------------------------------------------
def test_pdl_off_on_cpu_and_switch(monkeypatch):
    assert not pdl_enabled("cpu") and not pdl_enabled(torch.device("cpu"))
    if not isinstance(bt._bgmv_shrink_kernel, JITFunction):        # the interpreter
        assert not pdl_enabled("cuda")
    monkeypatch.setattr(bt, "PDL_ENABLED", False)                   # the default (opt-in)
    assert not pdl_enabled("cpu") and not pdl_enabled("cuda")
    # The environment variable itself, read once at import (a fresh interpreter).
    code = "import bgmv_triton.bgmv_triton as bt; print(bt.PDL_ENABLED)"
    for value, expected in (("0", "False"), ("", "False"), ("1", "True")):
        env = dict(os.environ, MULTILORA_TRITON_PDL=value)
        out = subprocess.run([sys.executable, "-c", code], cwd=bt.ROOT, env=env,
                             capture_output=True, text=True, check=True).stdout
        assert out.split()[-1] == expected, (value, out)


class _RecordLaunch:
    """Stands in for a @triton.jit kernel: records the keyword arguments of each launch."""
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.calls.append(kw)


@pytest.mark.parametrize("on", [True, False])
def test_pdl_launch_options(on, monkeypatch):
    """With PDL the shrink always gets USE_PDL and launch_pdl; the expand only right after
    the shrink (bgmv_lora, after_shrink=True), never as a standalone bgmv_expand; without
    PDL no launch_pdl is passed at all (the option exists from triton 3.4 on only)."""
    shrink, expand = _RecordLaunch(), _RecordLaunch()
    monkeypatch.setattr(bt, "_bgmv_shrink_kernel", shrink)
    monkeypatch.setattr(bt, "_bgmv_expand_kernel", expand)
    monkeypatch.setattr(bt, "pdl_enabled", lambda device: on)
    d = _small()
    _call_lora(d)
    bgmv_expand(d["y"], torch.zeros(3, 2, 8), d["B"], d["idx"], d["scale"])
    pdl = {"USE_PDL": True, "launch_pdl": True}
    assert [{k: kw.get(k) for k in pdl} for kw in shrink.calls] == \
        [pdl if on else {"USE_PDL": False, "launch_pdl": None}]
    assert [{k: kw.get(k) for k in pdl} for kw in expand.calls] == \
        [pdl if on else {"USE_PDL": False, "launch_pdl": None},
         {"USE_PDL": False, "launch_pdl": None}]


# ---------------------------------------------------------------------------------------
# Bad inputs: ValueError naming the argument
# ---------------------------------------------------------------------------------------
def _small(device="cpu"):
    inp = make_lora_inputs(3, 40, [24, 56], 2, 8, F32, device, seed=0)
    inp["idx"] = torch.tensor([0, 1, -1], dtype=torch.int32, device=device)
    return inp


def _call_lora(d):
    bgmv_lora(d["y"], d["x"], d["A"], d["B"], d["idx"], d["scale"], d["ranks"])


def _call_shrink(d):
    bgmv_shrink(d["x"], d["A"], d["idx"], d["ranks"], v=d.get("v"))


def _call_expand(d):
    v = d.get("v", torch.zeros(3, 2, 8))
    bgmv_expand(d["y"], v, d["B"], d["idx"], d["scale"], d["ranks"])


BAD = {
    "x-int-dtype": (_call_lora, "x", lambda d: d.update(x=d["x"].to(torch.int32))),
    "A-dtype": (_call_lora, "A", lambda d: d.update(A=d["A"].half())),
    "A-h_in": (_call_lora, "A", lambda d: d.update(A=d["A"][..., :39])),
    "A-rank-129": (_call_shrink, "A", lambda d: d.update(A=torch.randn(2, 2, 129, 40))),
    "B-slice-count": (_call_lora, "B", lambda d: d.update(B=d["B"][:1])),
    "B-4-slices": (_call_lora, "B", lambda d: d.update(
        A=torch.randn(4, 2, 8, 40), B=tuple(torch.randn(2, 8, 8) for _ in range(4)),
        y=torch.randn(3, 32))),
    "B-shape": (_call_expand, "B[1]", lambda d: d.update(B=(d["B"][0], d["B"][1][:, :, :4]))),
    "y-shape": (_call_lora, "y", lambda d: d.update(y=d["y"][:, :70])),
    "idx-float": (_call_lora, "idx", lambda d: d.update(idx=d["idx"].float())),
    "idx-shape": (_call_shrink, "idx", lambda d: d.update(idx=d["idx"][:2])),
    "idx-device": (_call_lora, "idx", lambda d: d.update(idx=d["idx"].to("meta"))),
    "A-device": (_call_shrink, "A", lambda d: d.update(A=d["A"].to("meta"))),
    "scale-fp16": (_call_expand, "scale", lambda d: d.update(scale=d["scale"].half())),
    "ranks-shape": (_call_lora, "ranks", lambda d: d.update(
        ranks=torch.tensor([8], dtype=torch.int32))),
    "v-dtype": (_call_expand, "v", lambda d: d.update(v=torch.zeros(3, 2, 8, dtype=F16))),
    "v-shape": (_call_shrink, "v", lambda d: d.update(v=torch.zeros(3, 1, 8))),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_raise_value_error_naming_the_argument(case):
    call, arg, mutate = BAD[case]
    d = _small()
    mutate(d)
    with pytest.raises(ValueError, match=rf"^{re.escape(arg)}:"):
        call(d)


# ---------------------------------------------------------------------------------------
# Custom ops: opcheck, torch.compile without graph breaks (CPU: aot_eager backend)
# ---------------------------------------------------------------------------------------
def _op_args(device, dtype=F16, T=3, h_in=40, h_outs=(24, 56), r_max=8, split_k=0):
    inp = make_lora_inputs(T, h_in, list(h_outs), 3, r_max, dtype, device,
                           ranks=[r_max, 2, 5], seed=11)
    idx = torch.tensor(([2, -1, 0] * T)[:T], dtype=torch.int64, device=device)
    v = torch.zeros(T, len(h_outs), r_max, device=device)
    shrink = (v, inp["x"], inp["A"], idx, inp["ranks"], split_k, False)
    expand = (inp["y"].clone(), v, list(inp["B"]), idx, inp["scale"], inp["ranks"])
    return shrink, expand


def test_opcheck_cpu(device):
    shrink, expand = _op_args(device)
    torch.library.opcheck(torch.ops.multilora.bgmv_shrink.default, shrink)
    torch.ops.multilora.bgmv_shrink(*shrink)             # a real v for the expand
    torch.library.opcheck(torch.ops.multilora.bgmv_expand.default, expand)


def test_run_bgmv_script_cpu(tmp_path):
    """The validate + time script end to end at its tiny interpreter shapes (no timing on
    the CPU), and the JSON it writes."""
    import json
    from bgmv_triton.run_bgmv import build_parser, main
    out = tmp_path / "bgmv.json"
    args = build_parser().parse_args(["--device", "cpu", "--quick", "--tokens", "1", "5",
                                      "--num-adapters", "4", "--mixed-ranks",
                                      "--no-lora-share", "0.3", "--json", str(out)])
    points = main(args)
    assert len(points) == 4 and all(p["ok"] for p in points)
    saved = json.loads(out.read_text())
    assert saved["meta"]["config"]["rank"] == 16 and len(saved["points"]) == 4


def _check_compiled(device, dtype, T, h_in, h_out, r_max, ranks, backend):
    L = len(ranks)
    inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, device, ranks=ranks, seed=5)
    idx = make_idx(T, L, 0.1, seed=6).to(device)
    torch._dynamo.reset()
    compiled = torch.compile(bgmv_lora, backend=backend, fullgraph=True)
    err = check_fn(lambda y, *a: compiled(y, *a), inp, idx)
    assert err < TOLERANCE[dtype], f"rel err {err:.2e}"


def test_compile_fullgraph_cpu(device):
    _check_compiled(device, F32, 3, 40, [24, 56], 8, [8, 3], backend="aot_eager")


# ---------------------------------------------------------------------------------------
# GPU tier: real sizes (Llama-3-8B), all dtypes, compile, CUDA graphs, no hidden syncs
# ---------------------------------------------------------------------------------------
MIXED_RANKS = [16, 8, 64, 128, 1, 32, 16, 100]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 7, 64, 256, 4096])
@pytest.mark.parametrize("layer", list(LLAMA3_8B_LAYERS))
def test_gpu_llama3_8b_shapes(layer, T):
    h_in, h_out = LLAMA3_8B_LAYERS[layer]
    L = len(MIXED_RANKS)
    inp = make_lora_inputs(T, h_in, h_out, L, 128, BF16, "cuda", ranks=MIXED_RANKS, seed=T)
    idx = make_idx(T, L, 0.1, seed=T).cuda()
    err = check_mode("bgmv_triton", inp, idx)
    assert err < TOLERANCE[BF16], f"{layer} T={T}: rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("ranks", [None, "mixed"])
def test_gpu_dtypes(dtype, idx_dtype, ranks):
    T, L, r_max = 33, 8, 64
    rk = None if ranks is None else [min(r, r_max) for r in MIXED_RANKS]
    inp = make_lora_inputs(T, 4096, [4096, 1024, 1024], L, r_max, dtype, "cuda", ranks=rk)
    idx = make_idx(T, L, 0.2, seed=1, dtype=idx_dtype).cuda()
    err = check_mode("bgmv_triton", inp, idx)
    assert err < TOLERANCE[dtype], f"rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("split_k,atomic", [(1, False), (None, False), (8, False), (8, True)])
@pytest.mark.parametrize("layer,T", [("qkv", 1), ("down", 4), ("gate_up", 16)])
def test_gpu_split_k(layer, T, split_k, atomic):
    h_in, h_out = LLAMA3_8B_LAYERS[layer]
    L = len(MIXED_RANKS)
    inp = make_lora_inputs(T, h_in, h_out, L, 128, F16, "cuda", ranks=MIXED_RANKS, seed=2)
    idx = make_idx(T, L, 0.0, seed=3).cuda()
    err = check_fn(split_fn(split_k, atomic), inp, idx)
    assert err < TOLERANCE[F16], f"rel err {err:.2e}"


@pytest.mark.gpu
def test_gpu_opcheck():
    shrink, expand = _op_args("cuda", T=5, h_in=4096, h_outs=(4096, 1024, 1024), r_max=16)
    torch.library.opcheck(torch.ops.multilora.bgmv_shrink.default, shrink)
    torch.ops.multilora.bgmv_shrink(*shrink)
    torch.library.opcheck(torch.ops.multilora.bgmv_expand.default, expand)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_compile_fullgraph(T):
    _check_compiled("cuda", BF16, T, 4096, [4096, 1024, 1024], 64, [64, 16, 32, 8],
                    backend="inductor")


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 256])
def test_gpu_cuda_graph_replay_new_inputs(T):
    """Capture once, then write new x, new idx (a new adapter assignment) and a fresh y
    into the same buffers and replay; each replay must match the reference. The eager call
    runs under sync debug mode "error": any hidden host sync raises."""
    h_in, h_out = LLAMA3_8B_LAYERS["qkv"]
    L, dtype = len(MIXED_RANKS), BF16
    inp = make_lora_inputs(T, h_in, h_out, L, 128, dtype, "cuda", ranks=MIXED_RANKS, seed=0)
    x, y = inp["x"].clone(), inp["y"].clone()            # static buffers
    idx = make_idx(T, L, 0.2, seed=0).cuda()
    A, B, scale, ranks = inp["A"], inp["B"], inp["scale"], inp["ranks"]

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        bgmv_lora(y, x, A, B, idx, scale, ranks)         # warm-up: JIT compile off-graph
        torch.cuda.set_sync_debug_mode("error")          # a hidden host sync raises here
        try:
            bgmv_lora(y, x, A, B, idx, scale, ranks)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bgmv_lora(y, x, A, B, idx, scale, ranks)

    for step in range(3):
        new = make_lora_inputs(T, h_in, h_out, L, 128, dtype, "cpu", ranks=MIXED_RANKS,
                               seed=100 + step)
        new_idx = make_idx(T, L, 0.2, seed=100 + step)
        x.copy_(new["x"])
        idx.copy_(new_idx)
        y.copy_(new["y"])
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_reference(new["y"], new["x"], A, B, new_idx, scale, ranks)
        skip = new_idx < 0
        assert torch.equal(y.cpu()[skip], new["y"][skip])
        err = relative_error(y, ref)
        assert err < TOLERANCE[dtype], f"replay {step}: rel err {err:.2e}"


def _lora_eager_and_replays(inp, idx, news):
    """y after one eager bgmv_lora call, then after each replay of a CUDA graph captured
    once, with the x, idx and y of each entry of news written into the captured buffers."""
    x, y, ix = inp["x"].clone(), inp["y"].clone(), idx.clone()      # static buffers
    A, B, scale = inp["A"], inp["B"], inp["scale"]
    bgmv_lora(y, x, A, B, ix, scale)                 # also the warm-up: JIT compile off-graph
    outs = [y.clone()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bgmv_lora(y, x, A, B, ix, scale)
    for new, new_idx in news:
        x.copy_(new["x"])
        ix.copy_(new_idx)
        y.copy_(new["y"])
        graph.replay()
        outs.append(y.clone())
    torch.cuda.synchronize()
    return outs


@pytest.mark.gpu
@pytest.mark.parametrize("layer", ["o", "qkv"])
@pytest.mark.parametrize("T", [1, 64, 256])
def test_gpu_pdl_on_off(T, layer, monkeypatch):
    """bgmv_lora with PDL on and off, eager and in a CUDA graph replayed with new inputs:
    both match the reference, and y is bitwise identical (same kernels, same reduction
    order; PDL only changes when a kernel may start). T = 1 takes the split-K shrink (a
    torch sum between shrink and expand), T = 256 the plain one; idx has -1 rows, so the
    expand's early exit (which also waits) runs too."""
    device = torch.device("cuda", torch.cuda.current_device())
    if not bt._device_has_pdl(device):
        pytest.skip("no PDL on this device / triton (needs sm_90+ and triton >= 3.5)")
    h_in, h_out = LLAMA3_8B_LAYERS[layer]
    L, r, dtype = 7, 16, BF16
    inp = make_lora_inputs(T, h_in, h_out, L, r, dtype, "cuda", seed=T)
    idx = make_idx(T, L, 0.1, seed=T).cuda()
    news = [(make_lora_inputs(T, h_in, h_out, L, r, dtype, "cpu", seed=200 + k),
             make_idx(T, L, 0.1, seed=200 + k)) for k in range(2)]
    results = {}
    for on in (True, False):
        monkeypatch.setattr(bt, "PDL_ENABLED", on)
        assert pdl_enabled(device) is on
        results[on] = _lora_eager_and_replays(inp, idx, news)
    cases = [(inp["x"], inp["y"], idx)] + [(n["x"], n["y"], i) for n, i in news]
    for k, (x, y0, ix) in enumerate(cases):
        ref = lora_reference(y0, x, inp["A"], inp["B"], ix, inp["scale"], None)
        for on in (True, False):
            err = relative_error(results[on][k], ref)
            assert err < TOLERANCE[dtype], f"PDL {on}, run {k}: rel err {err:.2e}"
        assert torch.equal(results[True][k], results[False][k]), f"run {k}: PDL changed y"


@pytest.mark.parametrize("h_out", [96, [64, 32, 32]], ids=["one_slice", "qkv"])
def test_registry_halves_equal_bgmv_lora_bitwise(h_out):
    """lora_shrink then lora_expand (the engine's lora_overlap="shrink") are bgmv_lora's two
    kernels, split-K partials included (T = 2, h_in = 1024 picks split-K): same y bit for bit."""
    T, h_in = 2, 1024
    S = 3 if isinstance(h_out, list) else 1
    assert bt.split_layout(T, S, h_in, 16, torch.device("cpu"))[2] > 1
    inp = make_lora_inputs(T, h_in, h_out, 3, 16, torch.float32, "cpu", ranks=[16, 5, 0], seed=4)
    idx = torch.tensor([1, 0], dtype=torch.int32)
    args = (inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    y1, y2 = inp["y"].clone(), inp["y"].clone()
    bgmv_lora(y1, inp["x"], *args)
    v = bt.lora_shrink(inp["x"], inp["A"], idx, inp["ranks"])
    assert v.dim() == 4 and v.shape[0] > 1                      # the partials, kept apart
    bt.lora_expand(y2, v, inp["B"], idx, inp["scale"], inp["ranks"])
    assert torch.equal(y1, y2)
