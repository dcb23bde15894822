"""Tests of the CUDA C++ BGMV extension (bgmv_cuda/).

CPU tier: the compile-only check (nvcc, sm_80 + sm_90, no spills; skipped only without
nvcc), the ptxas parser, and the Python-side input checks, proving that none of them
builds the extension.  GPU tier (`pytest -m gpu`): correctness against the float64
reference at real sizes (the checks every mode passes), bad inputs, out-of-range
idx / ranks, torch.library.opcheck, torch.compile(fullgraph=True), CUDA-graph replay with
new inputs in the same buffers, no host sync, and a broken source surfacing the
compiler's message.
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from multilora_impl import (TOLERANCE, check_mode, get_mode, lora_reference, make_lora_inputs,
                            make_workload, relative_error)
from bgmv_cuda import bgmv_cuda as bc
from bgmv_cuda import compile_check as cc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


# ---------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(cc.find_nvcc() is None, reason="nvcc not installed (compile check needs it)")
def test_compile_check_sm80_sm90_no_spills():
    kernels, text = cc.run_compile_check(("80", "90"))
    names = {(cc.demangle_short(k.kernel), k.arch) for k in kernels}
    # 3 dtypes x (shrink, expand 16-byte, expand 1-element) x 2 archs, each reported once
    assert len(kernels) == 18 and len(names) == 18, sorted(names)
    for arch in ("sm_80", "sm_90"):
        for dt in ("__half", "__nv_bfloat16", "float"):
            assert (f"shrink<{dt}>", arch) in names
            assert sum(n.startswith(f"expand<{dt},") and a == arch for n, a in names) == 2
    for k in kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, k
        # __launch_bounds__(128, 8): 65536 registers / (8 blocks * 128 threads)
        assert 0 < k.registers <= 64, k
    assert cc.spill_lines(text) == []


def test_ptxas_parser_catches_spills():
    text = """ptxas info    : Compiling entry function '_Z19_bgmv_shrink_kernelI6__halfEv16BgmvShrinkParams' for 'sm_90'
ptxas info    : Function properties for _Z19_bgmv_shrink_kernelI6__halfEv16BgmvShrinkParams
    24 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 64 bytes smem, 472 bytes cmem[0]"""
    (k,) = cc.parse_ptxas(text)
    assert (k.arch, k.registers, k.stack_bytes, k.spill_stores, k.spill_loads, k.smem_bytes) \
        == ("sm_90", 64, 24, 8, 12, 64)
    assert cc.demangle_short(k.kernel) == "shrink<__half>"
    assert len(cc.spill_lines(text)) == 1
    assert cc.spill_lines(text.replace("8 bytes spill stores, 12", "0 bytes spill stores, 0")) == []


@pytest.fixture
def no_build(monkeypatch):
    """Fail the test if anything tries to build the extension."""
    from torch.utils import cpp_extension

    def refuse(*args, **kwargs):
        raise AssertionError("the extension must not be built here")
    monkeypatch.setattr(cpp_extension, "load", refuse)
    monkeypatch.setattr(bc, "load_extension", refuse)
    return refuse


def _small_inputs(h_in=64, h_out=48, S=None, dtype=torch.float16, device="cpu"):
    h = h_out if S is None else [h_out] * S
    inp = make_lora_inputs(5, h_in, h, 3, 8, dtype, device, seed=1)
    idx = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=device)
    return inp, idx


@pytest.mark.parametrize("case, arg, pattern", [
    ("cpu", "x", "CUDA"),
    ("h_in", "x", "multiple of 8"),
    ("slices", "B", "at most 3"),
    ("scale_dtype", "scale", "float32"),
    ("rank", "A", "r_max <= 128"),
])
def test_bad_inputs_raise_value_error_without_building(no_build, case, arg, pattern):
    inp, idx = _small_inputs(h_in=60 if case == "h_in" else 64, S=4 if case == "slices" else None)
    if case == "scale_dtype":
        inp["scale"] = inp["scale"].double()
    if case == "rank":
        inp = make_lora_inputs(5, 64, 48, 3, 129, torch.float16, seed=1)
    with pytest.raises(ValueError, match=pattern) as e:
        bc.bgmv_lora(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert str(e.value).startswith(f"{arg}:")
    assert not bc._STATE["loaded"] or torch.cuda.is_available()


def test_registry_resolves_without_building(no_build):
    assert get_mode("bgmv_cuda").resolve() is bc.bgmv_lora
    assert get_mode("bgmv_cuda").needs_cuda


@pytest.mark.parametrize("script", ["bgmv_cuda/bgmv_cuda.py", "bgmv_cuda/compile_check.py"])
def test_help_runs_without_building(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout and "example" in out.stdout


# ---------------------------------------------------------------------------------------
# GPU tier: correctness at real sizes, all dtypes
# ---------------------------------------------------------------------------------------
# (name, T, h_in, h_out (list = slices), L, r_max, ranks, workload, share of -1 rows)
CASES = [
    ("T1_odd", 1, 72, 584, 3, 16, None, "uniform", 0.0),
    ("T3_distinct", 3, 584, 72, 4, 8, None, "distinct", 0.0),
    ("T7_any_h_out", 7, 72, 100, 5, 32, None, "uniform", 0.3),
    ("T133_mixed_ranks_nan", 133, 584, 1000, 6, 128, [1, 7, 16, 33, 100, 128], "uniform", 0.25),
    ("rank1", 64, 256, 264, 2, 1, None, "skewed", 0.1),
    ("rmax12_1elem_loads", 57, 128, 520, 3, 12, [12, 5, 1], "skewed", 0.1),
    ("rmax6_rank0", 33, 64, 200, 3, 6, [6, 0, 3], "uniform", 0.0),
    ("decode_T1_r128", 1, 4096, 4096, 1, 128, None, "identical", 0.0),
    ("llama8b_up_T256", 256, 4096, 14336, 32, 16, None, "uniform", 0.0),
    ("llama8b_down_mixed", 64, 14336, 4096, 8, 64, [64, 8, 16, 1, 64, 32, 48, 64], "uniform", 0.2),
    ("llama8b_qkv", 256, 4096, [4096, 1024, 1024], 8, 64, [64, 16, 8, 64, 32, 1, 64, 48],
     "skewed", 0.1),
    ("llama8b_gate_up", 32, 4096, [14336, 14336], 4, 16, None, "identical", 0.0),
    ("distinct_T64", 64, 4096, [4096, 1024, 1024], 64, 16, None, "distinct", 0.0),
    ("T3000", 3000, 1024, 2048, 10, 32, [32, 8, 1, 16, 32, 24, 32, 2, 32, 31], "uniform", 0.1),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_reference(case, dtype):
    name, T, h_in, h_out, L, r_max, ranks, workload, share = case
    inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, "cuda", ranks=ranks, seed=T + r_max)
    idx = make_workload(workload, T, L, no_lora_share=share, seed=T)
    if T > 2:
        idx[T // 2] = -1        # at least one untouched row, checked bit-exactly by check_mode
    err = check_mode("bgmv_cuda", inp, idx)
    assert err < TOLERANCE[dtype], f"{name} {dtype}: rel err {err:.3e}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp16", "bf16", "fp32"])
def test_int64_metadata_and_unaligned_B_rows(dtype):
    """int64 idx / ranks, and B views whose rows are not 16-byte aligned (1-element loads)."""
    T, h_in, L, r = 40, 256, 4, 16
    inp = make_lora_inputs(T, h_in, [136, 72], L, r, dtype, "cuda", ranks=[16, 9, 1, 16], seed=3)
    wide = [torch.randn(L, b.shape[1], r + 1, device="cuda").to(dtype) for b in inp["B"]]
    for w, b in zip(wide, inp["B"]):
        w[..., :r] = b
    inp["B"] = tuple(w[..., :r] for w in wide)          # stride (.., r + 1, 1): unaligned rows
    inp["ranks"] = inp["ranks"].long()
    idx = make_workload("uniform", T, L, no_lora_share=0.2, seed=5).long()
    err = check_mode("bgmv_cuda", inp, idx)
    assert err < TOLERANCE[dtype], err


@pytest.mark.gpu
def test_all_rows_without_adapter_are_untouched():
    inp = make_lora_inputs(17, 512, 256, 3, 16, torch.float16, "cuda", seed=2)
    y = inp["y"].clone()
    idx = torch.full((17,), -1, dtype=torch.int32, device="cuda")
    bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    assert torch.equal(y, inp["y"])


@pytest.mark.gpu
def test_out_of_range_idx_and_rank_give_nan_rows():
    """Values only the kernels can see: no out-of-bounds read, the token's row becomes NaN."""
    T, L, r = 6, 3, 16
    inp = make_lora_inputs(T, 128, [96, 40], L, r, torch.float32, "cuda", ranks=[16, 8, 4],
                           seed=4)
    inp["ranks"][2] = r + 1                              # invalid rank for adapter 2
    idx = torch.tensor([0, L, -1, 1, -5, 2], dtype=torch.int32, device="cuda")
    y = inp["y"].clone()
    bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert torch.isnan(y[[1, 4, 5]]).all()
    assert torch.equal(y[2], inp["y"][2])
    ok = [0, 3]
    ref = lora_reference(inp["y"][ok], inp["x"][ok], inp["A"], inp["B"], idx[ok], inp["scale"],
                         inp["ranks"])
    assert relative_error(y[ok], ref) < TOLERANCE[torch.float32]


@pytest.mark.gpu
def test_bad_inputs_on_gpu_raise_value_error():
    inp, idx = _small_inputs(h_in=64, device="cuda")
    args = lambda **kw: {**dict(y=inp["y"].clone(), x=inp["x"], A=inp["A"], B=inp["B"], idx=idx,  # noqa: E731
                                scale=inp["scale"], ranks=None), **kw}
    buf = torch.randn(5 * 64 + 1, dtype=torch.float16, device="cuda")
    x_misaligned = buf[1:].view(5, 64)                   # data_ptr % 16 == 2
    with pytest.raises(ValueError, match="x: 16-byte"):
        bc.bgmv_lora(**args(x=x_misaligned))
    with pytest.raises(ValueError, match="idx"):
        bc.bgmv_lora(**args(idx=idx.float()))
    with pytest.raises(ValueError, match="^y:"):
        bc.bgmv_lora(**args(y=inp["y"].cpu()))
    with pytest.raises(ValueError, match="^A:"):
        bc.bgmv_lora(**args(A=inp["A"].float()))
    bad = make_lora_inputs(5, 60, 48, 3, 8, torch.float16, "cuda", seed=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        bc.bgmv_lora(bad["y"], bad["x"], bad["A"], bad["B"], idx, bad["scale"])
    # the ops check on their own too (they can be called without the wrapper)
    v = torch.empty(5, 1, 8, device="cuda")
    with pytest.raises(ValueError, match="v: expected"):
        torch.ops.multilora.bgmv_cuda_shrink(inp["x"], inp["A"], idx, None, v[:, :, :4])


# ---------------------------------------------------------------------------------------
# GPU tier: custom ops, torch.compile, CUDA graphs, build errors
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_opcheck():
    bc.ensure_loaded()
    inp = make_lora_inputs(9, 256, [128, 64], 4, 16, torch.bfloat16, "cuda", seed=6)
    idx = make_workload("uniform", 9, 4, seed=6).cuda()
    A4 = inp["A"]
    v = torch.zeros(9, 2, 16, device="cuda")
    # no autograd: these are inference ops (no input requires grad), so that check is N/A
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.multilora.bgmv_cuda_shrink.default,
                          (inp["x"], A4, idx, None, v), test_utils=utils)
    v = torch.randn(9, 2, 16, device="cuda")
    torch.library.opcheck(torch.ops.multilora.bgmv_cuda_expand.default,
                          (inp["y"].clone(), v, list(inp["B"]), idx, inp["scale"], None),
                          test_utils=utils)


@pytest.mark.gpu
@pytest.mark.parametrize("h_out", [1024, [512, 128, 128]], ids=["one_slice", "qkv"])
def test_torch_compile_fullgraph(h_out):
    torch._dynamo.reset()
    T, h_in, L, r = 24, 512, 4, 32

    def step(y, x, A, B, idx, scale, ranks):
        bc.bgmv_lora(y, x, A, B, idx, scale, ranks)
        return y

    compiled = torch.compile(step, fullgraph=True)
    for seed in (0, 1):                                  # second call: fresh inputs
        inp = make_lora_inputs(T, h_in, h_out, L, r, torch.float16, "cuda",
                               ranks=[32, 8, 1, 20], seed=seed)
        idx = make_workload("uniform", T, L, no_lora_share=0.25, seed=seed).cuda()
        y = inp["y"].clone()
        compiled(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
        ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"],
                             inp["ranks"])
        assert relative_error(y, ref) < TOLERANCE[torch.float16]
        skip = idx < 0
        assert torch.equal(y[skip], inp["y"][skip])


@pytest.mark.gpu
def test_cuda_graph_replay_with_new_inputs_and_idx():
    T, h_in, h_out, L, r = 48, 1024, [1024, 256, 256], 6, 16
    ranks = [16, 4, 16, 1, 8, 16]
    base = make_lora_inputs(T, h_in, h_out, L, r, torch.float16, "cuda", ranks=ranks, seed=10)
    A, B, scale, ranks_t = base["A"], base["B"], base["scale"], base["ranks"]
    x, y = base["x"].clone(), base["y"].clone()                       # static buffers
    idx = make_workload("uniform", T, L, no_lora_share=0.2, seed=10).cuda()
    bc.bgmv_lora(y, x, A, B, idx, scale, ranks_t)                     # build + load, eager
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                                     # warm-up off the default
        bc.bgmv_lora(y, x, A, B, idx, scale, ranks_t)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bc.bgmv_lora(y, x, A, B, idx, scale, ranks_t)
    for seed in (11, 12):
        new = make_lora_inputs(T, h_in, h_out, L, r, torch.float16, "cuda", ranks=ranks,
                               seed=seed)
        new_idx = make_workload("skewed", T, L, no_lora_share=0.3, seed=seed).cuda()
        x.copy_(new["x"])
        y.copy_(new["y"])
        idx.copy_(new_idx)
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_reference(new["y"], new["x"], A, B, new_idx, scale, ranks_t)
        assert relative_error(y, ref) < TOLERANCE[torch.float16]
        skip = new_idx < 0
        assert torch.equal(y[skip], new["y"][skip])


@pytest.mark.gpu
def test_call_path_has_no_host_sync():
    inp = make_lora_inputs(16, 256, [256, 64], 4, 16, torch.bfloat16, "cuda", seed=7)
    idx = make_workload("uniform", 16, 4, no_lora_share=0.2, seed=7).cuda()
    y = inp["y"].clone()
    bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"])  # build outside
    torch.cuda.set_sync_debug_mode("error")
    try:
        bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_broken_source_raises_with_compiler_message(tmp_path):
    marker = "bgmv_deliberately_undeclared_identifier"
    for f in ("bgmv_kernel.cuh", "bgmv.cu", "bgmv_ext.cu"):
        shutil.copy(os.path.join(bc.HERE, f), tmp_path / f)
    header = tmp_path / "bgmv_kernel.cuh"
    header.write_text(header.read_text() + f"\nstatic const int bgmv_broken = {marker};\n")
    with pytest.raises(RuntimeError) as e:
        bc.load_extension(sources=[str(tmp_path / "bgmv.cu"), str(tmp_path / "bgmv_ext.cu")],
                          name="multilora_bgmv_cuda_broken", build_dir=str(tmp_path / "build"),
                          verbose=False)
    msg = str(e.value)
    assert marker in msg and "error" in msg.lower(), msg
    assert "Compiler output" in msg
    assert e.value.__suppress_context__                  # no loader stack trace chained
