"""Tests of the CUDA C++ BGMV extension (bgmv_cuda/).

CPU tier: the compile-only check (nvcc, sm_80 + sm_90, no spills; skipped only without
nvcc), the ptxas parser, and the Python mirror of every C++ input check (one table of bad
inputs, each raising ValueError that names the argument; limits equal to the C++
constants; the checks trace under torch.compile), none of which builds the extension.
GPU tier (`pytest -m gpu`): correctness against the float64 reference at real sizes (the
checks every mode passes), the same bad-input table through the public wrappers with the
C++ ops replaced by a refusal (no bad input may reach C++), out-of-range idx / ranks,
torch.library.opcheck, torch.compile(fullgraph=True), CUDA-graph replay with new inputs in
the same buffers, no host sync, a broken source surfacing the compiler's message and,
last and in a child process (a crash there cannot end the test run), the C++ ops' own
checks raising ValueError from bgmv_ext.cpp.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from typing import Optional

import pytest
import torch

from multilora_impl import (RANK_GROUPS, TOLERANCE, build_chunks, build_rank_work, check_mode,
                            get_mode, lora_reference, make_lora_inputs, make_meta, make_workload,
                            relative_error, to_rank_major)
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
    # 3 dtypes x (shrink of 128 / 256 threads, expand 16-byte x {J = 1, 4, 8} x {rule
    # "rank" or not} and 1-element x {J = 1, 4}, fused 16-byte / 1-element) x 2 archs, +
    # rule "mma"'s 3 expands (bf16 only: KB = 1, 2, 4) and 1 shrink x 2 archs, + rule
    # "rank"'s token-list instances (half and bf16: 2 shrinks, 3 expands) x 2 archs, +
    # rank-major B's expand (3 dtypes x {16-byte, 1-element} x {grid, token list}) x 2 archs
    assert len(kernels) == 124 and len(names) == 124, sorted(names)
    for arch in ("sm_80", "sm_90"):
        for dt, vec in (("__half", 8), ("__nv_bfloat16", 8), ("float", 4)):
            work = dt != "float"
            assert (f"shrink<{dt}, 128, false>", arch) in names
            assert (f"shrink<{dt}, 256, false>", arch) in names
            assert ((f"shrink<{dt}, 128, true>", arch) in names) == work
            assert ((f"shrink<{dt}, 256, true>", arch) in names) == work
            assert sum(n.startswith(f"expand<{dt},") and a == arch for n, a in names) == \
                (11 if work else 8)
            assert (f"expand<{dt}, {vec}, 1, 8, false, false>", arch) in names
            assert (f"expand<{dt}, {vec}, 1, 8, true, false>", arch) in names
            assert ((f"expand<{dt}, {vec}, 1, 8, true, true>", arch) in names) == work
            assert sum(n.startswith(f"fused<{dt},") and a == arch for n, a in names) == 2
            assert {n for n, a in names if n.startswith(f"expand_rm<{dt},") and a == arch} == \
                {f"expand_rm<{dt}, {w}, {work}>" for w in (vec, 1) for work in ("false", "true")}
        assert {n for n, a in names if n.startswith("expand_mma") and a == arch} == \
            {f"expand_mma<{kb}>" for kb in (1, 2, 4)}
        assert ("shrink_mma<>", arch) in names
    for k in kernels:
        assert k.spill_stores == 0 and k.spill_loads == 0 and k.stack_bytes == 0, k
        # __launch_bounds__(128, 8): 65536 / (8 * 128) registers; fused (128, 4): 128;
        # the mma kernels (128, 6): 80 (the allocation granule below 85), but the mma
        # expand of KB = 4 (128, 4): 128; the token-list shrinks (128, 7): 72, (256, 3): 80
        short = cc.demangle_short(k.kernel)
        # rank-major B's expand (256, 4): 64
        limit = 128 if "fused" in k.kernel or "expand_mma_kernelILi4E" in k.kernel else \
            80 if "mma" in k.kernel else \
            (72 if ", 128," in short else 80) if short.startswith("shrink<") and \
            short.endswith("true>") else 64
        assert 0 < k.registers <= limit, k
        if "shrink_mma" in k.kernel:    # the 4 warps' fp32 sums, 16 rows x 8 tokens
            assert k.smem_bytes == 4 * 16 * 8 * 4, k
        elif "mma" in k.kernel:         # v fragments (8 tokens x 4 parts x 4 KB), y staged
            # (8 tokens x 1,024 columns), the chunk's 8 tokens (PERF_LOG v29: no v sums)
            kb = int(cc.demangle_short(k.kernel)[len("expand_mma<"):-1].split(", ")[0])
            assert k.smem_bytes == 8 * 4 * 4 * kb * 16 + 8 * 1024 * 2 + 8 * 4, k
        elif "expand_rm" in k.kernel:   # the 8 warps' W partial sums, the parked token,
            # adapter, slice and tile (3 int64)
            _, w, _ = cc.demangle_short(k.kernel)[len("expand_rm<"):-1].split(", ")
            assert k.smem_bytes == 8 * int(w) * 32 * 4 + 24, k
        elif "expand" in k.kernel:   # J = 8 parks y in shared memory: 8 per thread, in T;
            # rule "rank" parks its token, slice and tile (3 ints, PERF_LOG v41)
            dt, *_, j, _rank, work = cc.demangle_short(k.kernel)[len("expand<"):-1].split(", ")
            assert k.smem_bytes == (128 * 8 * (4 if dt == "float" else 2) if j == "8" else 0) \
                + (12 if work == "true" else 0), k
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


# ---------------------------------------------------------------------------------------
# The Python mirror of the C++ checks: one table of bad inputs, run by the checkers on CPU
# tensors here (device_type="cpu") and through the public wrappers on the GPU below
# ---------------------------------------------------------------------------------------
def _op_inputs(device):
    """Valid inputs of both ops: T=5, h_in=64, L=3, r_max=8, fp16, S=2 slices (48, 16)."""
    g = torch.Generator().manual_seed(0)
    d = dict(x=torch.randn(5, 64, generator=g).half(),                # [T, h_in]
             A=torch.randn(2, 3, 8, 64, generator=g).half(),          # [S, L, r_max, h_in]
             idx=torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32),
             ranks=torch.tensor([8, 3, 1], dtype=torch.int32),
             v=torch.randn(5, 2, 8, generator=g),                     # [T, S, r_max] fp32
             y=torch.randn(5, 64, generator=g).half(),                # [T, 48 + 16]
             B=[torch.randn(3, h, 8, generator=g).half() for h in (48, 16)],
             scale=torch.rand(3, generator=g))
    return {k: [b.to(device) for b in t] if k == "B" else t.to(device) for k, t in d.items()}


def _offset(t, n):
    """Same values, data_ptr n elements past a fresh (aligned) allocation."""
    buf = torch.empty(t.numel() + n, dtype=t.dtype, device=t.device)
    buf[n:] = t.flatten()
    return buf[n:].view(t.shape)


def _bits(t):
    """t's storage as integers (fp16 / bf16 -> int16, fp32 -> int32), for bitwise checks."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _padded(t, n):
    """Same values, rows padded by n elements: every stride but the last grows."""
    big = torch.empty(*t.shape[:-1], t.shape[-1] + n, dtype=t.dtype, device=t.device)
    big[..., :t.shape[-1]] = t
    return big[..., :t.shape[-1]]


def _strided(t):
    """Same values, stride 2 along the last dim."""
    big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    return big[..., ::2]


def _meta(t):
    return t.to("meta")


def _too_many_tiles(d):
    """fp32, r_max=128: 16 output columns per expand block, 65536 + 1 blocks (a broadcast B)."""
    dev = d["y"].device
    n = 16 * 65536 + 16
    return dict(y=torch.randn(1, n, device=dev), v=torch.randn(1, 1, 128, device=dev),
                B=[torch.randn(1, 1, 128, device=dev).expand(1, n, 128)],
                idx=torch.zeros(1, dtype=torch.int32, device=dev),
                scale=torch.ones(1, device=dev), ranks=None)


# (id, op, argument the error must name, replacements for _op_inputs)
_B = lambda d, s, b: {"B": [b if k == s else d["B"][k] for k in range(2)]}  # noqa: E731
BAD_CASES = [
    ("x_not_tensor", "shrink", "x", lambda d: {"x": d["x"].tolist()}),
    ("x_device", "shrink", "x", lambda d: {"x": _meta(d["x"])}),
    ("x_dtype", "shrink", "x", lambda d: {"x": d["x"].double()}),
    ("x_3d", "shrink", "x", lambda d: {"x": d["x"][None]}),
    ("x_h_in_60", "shrink", "x", lambda d: {"x": d["x"][:, :60], "A": d["A"][..., :60]}),
    ("x_strided", "shrink", "x", lambda d: {"x": _strided(d["x"])}),
    ("x_misaligned_ptr", "shrink", "x", lambda d: {"x": _offset(d["x"], 1)}),
    ("x_misaligned_rows", "shrink", "x", lambda d: {"x": _padded(d["x"], 1)}),
    ("A_not_tensor", "shrink", "A", lambda d: {"A": None}),
    ("A_device", "shrink", "A", lambda d: {"A": _meta(d["A"])}),
    ("A_dtype", "shrink", "A", lambda d: {"A": d["A"].float()}),
    ("A_2d", "shrink", "A", lambda d: {"A": d["A"][0, 0]}),
    ("A_h_in", "shrink", "A", lambda d: {"A": d["A"][..., :56]}),
    ("A_4_slices", "shrink", "A", lambda d: {"A": d["A"].repeat(2, 1, 1, 1)}),
    ("A_rank_129", "shrink", "A", lambda d: {"A": d["A"][:, :, :1].repeat(1, 1, 129, 1)}),
    ("A_strided", "shrink", "A", lambda d: {"A": _strided(d["A"])}),
    ("A_misaligned_ptr", "shrink", "A", lambda d: {"A": _offset(d["A"], 4)}),
    ("A_misaligned_rows", "shrink", "A", lambda d: {"A": _padded(d["A"], 4)}),
    ("idx_device", "shrink", "idx", lambda d: {"idx": _meta(d["idx"])}),
    ("idx_dtype", "shrink", "idx", lambda d: {"idx": d["idx"].float()}),
    ("idx_shape", "shrink", "idx", lambda d: {"idx": d["idx"][:4]}),
    ("idx_strided", "shrink", "idx", lambda d: {"idx": _strided(d["idx"])}),
    ("ranks_dtype", "shrink", "ranks", lambda d: {"ranks": d["ranks"].float()}),
    ("ranks_shape", "shrink", "ranks", lambda d: {"ranks": d["ranks"][:2]}),
    ("ranks_device", "shrink", "ranks", lambda d: {"ranks": _meta(d["ranks"])}),
    ("v_device", "shrink", "v", lambda d: {"v": _meta(d["v"])}),
    ("v_dtype", "shrink", "v", lambda d: {"v": d["v"].half()}),
    ("v_shape", "shrink", "v", lambda d: {"v": d["v"][:, :, :4]}),
    ("v_strided", "shrink", "v", lambda d: {"v": _strided(d["v"])}),
    ("y_not_tensor", "expand", "y", lambda d: {"y": 1.0}),
    ("y_device", "expand", "y", lambda d: {"y": _meta(d["y"])}),
    ("y_dtype", "expand", "y", lambda d: {"y": d["y"].double()}),
    ("y_1d", "expand", "y", lambda d: {"y": d["y"][0]}),
    ("y_strided", "expand", "y", lambda d: {"y": _strided(d["y"])}),
    ("y_width", "expand", "y", lambda d: {"y": d["y"][:, :60]}),
    ("B_empty", "expand", "B", lambda d: {"B": []}),
    ("B_4_slices", "expand", "B", lambda d: {"B": d["B"] * 2}),
    ("B_not_tensor", "expand", "B[1]", lambda d: _B(d, 1, "B")),
    ("B_device", "expand", "B[1]", lambda d: _B(d, 1, _meta(d["B"][1]))),
    ("B_dtype", "expand", "B[1]", lambda d: _B(d, 1, d["B"][1].float())),
    ("B_L", "expand", "B[1]", lambda d: _B(d, 1, d["B"][1][:2])),
    ("B_rank", "expand", "B[0]", lambda d: _B(d, 0, d["B"][0][..., :4])),
    ("B_h_out_0", "expand", "B[1]", lambda d: _B(d, 1, d["B"][1][:, :0])),
    ("B_strided", "expand", "B[1]", lambda d: _B(d, 1, _strided(d["B"][1]))),
    ("B_too_many_tiles", "expand", "B", _too_many_tiles),
    # rank-major B (PERF_LOG v45): every slice in B[0]'s layout
    ("B_rank_major_then_row", "expand", "B[1]", lambda d: {"B": [to_rank_major(d["B"][0]),
                                                                d["B"][1]]}),
    ("B_row_then_rank_major", "expand", "B[1]", lambda d: _B(d, 1, to_rank_major(d["B"][1]))),
    ("B_rank_major_strided", "expand", "B[1]", lambda d: {"B": [  # stride 2 along h_out
        to_rank_major(d["B"][0]), _strided(d["B"][1].transpose(1, 2)).transpose(1, 2)]}),
    ("v_e_device", "expand", "v", lambda d: {"v": _meta(d["v"])}),
    ("v_e_dtype", "expand", "v", lambda d: {"v": d["v"].double()}),
    ("v_e_slices", "expand", "v", lambda d: {"v": d["v"][:, :1]}),
    ("v_e_strided", "expand", "v", lambda d: {"v": _strided(d["v"])}),
    ("v_e_rank_129", "expand", "v", lambda d: {"v": d["v"][..., :1].repeat(1, 1, 129)}),
    ("idx_e_dtype", "expand", "idx", lambda d: {"idx": d["idx"].double()}),
    ("idx_e_shape", "expand", "idx", lambda d: {"idx": d["idx"][:3]}),
    ("ranks_e_shape", "expand", "ranks", lambda d: {"ranks": d["ranks"][:1]}),
    ("scale_device", "expand", "scale", lambda d: {"scale": _meta(d["scale"])}),
    ("scale_dtype", "expand", "scale", lambda d: {"scale": d["scale"].double()}),
    ("scale_shape", "expand", "scale", lambda d: {"scale": d["scale"][:2]}),
    ("scale_strided", "expand", "scale", lambda d: {"scale": _strided(d["scale"])}),
]


def _bad_inputs(case, device):
    d = _op_inputs(device)
    return {**d, **case[3](d)}


@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_python_checks_mirror_cpp_checks(no_build, case):
    """Each check of bgmv_ext.cpp / the launchers has a Python twin that names the argument."""
    _, op, arg, _ = case
    d = _bad_inputs(case, "cpu")
    with pytest.raises(ValueError) as e:
        if op == "shrink":
            bc.check_shrink_args(d["x"], d["A"], d["idx"], d["ranks"], d["v"], device_type="cpu")
        else:
            bc.check_expand_args(d["y"], d["v"], d["B"], d["idx"], d["scale"], d["ranks"],
                                 device_type="cpu")
    assert str(e.value).startswith(f"{arg}: expected "), str(e.value)


def test_python_checks_accept_what_the_kernels_support(no_build):
    d = _op_inputs("cpu")
    assert bc.check_shrink_args(d["x"], d["A"], d["idx"], d["ranks"], d["v"],
                                device_type="cpu").shape == (2, 3, 8, 64)
    assert bc.check_expand_args(d["y"], d["v"], d["B"], d["idx"], d["scale"], d["ranks"],
                                device_type="cpu") == d["B"]
    # 3-D A and one B tensor, v left to the wrapper; T = 0; B rows not 16-byte aligned
    # (1-element loads); any stride along a rank of 1; int64 metadata
    A3, B1 = d["A"][0], d["B"][0]
    assert bc.check_shrink_args(d["x"], A3, d["idx"].long(), None, device_type="cpu").shape \
        == (1, 3, 8, 64)
    bc.check_expand_args(d["y"][:, :48], d["v"][:, :1], B1, d["idx"], d["scale"],
                         d["ranks"].long(), device_type="cpu")
    bc.check_shrink_args(d["x"][:0], A3, d["idx"][:0], None, d["v"][:0, :1], device_type="cpu")
    bc.check_expand_args(d["y"][:, :48], d["v"][:, :1], _padded(B1, 1), d["idx"], d["scale"],
                         device_type="cpu")
    bc.check_expand_args(d["y"][:, :48], d["v"][:, :1, :1], _strided(B1[..., :1]), d["idx"],
                         d["scale"], device_type="cpu")
    # rank-major B (every slice), and B[0] deciding the layout
    rm = [to_rank_major(b) for b in d["B"]]
    assert [torch.equal(a, b) for a, b in zip(rm, d["B"])] == [True, True]
    assert bc.b_rank_major(rm, 8) and not bc.b_rank_major(d["B"], 8)
    assert bc.check_expand_args(d["y"], d["v"], rm, d["idx"], d["scale"], d["ranks"],
                                device_type="cpu") == rm
    # r_max 1 or both unit strides: the row layout; h_out 1 rank-major: any h_out stride
    assert not bc.b_rank_major([to_rank_major(B1[..., :1])], 1)
    assert not bc.b_rank_major([to_rank_major(B1[:, :1])], 8)
    assert bc.b_rank_major([torch.empty_strided((3, 1, 8), (64, 7, 8))], 8)


def test_rank_major_tiles_mirror_the_kernel():
    """expand_rm_tiles: 32 lanes x W columns x 8 / KS warps, KS = min(8, next_pow2(ceil(r /
    8))), W = 16 bytes only with 16-byte aligned B strides and W dividing every h_out."""
    def rm(h, r, dt=torch.float16, L=2):
        return [to_rank_major(torch.empty(L, h, r, dtype=dt))]
    assert bc.expand_rm_tiles(rm(4096, 8), 8) == (2048, 2)        # KS 1
    assert bc.expand_rm_tiles(rm(4096, 16), 16) == (1024, 4)      # KS 2
    assert bc.expand_rm_tiles(rm(4096, 32), 32) == (512, 8)       # KS 4
    assert bc.expand_rm_tiles(rm(4096, 64), 64) == (256, 16)      # KS 8
    assert bc.expand_rm_tiles(rm(4096, 128), 128) == (256, 16)    # KS 8, two steps
    assert bc.expand_rm_tiles(rm(4096, 64, torch.float32), 64) == (128, 32)
    assert bc.expand_rm_tiles(rm(1030, 64), 64) == (32, 33)       # h_out % 8: 1 element
    assert bc.expand_rm_tiles(rm(1024, 5), 5)[0] == 32 * 8 * 8    # rank stride 1024: aligned
    assert bc.expand_rm_tiles(rm(1028, 5), 5)[0] == 32 * 1 * 8    # 1028 % 8 != 0


def test_python_limits_match_cpp_constants():
    text = open(bc.PARAMS_HEADER).read() + open(bc.KERNEL_HEADER).read()
    c = {k: int(v) for k, v in re.findall(r"constexpr int (kBgmv\w+) = (\d+);", text)}
    assert (c["kBgmvMaxRank"], c["kBgmvMaxSlices"]) == (bc.MAX_RANK, bc.MAX_SLICES)
    assert c["kBgmvExpandThreads"] // 32 == bc.EXPAND_WARPS
    assert (c["kBgmvExpandOuts"], c["kBgmvExpandOutsMax"]) == (bc.EXPAND_OUTS, bc.EXPAND_OUTS_MAX)
    assert (c["kBgmvExpandSmallGrid"], c["kBgmvExpandMaxBlocks"]) == \
        (bc.EXPAND_SMALL_GRID, bc.EXPAND_MAX_BLOCKS)
    assert [c["kBgmvTileRuleClassic"], c["kBgmvTileRuleResidency"], c["kBgmvTileRuleRank"],
            c["kBgmvTileRuleMma"]] == \
        [bc.EXPAND_TILE_RULES.index(r) for r in ("classic", "residency", "rank", "mma")]
    assert (c["kBgmvRankGroups"], c["kBgmvWorkStride"]) == (RANK_GROUPS, bc.WORK_STRIDE)
    assert c["kBgmvRmRows"] == bc.RM_ROWS
    assert "constexpr int kBgmvChunkStride = kBgmvChunkTokens + 1;" in text
    assert bc.CHUNK_STRIDE == bc.CHUNK_TOKENS + 1
    assert (c["kBgmvMmaRowsPerWarp"], c["kBgmvChunkTokens"], c["kBgmvMmaMaxSplit"],
            c["kBgmvMmaMaxTiles"], c["kBgmvMmaMinBlocksPerSM"]) == \
        (bc.MMA_ROWS_PER_WARP, bc.CHUNK_TOKENS, bc.MMA_MAX_SPLIT, bc.MMA_MAX_TILES,
         bc.MMA_BLOCKS_PER_SM)
    # output columns per expand block, as bgmv_kernel.cuh's comment states them
    B = lambda r, dt=torch.float16: [torch.empty(1, 100, r, dtype=dt)]  # noqa: E731
    assert bc.expand_tiles(B(128), 128) == (32, 4)                  # 16-byte loads, G = 16
    assert bc.expand_tiles(B(128, torch.float32), 128)[0] == 16     # G = 32
    assert bc.expand_tiles(B(8), 8)[0] == 512                       # G = 1
    assert bc.expand_tiles(B(12), 12)[0] == 32                      # 1-element loads, G = 16
    assert bc.expand_tiles([_padded(B(8)[0], 8)], 8)[0] == 512      # padded, still aligned rows
    assert bc.expand_tiles([_padded(B(8)[0], 1)], 8)[0] == 64       # unaligned: 1-element, G = 8


def test_python_checks_trace_under_torch_compile(no_build):
    """The wrappers run the checks inside torch.compile(fullgraph=True): no graph break."""
    torch._dynamo.reset()

    def step(y, v, x, A, B, idx, scale, ranks):
        bc.check_shrink_args(x, A, idx, ranks, v, device_type="cpu")
        bc.check_expand_args(y, v, B, idx, scale, ranks, device_type="cpu")
        return y + 1

    d = _op_inputs("cpu")
    args = [d[k] for k in ("y", "v", "x", "A", "B", "idx", "scale", "ranks")]
    out = torch.compile(step, fullgraph=True, backend="eager")(*args)
    assert torch.equal(out, d["y"] + 1)
    torch._dynamo.reset()


def test_wrappers_check_before_building(no_build):
    d = _op_inputs("cpu")
    with pytest.raises(ValueError, match="^x: expected a CUDA tensor"):
        bc.bgmv_shrink(d["x"], d["A"], d["idx"], d["ranks"])
    with pytest.raises(ValueError, match="^y: expected a CUDA tensor"):
        bc.bgmv_expand(d["y"], d["v"], d["B"], d["idx"], d["scale"], d["ranks"])


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


@pytest.fixture
def ops_refused(monkeypatch):
    """Load the extension, then replace both C++ ops by a refusal: a bad input that got
    past the Python checks fails the test instead of reaching C++."""
    bc.ensure_loaded()

    def refuse(*args, **kwargs):
        raise AssertionError("a bad input got past the Python checks to the C++ op")
    monkeypatch.setattr(torch.ops.multilora, "bgmv_cuda_shrink", refuse)
    monkeypatch.setattr(torch.ops.multilora, "bgmv_cuda_expand", refuse)


@pytest.mark.gpu
@pytest.mark.parametrize("case", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_inputs_on_gpu_stop_in_python(ops_refused, case):
    _, op, arg, _ = case
    d = _bad_inputs(case, "cuda")
    with pytest.raises(ValueError) as e:
        if op == "shrink":
            bc.bgmv_shrink(d["x"], d["A"], d["idx"], d["ranks"], d["v"])
        else:
            bc.bgmv_expand(d["y"], d["v"], d["B"], d["idx"], d["scale"], d["ranks"])
    assert str(e.value).startswith(f"{arg}: expected "), str(e.value)


@pytest.mark.gpu
def test_bad_inputs_to_bgmv_lora_on_gpu_stop_in_python(ops_refused):
    inp, idx = _small_inputs(h_in=64, device="cuda")
    args = lambda **kw: {**dict(y=inp["y"].clone(), x=inp["x"], A=inp["A"], B=inp["B"], idx=idx,  # noqa: E731
                                scale=inp["scale"], ranks=None), **kw}
    with pytest.raises(ValueError, match="^x: expected a 16-byte aligned"):
        bc.bgmv_lora(**args(x=_offset(inp["x"], 1)))                # data_ptr % 16 == 2
    with pytest.raises(ValueError, match="^A: expected a 16-byte aligned"):
        bc.bgmv_lora(**args(A=_padded(inp["A"], 4)))                # rows of 136 bytes
    with pytest.raises(ValueError, match="^idx:"):
        bc.bgmv_lora(**args(idx=idx.float()))
    with pytest.raises(ValueError, match="^y:"):
        bc.bgmv_lora(**args(y=inp["y"].cpu()))
    with pytest.raises(ValueError, match="^A:"):
        bc.bgmv_lora(**args(A=inp["A"].float()))
    bad = make_lora_inputs(5, 60, 48, 3, 8, torch.float16, "cuda", seed=1)
    with pytest.raises(ValueError, match="multiple of 8"):
        bc.bgmv_lora(bad["y"], bad["x"], bad["A"], bad["B"], idx, bad["scale"])


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
    torch.library.opcheck(torch.ops.multilora.bgmv_cuda_expand.default,      # tile_rule 0
                          (inp["y"].clone(), v, list(inp["B"]), idx, inp["scale"], None, False,
                           0), test_utils=utils)


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
@pytest.mark.parametrize("tiles", ["classic", "residency"])
@pytest.mark.parametrize("T", [1, 64, 256])
def test_pdl_chain_in_graph_matches_plain_launches(T, tiles, monkeypatch):
    """Three dependent calls in one CUDA graph, each call's x the previous call's y, so a
    PDL-launched shrink that read x before the previous expand finished, or an expand that
    read v early, would be wrong. PDL on (sm_90+) and off must give bitwise equal outputs,
    each step within tolerance of the reference on its actual input. tiles (set through
    MULTILORA_EXPAND_TILES): "residency" runs the J = 8 expand at T = 64 and 256."""
    monkeypatch.setenv(bc.TILES_ENV, tiles)
    dt, h, L, r = torch.bfloat16, 4096, 7, 16
    inp = make_lora_inputs(T, h, h, L, r, dt, "cuda", seed=21)
    idx = make_workload("uniform", T, L, no_lora_share=0.1, seed=21).cuda()
    starts = [inp["y"].clone()] + [torch.randn_like(inp["y"]) for _ in range(2)]

    def run(pdl: str) -> list:
        monkeypatch.setenv(bc.PDL_ENV, pdl)
        x0, ys = inp["x"].clone(), [s.clone() for s in starts]

        def chain():
            bc.bgmv_lora(ys[0], x0, inp["A"], inp["B"], idx, inp["scale"])
            bc.bgmv_lora(ys[1], ys[0], inp["A"], inp["B"], idx, inp["scale"])
            bc.bgmv_lora(ys[2], ys[1], inp["A"], inp["B"], idx, inp["scale"])
        chain()                                                   # build + warm up, eager
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            chain()
        outs = []
        for _ in range(3):                                        # replays from fresh starts
            for y, s in zip(ys, starts):
                y.copy_(s)
            graph.replay()
            torch.cuda.synchronize()
            outs.append([y.clone() for y in ys])
        return outs

    assert bc.pdl_enabled(idx.device) == (torch.cuda.get_device_capability()[0] >= 9)
    with_pdl, plain = run("1"), run("0")
    for a, b in zip(with_pdl, plain):
        for ya, yb in zip(a, b):
            assert torch.equal(ya, yb)
    xs = [inp["x"]] + with_pdl[0][:2]
    for k in range(3):
        ref = lora_reference(starts[k], xs[k], inp["A"], inp["B"], idx, inp["scale"])
        assert relative_error(with_pdl[0][k], ref) < TOLERANCE[dt], k


def test_pdl_switch(monkeypatch):
    monkeypatch.setenv(bc.PDL_ENV, "0")
    assert not bc.pdl_enabled(torch.device("cuda", 0))
    monkeypatch.delenv(bc.PDL_ENV)
    assert not bc.pdl_enabled(torch.device("cpu"))


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
    for f in ("bgmv_params.h", "bgmv_kernel.cuh", "bgmv.cu", "bgmv_ext.cpp"):
        shutil.copy(os.path.join(bc.HERE, f), tmp_path / f)
    header = tmp_path / "bgmv_kernel.cuh"
    header.write_text(header.read_text() + f"\nstatic const int bgmv_broken = {marker};\n")
    with pytest.raises(RuntimeError) as e:
        bc.load_extension(sources=[str(tmp_path / "bgmv.cu"), str(tmp_path / "bgmv_ext.cpp")],
                          name="multilora_bgmv_cuda_broken", build_dir=str(tmp_path / "build"),
                          verbose=False)
    msg = str(e.value)
    assert marker in msg and "error" in msg.lower(), msg
    assert "Compiler output" in msg
    assert e.value.__suppress_context__                  # no loader stack trace chained


# ---------------------------------------------------------------------------------------
# GPU tier, last: the C++ ops' own checks (for direct op calls), in a subprocess
# ---------------------------------------------------------------------------------------
_RAW_OP_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import torch
from bgmv_cuda import bgmv_cuda as bc
bc.ensure_loaded()
ops = torch.ops.multilora
dev, f16 = "cuda", torch.float16
x = torch.randn(5, 64, device=dev, dtype=f16)                     # [T, h_in]
A = torch.randn(1, 3, 8, 64, device=dev, dtype=f16)               # [S, L, r_max, h_in]
idx = torch.tensor([0, 2, -1, 1, 0], dtype=torch.int32, device=dev)
v = torch.zeros(5, 1, 8, device=dev)                              # [T, S, r_max]
y = torch.randn(5, 48, device=dev, dtype=f16)
B = [torch.randn(3, 48, 8, device=dev, dtype=f16)]
scale = torch.rand(3, device=dev)
buf = torch.randn(5 * 64 + 1, device=dev, dtype=f16)
calls = {
    "shrink_v_shape": lambda: ops.bgmv_cuda_shrink(x, A, idx, None, v[:, :, :4]),
    "shrink_misaligned_x": lambda: ops.bgmv_cuda_shrink(buf[1:].view(5, 64), A, idx, None, v),
    "expand_scale_dtype": lambda: ops.bgmv_cuda_expand(y, v, B, idx, scale.double(), None),
    "expand_tile_rule": lambda: ops.bgmv_cuda_expand(y, v, B, idx, scale, None, False, 7),
}
for name, call in calls.items():
    print("CALL", name, flush=True)
    try:
        call()
        print("NO_ERROR", name, flush=True)
    except ValueError as e:
        print("VALUE_ERROR", name, str(e).splitlines()[0], flush=True)
    except Exception as e:
        print("OTHER_ERROR", name, type(e).__name__, str(e).splitlines()[0], flush=True)
# the process and the CUDA context are still fine afterwards
ops.bgmv_cuda_shrink(x, A, idx, None, v)
ref = torch.einsum("th,trh->tr", x.float(), A[0, idx.clamp(min=0).long()].float())
ok = idx >= 0
print("AFTER_OK", bool(torch.allclose(v[ok, 0], ref[ok], rtol=1e-2, atol=1e-2)), flush=True)
"""


@pytest.mark.gpu
def test_raw_ops_raise_value_error_from_cpp():
    """Direct op calls with bad inputs: the C++ check's message (returned, not thrown, by
    bgmv_ext.cpp) must surface as a ValueError naming the argument, and the process and its
    CUDA context must survive. (Thrown C++ exceptions crashed the process with SIGSEGV on
    the H200 image, torch 2.11 + g++ 13.3; hence the returned messages.) In a child
    process, so a crash here is reported instead of ending the test run."""
    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _RAW_OP_SCRIPT, ROOT],
                         capture_output=True, text=True, timeout=900)
    text = out.stdout + out.stderr
    assert out.returncode == 0, f"child exited with {out.returncode}:\n{text[-6000:]}"
    for name, msg in [("shrink_v_shape", "multilora::bgmv_cuda_shrink: v: expected"),
                      ("shrink_misaligned_x", "multilora::bgmv_cuda_shrink: x: 16-byte"),
                      ("expand_scale_dtype", "multilora::bgmv_cuda_expand: scale: expected"),
                      ("expand_tile_rule", "multilora::bgmv_cuda_expand: tile_rule: expected")]:
        line = next((ln for ln in out.stdout.splitlines() if ln.split()[1:2] == [name]
                     and not ln.startswith("CALL")), "")
        assert line.startswith(f"VALUE_ERROR {name}") and msg in line, \
            f"{name}: {line!r}\n{text[-6000:]}"
    assert "AFTER_OK True" in out.stdout, text[-6000:]


# ---------------------------------------------------------------------------------------
# Small-batch variants (bgmv_lora(variant="split" | "fused")): correctness vs the float64
# reference, -1 rows bit-identical, NaN rank pads, repeated calls and graph replays (the
# fused kernel's counters must be left zero by every call)
# ---------------------------------------------------------------------------------------
def _variant_check(inp, idx, **kw) -> tuple[float, torch.Tensor]:
    """bgmv_lora(**kw) on a copy of inp["y"]: (relative error against the float64
    reference, the output); rows with idx = -1 must come back bit-identical."""
    skip = idx < 0
    y0 = inp["y"].clone()
    y0[skip] = -0.0                                     # bitwise check: no store on -1 rows
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    ref = lora_reference(y0, *args)
    y = y0.clone()
    bc.bgmv_lora(y, *args, **kw)
    assert torch.equal(_bits(y[skip]), _bits(y0[skip])), "rows with idx = -1 written"
    return relative_error(y, ref), y


VARIANT_CASES = [  # (T, h_in, h_out, L, r_max, ranks, workload, -1 share)
    (1, 4096, 4096, 7, 16, None, "uniform", 0.0),
    (4, 4096, 11008, 7, 16, None, "uniform", 0.0),
    (16, 4096, [4096, 1024, 1024], 8, 64, [64, 8, 16, 1, 64, 32, 48, 64], "uniform", 0.2),
    (64, 4096, 4096, 32, 64, [8, 16, 32, 64] * 8, "uniform", 0.1),
    (256, 4096, 4096, 128, 64, None, "uniform", 0.0),
    (33, 14336, 4096, 4, 128, [128, 9, 0, 100], "skewed", 0.2),
    (7, 72, [584, 64, 64], 3, 12, [12, 5, 1], "uniform", 0.0),   # 1-element B loads
]


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [None, 1, 3, 64])
@pytest.mark.parametrize("variant", ["split", "fused"])
@pytest.mark.parametrize("case", VARIANT_CASES, ids=[f"T{c[0]}_h{c[1]}_r{c[4]}" for c in VARIANT_CASES])
def test_variants_match_reference(case, variant, split_k):
    T, h_in, h_out, L, r_max, ranks, workload, share = case
    for dtype in DTYPES:
        inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, "cuda", ranks=ranks, seed=T)
        idx = make_workload(workload, T, L, no_lora_share=share, seed=T)
        if T > 2:
            idx[T // 2] = -1
        err, _ = _variant_check(inp, idx.cuda(), variant=variant, split_k=split_k)
        assert err < TOLERANCE[dtype], f"{variant} split_k={split_k} {dtype}: rel err {err:.2e}"
    if variant == "fused":
        torch.cuda.synchronize()
        assert all(int(c.abs().sum()) == 0 for c in bc._COUNTERS.values()), "counters not reset"


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["split", "fused"])
def test_variants_deterministic_and_out_of_range(variant):
    T, L, r = 8, 3, 16
    inp = make_lora_inputs(T, 1024, 512, L, r, torch.float32, "cuda", ranks=[16, 8, 4], seed=4)
    idx = torch.tensor([0, 1, 2, -1, 0, 1, 2, 0], dtype=torch.int32, device="cuda")
    outs = []
    for _ in range(3):
        y = inp["y"].clone()
        bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"],
                     variant=variant, split_k=4)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    bad = idx.clone()
    bad[1] = L                                            # out of range -> NaN row, no OOB
    y = inp["y"].clone()
    bc.bgmv_lora(y, inp["x"], inp["A"], inp["B"], bad, inp["scale"], inp["ranks"],
                 variant=variant, split_k=4)
    assert torch.isnan(y[1]).all() and torch.equal(y[3], inp["y"][3])
    assert torch.equal(y[[0, 2, 4, 5, 6, 7]], outs[0][[0, 2, 4, 5, 6, 7]])
    torch.cuda.synchronize()
    assert all(int(c.abs().sum()) == 0 for c in bc._COUNTERS.values())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["split", "fused"])
@pytest.mark.parametrize("T", [1, 64])
def test_variants_cuda_graph_replay(variant, T):
    h_in, h_out, L, r = 4096, [4096, 1024, 1024], 8, 64
    ranks = [64, 8, 16, 1, 64, 32, 48, 64]
    base = make_lora_inputs(T, h_in, h_out, L, r, torch.bfloat16, "cuda", ranks=ranks, seed=1)
    A, B, scale, ranks_t = base["A"], base["B"], base["scale"], base["ranks"]
    x, y = base["x"].clone(), base["y"].clone()
    idx = make_workload("uniform", T, L, no_lora_share=0.2, seed=1).cuda()
    call = lambda: bc.bgmv_lora(y, x, A, B, idx, scale, ranks_t, variant=variant)  # noqa: E731
    call()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for seed in (5, 6, 7):
        new = make_lora_inputs(T, h_in, h_out, L, r, torch.bfloat16, "cuda", ranks=ranks,
                               seed=seed)
        new_idx = make_workload("skewed", T, L, no_lora_share=0.3, seed=seed).cuda()
        x.copy_(new["x"])
        y.copy_(new["y"])
        idx.copy_(new_idx)
        graph.replay()
        torch.cuda.synchronize()
        ref = lora_reference(new["y"], new["x"], A, B, new_idx, scale, ranks_t)
        assert relative_error(y, ref) < TOLERANCE[torch.bfloat16]
        assert torch.equal(y[new_idx < 0], new["y"][new_idx < 0])


@pytest.mark.gpu
def test_fused_opcheck():
    bc.ensure_loaded()
    inp = make_lora_inputs(9, 256, [128, 64], 4, 16, torch.bfloat16, "cuda", seed=6)
    idx = make_workload("uniform", 9, 4, seed=6).cuda()
    v = torch.zeros(2, 9, 2, 16, device="cuda")
    counters = torch.zeros(18, dtype=torch.int32, device="cuda")
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.multilora.bgmv_cuda_fused.default,
                          (inp["y"].clone(), inp["x"], inp["A"], list(inp["B"]), idx,
                           inp["scale"], None, v, counters), test_utils=utils)


def test_variant_and_split_arguments_checked(no_build):
    inp, idx = _small_inputs()
    with pytest.raises(ValueError, match="^variant:"):
        bc.bgmv_lora(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], variant="x")
    assert bc.pick_split_k(1, 1, 4096, 16) > 1 and bc.pick_split_k(256, 1, 4096, 16) == 1
    assert bc.pick_split_k(1, 1, 64, 16) == 1                      # h_in too short to cut


def test_variant_sweep_script_help_and_points():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bgmv_cuda", "run_bgmv_cuda.py"),
                          "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--variants" in out.stdout and "--table" in out.stdout
    from bgmv_cuda.run_bgmv_cuda import VARIANT_NAMES, points, table_points
    names = [p[0] for p in points()]
    assert len(names) == 23 and "mixed{8..64} bs64" in names and "padded64 bs64" in names
    assert "punica 11008 identical bs64" in names   # target 5's worst point
    assert {"8b qkv bs64", "8b gate_up bs64", "8b down bs256"} <= set(names)  # the default's rule
    assert {"u7 bs16", "u7 bs64", "u7 bs128", "punica 11008 bs8"} <= set(names)  # tile rule
    assert {"cuda_tiles", "cuda_rank", "cuda_split2", "cuda_mma_chunks"} <= set(VARIANT_NAMES)
    grid = {(T, h_in, r) for _, T, h_in, h_out, L, r, _, _ in table_points() if h_out == h_in}
    assert grid == {(T, h, r) for T in (1, 4, 16, 64, 256) for h in (4096, 14336)
                    for r in (16, 64)}        # issue 7's decode grid


@pytest.mark.gpu
def test_variant_sweep_script_runs():
    """The sweep end to end, restricted to two fast variants and short timing."""
    from bgmv_cuda.run_bgmv_cuda import build_parser, main
    rows = main(build_parser().parse_args(["--variants", "--only", "cuda", "cuda_fused",
                                           "cuda_tiles", "--rep-ms", "5"]))
    assert all(r["err"][v] < TOLERANCE[torch.bfloat16] for r in rows for v in r["err"])


# ---------------------------------------------------------------------------------------
# Expand tile rules (tiles="classic" | "residency" | "rank", MULTILORA_EXPAND_TILES): the same fp32
# math per output, so bitwise equal results; only the outputs per lane J and the grid differ
# ---------------------------------------------------------------------------------------
def test_expand_tile_rule_argument_and_env(monkeypatch, no_build):
    monkeypatch.delenv(bc.TILES_ENV, raising=False)
    assert bc.DEFAULT_TILES == "rank"                          # the default since PERF_LOG v10
    assert bc.expand_tile_rule() == 2 and bc.expand_tile_rule("classic") == 0
    monkeypatch.setenv(bc.TILES_ENV, "")
    assert bc.expand_tile_rule() == 2
    monkeypatch.setenv(bc.TILES_ENV, "classic")
    assert bc.expand_tile_rule() == 0 and bc.expand_tile_rule("residency") == 1  # argument wins
    assert bc.expand_tile_rule("rank") == 2
    monkeypatch.setenv(bc.TILES_ENV, "residence")             # a typo fails, loudly
    with pytest.raises(ValueError, match=f"^{bc.TILES_ENV}: expected one of"):
        bc.expand_tile_rule()
    with pytest.raises(ValueError, match="^tiles: expected one of"):
        bc.expand_tile_rule("8")
    inp, idx = _small_inputs()                                 # checked before building
    with pytest.raises(ValueError, match=f"^{bc.TILES_ENV}:"):
        bc.bgmv_lora(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    monkeypatch.delenv(bc.TILES_ENV)
    with pytest.raises(ValueError, match="^tiles:"):
        bc.bgmv_lora(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], tiles="J8")


def _b_slices(h_out, r, dtype=torch.bfloat16, L=7):
    """B slices [L, h_out_s, r] (h_out a list: q/k/v slices) on the CPU, for expand_outs."""
    return [torch.empty(L, h, r, dtype=dtype) for h in (h_out if isinstance(h_out, list)
                                                        else [h_out])]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_expand_with_unaligned_v_matches_aligned(dtype):
    """v whose rows are not 16-byte aligned (a slice of a wider buffer: the expand's scalar
    v loads) gives bitwise the result of an aligned v (its 16-byte v loads, PERF_LOG v36),
    with a rank that ends inside a 16-byte chunk (12: the per-element select) and ranks
    that do not (16, 8: none), and both match the reference."""
    T, L, r = 5, 3, 16
    inp = make_lora_inputs(T, 256, 300, L, r, dtype, "cuda", ranks=[16, 12, 8], seed=3)
    idx = torch.tensor([0, 1, 2, -1, 1], dtype=torch.int32, device="cuda")
    v = bc.bgmv_shrink(inp["x"], inp["A"], idx, inp["ranks"])          # [T, 1, r], aligned
    v_odd = _offset(v, 1)                       # the same values 4 bytes off
    assert v_odd.data_ptr() % 16 != 0
    outs = []
    for vv in (v, v_odd):
        y = inp["y"].clone()
        bc.bgmv_expand(y, vv, inp["B"], idx, inp["scale"], inp["ranks"])
        outs.append(y)
    assert torch.equal(_bits(outs[0]), _bits(outs[1]))
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert relative_error(outs[0], ref) < TOLERANCE[dtype]


def test_expand_outs_at_the_h200_points():
    """The Python mirror of bgmv_expand_outs at the points that motivated the rule (bf16,
    h_in 4096, r 16, uniform 7; (J, blocks) under rule 0 and rule 1)."""
    points = {(4096, 8): ((1, 512), (1, 512)),       # 4.2 us: unchanged
              (4096, 16): ((1, 1024), (4, 256)),     # 6.8 us
              (4096, 32): ((4, 512), (4, 512)),      # 4.9 us: unchanged
              (4096, 64): ((4, 1024), (8, 512)),     # 7.3 us
              (4096, 128): ((4, 2048), (8, 1024)),   # 9.6 us: over the cap even at J = 8
              (11008, 8): ((1, 1376), (4, 344)),     # 6.2 us
              (11008, 16): ((4, 688), (8, 352))}     # 5.1 us
    for (h_out, T), rules in points.items():
        got = tuple(bc.expand_outs(_b_slices(h_out, 16), T, 16, k) for k in (0, 1))
        assert got == rules, (h_out, T, got)
        assert bc.expand_outs(_b_slices(h_out, 16), T, 16, 2) == got[1]   # "rank": rule 1's J
    # 1-element loads (r_max 12 in bf16: rows not 16-byte aligned) have no J = 8 kernel
    assert bc.expand_outs(_b_slices(4096, 12), 256, 12, 1) == (4, 256 * 128)
    assert bc.expand_outs(_b_slices(4096, 12), 2, 12, 1) == (4, 2 * 128)  # J = 1: 2 x 512
    # fp32 r 16: 16-byte loads of 4 floats, G = 4: 8 rows per warp, J = 8 at T = 64
    assert bc.expand_outs(_b_slices(4096, 16, torch.float32), 64, 16, 1) == (8, 64 * 16)


TILE_CASES = [  # (T, h_in, h_out (list = q/k/v slices), L, r_max, ranks, share of -1 rows)
    (16, 4096, 4096, 7, 8, None, 0.1),
    (16, 4096, 4096, 7, 16, None, 0.1),
    (64, 4096, 4096, 7, 16, None, 0.1),
    (256, 4096, 4096, 7, 16, None, 0.0),
    (16, 4096, 11008, 7, 16, None, 0.2),
    (64, 4096, 11008, 8, 8, None, 0.1),
    (16, 4096, 14336, 4, 64, [64, 8, 33, 1], 0.2),
    (256, 4096, 14336, 8, 16, None, 0.1),
    (16, 4096, [4096, 1024, 1024], 8, 64, [64, 16, 8, 64, 32, 1, 0, 48], 0.1),
    (64, 2048, [4096, 1024, 1024], 6, 16, [16, 4, 16, 1, 8, 16], 0.2),
    (256, 1024, [4096, 1024, 1024], 4, 8, None, 0.0),
    (64, 128, 4096, 3, 12, [12, 5, 1], 0.1),          # 1-element B loads: J <= 4
]
TILE_IDS = [f"T{c[0]}_h{'qkv' if isinstance(c[2], list) else c[2]}_r{c[4]}" for c in TILE_CASES]


def test_tile_cases_cover_every_expand_kernel():
    """TILE_CASES (GPU test below) run J = 8 in every dtype, and change J between the rules."""
    for dtype in DTYPES:
        js = [tuple(bc.expand_outs(_b_slices(h, r, dtype, L), T, r, k)[0] for k in (0, 1))
              for T, _, h, L, r, _, _ in TILE_CASES]
        assert {j for pair in js for j in pair} == {1, 4, 8}, (dtype, js)
        assert sum(a != b for a, b in js) >= 6, (dtype, js)


@pytest.mark.gpu
@pytest.mark.parametrize("case", TILE_CASES, ids=TILE_IDS)
def test_tile_rules_bitwise_equal_and_match_reference(case):
    """Every rule, plain and split-K shrink: within tolerance of the float64 reference,
    -1 rows untouched, and the residency and rank rules' outputs bitwise equal to the
    classic rule's (each output's fp32 sum runs in the same order whatever J; rule "rank"'s
    narrower lane groups only drop lanes that would add exact zeros)."""
    T, h_in, h_out, L, r_max, ranks, share = case
    for dtype in DTYPES:
        inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, "cuda", ranks=ranks,
                               seed=T + r_max)
        idx = make_workload("uniform", T, L, no_lora_share=share, seed=T)
        idx[T // 2] = -1
        idx = idx.cuda()
        for variant in ("default", "split"):
            outs = {}
            for tiles in bc.EXPAND_TILE_RULES:
                err, outs[tiles] = _variant_check(inp, idx, variant=variant, tiles=tiles)
                assert err < TOLERANCE[dtype], f"{variant} {tiles} {dtype}: rel err {err:.2e}"
            for tiles in bc.EXPAND_TILE_RULES[1:]:
                if tiles in bc.MMA_RULES and dtype == torch.bfloat16:   # another fp32 sum order
                    assert_mma_close(outs[tiles], outs["classic"], inp["y"])
                    continue
                assert torch.equal(_bits(outs["classic"]), _bits(outs[tiles])), \
                    f"{variant} {dtype} {tiles}: the rules differ"


def assert_mma_close(got: torch.Tensor, fma: torch.Tensor, y0: torch.Tensor) -> None:
    """Rule "mma" against an FMA rule on the same inputs: both are fp32 sums of the same
    exact products in another order, rounded once to bf16, so they may differ by one bf16
    step (at most 2^-7 of the value) where the fp32 sums straddle a rounding boundary, plus
    the fp32 reordering error (~2^-20 of the terms' size), never more; NaN rows match."""
    assert torch.equal(torch.isnan(got), torch.isnan(fma))
    ok = ~torch.isnan(fma)
    a, b, y = got[ok].double(), fma[ok].double(), y0[ok].double()
    bound = 2.0**-7 * b.abs() + 2.0**-16 * (y.abs() + (b - y).abs()) + 1e-30
    assert ((a - b).abs() <= bound).all(), float(((a - b).abs() / bound).max())
    assert (a != b).double().mean() < 0.05                  # most sums round the same


def _launch_count(call, kernel: str) -> Optional[int]:
    """How many launches of kernels whose name contains `kernel` `call` makes (profiler),
    or None when the profiler saw no kernel at all (under compute-sanitizer, CUPTI is
    taken: the memcheck runs of these tests then check values only)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    cuda = [e for e in prof.key_averages() if str(getattr(e, "device_type", "")).endswith("CUDA")]
    return sum(e.count for e in cuda if kernel in e.key) if cuda else None


def _launched_expand_j(call, rank_flag: bool = False, kernel: str = "_bgmv_expand_kernel") -> list:
    """J (the last integer template argument) of every `kernel` launch `call` makes, from
    the kernel names torch.profiler records; rank_flag: (J, the RANK_TILES flag) pairs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()
             if str(getattr(e, "device_type", "")).endswith("CUDA")
             and kernel in e.key for _ in range(e.count)]
    short = [cc.demangle_short(n) if n.startswith("_Z") else n for n in names]
    args = [n.split("<", 1)[1].split(">")[0] for n in short]
    js = [int(re.findall(r"\d+", a)[-1]) for a in args]
    if not rank_flag:
        return js
    # the first bool is RANK_TILES (the second, WORK: rule "rank"'s token list)
    rank = [[f for f in re.split(r",\s*", a) if f in ("true", "false")][0] == "true" for a in args]
    return list(zip(js, rank))


@pytest.mark.gpu
def test_tile_rule_launches_the_mirrored_kernel(monkeypatch):
    """The J bgmv_expand_launch picks is the one expand_outs predicts, under every rule
    (rule "rank" through its own kernel instances when B rows take 16-byte loads), and
    MULTILORA_EXPAND_TILES reaches the registry half lora_expand."""
    monkeypatch.delenv(bc.TILES_ENV, raising=False)
    bc.ensure_loaded()
    for T, h_out, r in [(16, 4096, 16), (64, 4096, 16), (256, 4096, 16), (8, 11008, 16),
                        (256, 4096, 12)]:
        inp = make_lora_inputs(T, 1024, h_out, 7, r, torch.bfloat16, "cuda", seed=T)
        idx = make_workload("uniform", T, 7, seed=T).cuda()
        args = (inp["y"].clone(), inp["x"], inp["A"], inp["B"], idx, inp["scale"])
        for k, tiles in enumerate(bc.EXPAND_TILE_RULES):
            call = lambda: bc.bgmv_lora(*args, tiles=tiles)          # noqa: E731
            if tiles in bc.MMA_RULES and r % 8 == 0:                 # bf16: its own kernel
                kb = 1 if r <= 32 else 2 if r <= 64 else 4
                assert _launched_expand_j(call, kernel="_bgmv_expand_mma_kernel") == [kb]
                assert _launched_expand_j(call) == []
                continue
            want = (bc.expand_outs(_b_slices(h_out, r), T, r, k)[0],
                    tiles == "rank" and r % 8 == 0)                  # bf16: 16-byte rows
            got = _launched_expand_j(call, rank_flag=True)
            assert got == [want], (T, h_out, r, tiles)
    inp = make_lora_inputs(64, 1024, 4096, 7, 16, torch.bfloat16, "cuda", seed=3)
    idx = make_workload("uniform", 64, 7, seed=3).cuda()
    v = bc.lora_shrink(inp["x"], inp["A"], idx)
    y = inp["y"].clone()
    assert _launched_expand_j(lambda: bc.lora_expand(y, v, inp["B"], idx, inp["scale"])) == [8]
    monkeypatch.setenv(bc.TILES_ENV, "classic")                 # the rule before v5
    y = inp["y"].clone()
    assert _launched_expand_j(lambda: bc.lora_expand(y, v, inp["B"], idx, inp["scale"])) == [4]
    ref = lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    assert relative_error(y, ref) < TOLERANCE[torch.bfloat16]


def _mma_case_idx(kind: str, T: int, L: int, r: int) -> torch.Tensor:
    """idx (CPU int64) of an mma test case: a permutation ("distinct"), each adapter twice
    ("twice"), all on adapter 3 ("identical"), else uniform; "bad_idx" adds -1 and
    out-of-range values."""
    g = torch.Generator().manual_seed(T + r)
    if kind == "distinct":
        idx = torch.randperm(L, generator=g)[:T]
    elif kind == "twice":
        idx = torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)]
    elif kind == "identical":
        idx = torch.full((T,), 3)
    else:
        idx = torch.randint(0, L, (T,), generator=g)
    if kind == "bad_idx":
        idx[::7] = -1
        idx[3], idx[11] = L, L + 5                       # out of range: NaN rows
    return idx


def _assert_mma_output(out, inp, idx, L, kind, dtype) -> None:
    """An mma-rule output against the float64 reference on valid rows; idx = -1 rows
    untouched; out-of-range rows NaN."""
    ok = (idx >= 0) & (idx < L)
    ref = lora_reference(inp["y"][ok], inp["x"][ok], inp["A"], inp["B"], idx[ok],
                         inp["scale"], inp["ranks"])
    assert relative_error(out[ok], ref) < TOLERANCE[dtype], (kind, dtype)
    assert torch.equal(out[idx == -1], inp["y"][idx == -1])
    if kind == "bad_idx":
        assert torch.isnan(out[idx >= L]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["distinct", "identical", "slices", "ranks", "bad_idx",
                                  "int64", "r128", "r96", "r8", "split"])
def test_mma_rule_matches_rank_rule(kind):
    """Rule "mma" (PERF_LOG v16) against rule "rank" on the same inputs and against the
    float64 reference: one token per adapter, all on one adapter, q/k/v slices with h_out
    not a multiple of 16 (partial m16 tiles), mixed ranks not multiples of 8 with NaN in
    the padding (the masks), idx = -1 / out of range (untouched / NaN rows), int64 idx,
    r_max 128 / 96 / 8 (KB = 4, 4 with a dead block, 1), split-K partial sums of v; half
    and float run as "rank" (bitwise equal)."""
    T, L, r, ranks, h_out = {
        "distinct": (48, 48, 64, None, 2048), "identical": (64, 7, 16, None, 2048),
        "slices": (33, 5, 32, None, [1000, 136, 136]),
        "ranks": (40, 6, 64, [64, 3, 17, 40, 1, 0], 1032), "bad_idx": (40, 6, 32, None, 2048),
        "int64": (64, 9, 16, None, 2048), "r128": (16, 4, 128, [128, 100, 7, 128], 4096),
        "r96": (16, 4, 96, None, 512), "r8": (64, 7, 8, None, 4096),
        "split": (24, 4, 64, [64, 40, 9, 64], 2048)}[kind]
    idx = _mma_case_idx(kind, T, L, r).to(torch.int64 if kind == "int64" else torch.int32).cuda()
    kw = {"variant": "split", "split_k": 4} if kind == "split" else {}
    for dtype in DTYPES:
        inp = make_lora_inputs(T, 1024, h_out, L, r, dtype, "cuda", ranks=ranks, seed=T)
        args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
        outs = {}
        for tiles in ("rank", "mma"):
            outs[tiles] = inp["y"].clone()
            bc.bgmv_lora(outs[tiles], *args, tiles=tiles, **kw)
        if dtype == torch.bfloat16:
            assert_mma_close(outs["mma"], outs["rank"], inp["y"])
        else:
            assert torch.equal(_bits(outs["rank"]), _bits(outs["mma"])), (kind, dtype)
        _assert_mma_output(outs["mma"], inp, idx, L, kind, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["uniform", "twice", "identical", "ranks", "bad_idx",
                                  "slices", "odd_h", "r128", "split"])
def test_mma_chunks_match_rank_rule(kind):
    """Rule "mma" with make_meta's chunks (both kernels per chunk of up to 8 tokens of one
    adapter, PERF_LOG v17) against rule "rank" and the float64 reference: 7 adapters over
    64 tokens (chunks of 8 and a remainder), 128 adapters twice each (the target-2 point,
    smaller), one adapter for all, mixed ranks not multiples of 8 with NaN padding,
    idx = -1 / out of range (untouched / NaN rows), q/k/v slices with partial m16 tiles,
    slices whose widths are not multiples of 8 (y staged with 2-byte loads, not the 16-byte
    path of PERF_LOG v29), r_max 128, an explicit split-K; half and float ignore the chunks
    (bitwise "rank")."""
    T, L, r, ranks, h_out, h_in = {
        "uniform": (64, 7, 16, None, 4096, 4096), "twice": (96, 48, 64, None, 2048, 2048),
        "identical": (64, 7, 16, None, 2048, 1024),
        "ranks": (40, 6, 64, [64, 3, 17, 40, 1, 0], 1032, 1024),
        "bad_idx": (40, 6, 32, None, 2048, 1024), "slices": (33, 5, 32, None, [1000, 136, 136], 1024),
        "odd_h": (37, 4, 16, None, [1003, 21], 512),
        "r128": (16, 4, 128, [128, 100, 7, 128], 4096, 512), "split": (24, 4, 64, [64, 40, 9, 64], 2048, 4096)}[kind]
    idx = _mma_case_idx(kind, T, L, r).int().cuda()
    meta = make_meta(idx)
    kw = {"variant": "split", "split_k": 3} if kind == "split" else {}
    for dtype in DTYPES:
        inp = make_lora_inputs(T, h_in, h_out, L, r, dtype, "cuda", ranks=ranks, seed=T)
        args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
        outs = {}
        for tiles, m in (("rank", None), ("mma", meta)):
            outs[tiles] = inp["y"].clone()
            bc.bgmv_lora(outs[tiles], *args, m, tiles=tiles, **kw)
        if dtype == torch.bfloat16:
            assert_mma_close(outs["mma"], outs["rank"], inp["y"])
            y = inp["y"].clone()
            call = lambda: bc.bgmv_lora(y, *args, meta, tiles="mma", **kw)   # noqa: E731
            assert _launch_count(call, "_bgmv_shrink_mma_kernel") in (1, None)  # chunked shrink
            assert _launch_count(call, "_bgmv_expand_mma_kernel") in (1, None)
        else:
            assert torch.equal(_bits(outs["rank"]), _bits(outs["mma"])), (kind, dtype)
        _assert_mma_output(outs["mma"], inp, idx, L, kind, dtype)


def test_build_chunks_and_checks(monkeypatch):
    """build_chunks: every token with idx != -1 in exactly one row of <= 8 tokens sharing
    one idx value, -1 padding last, that value in the row's last entry; check_chunks refuses
    a wrong layout always and, with MULTILORA_CHECK=1, rows that miss a token, mix adapters
    or name another adapter; mma_split's bounds."""
    g = torch.Generator().manual_seed(5)
    for T, L in [(1, 1), (64, 7), (300, 3), (50, 200)]:
        idx = torch.randint(-1, L, (T,), generator=g)
        full = build_chunks(idx)
        assert full.dtype == torch.int32 and full.shape[1] == bc.CHUNK_STRIDE == bc.CHUNK_TOKENS + 1
        c, adapter = full[:, :bc.CHUNK_TOKENS], full[:, bc.CHUNK_TOKENS]
        assert torch.equal(adapter.long(), idx[c[:, 0].long()])       # the rows' adapter
        live = c >= 0
        assert sorted(c[live].tolist()) == torch.nonzero(idx != -1).flatten().tolist()
        assert bool(live[:, 0].all()) and bool((live.int().diff(dim=1) <= 0).all())
        for row in c:
            assert torch.unique(idx[row[row >= 0].long()]).numel() == 1
        for a in torch.unique(idx[idx != -1]).tolist():          # each adapter's rows: its
            rows = [r[r >= 0] for r in c if idx[r[0].long()] == a]  # tokens in index order,
            assert torch.equal(torch.cat(rows), torch.nonzero(idx == a).flatten().int())
            assert all(r.numel() == bc.CHUNK_TOKENS for r in rows[:-1])   # full but the last
        monkeypatch.setenv("MULTILORA_CHECK", "1")
        bc.check_chunks(full, idx)
        monkeypatch.delenv("MULTILORA_CHECK")
    idx = torch.tensor([0, 1, 0, 2])
    c = build_chunks(idx)
    with pytest.raises(ValueError, match="chunks"):
        bc.check_chunks(c.long(), idx)
    with pytest.raises(ValueError, match="chunks"):
        bc.check_chunks(c[:, :bc.CHUNK_TOKENS].contiguous(), idx)   # no adapter column
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    with pytest.raises(ValueError, match="chunks"):
        bc.check_chunks(c[:-1].contiguous(), idx)                 # a token left out
    bad = c.clone()
    bad[0, 1] = 1                                                 # adapters 0 and 1 mixed
    with pytest.raises(ValueError, match="chunks"):
        bc.check_chunks(bad, idx)
    bad = c.clone()
    bad[0, bc.CHUNK_TOKENS] = 2                                   # the row names adapter 2
    with pytest.raises(ValueError, match="chunks"):
        bc.check_chunks(bad, idx)
    assert bc.mma_split(14, 1, 16, 4096, 132) == 8                # capped at MMA_MAX_SPLIT
    assert bc.mma_split(128, 1, 64, 4096, 132) == 3               # 1,536 of 2 x 792 blocks
    assert bc.mma_split(32, 1, 64, 4096, 132) == 6                # 768 of 792
    assert bc.mma_split(396, 1, 16, 4096, 132) == 2               # one full wave
    assert bc.mma_split(1024, 3, 64, 4096, 132) == 1              # 12,288 blocks: 97% already
    assert bc.mma_split(1, 1, 16, 256, 132) == 2                  # h_in / 128


def test_mma_chunks_pay_rule():
    """The default's switch to rule "mma" with chunks: only bf16 with make_meta's chunks,
    tokens sharing adapters (>= 1.5 per chunk) and >= 48 MB of weights that rule "rank"
    would read token by token (sum of the tokens' ranks, else T x r_max, x (S h_in + sum
    h_out) x 2 bytes): the H200 sweep after PERF_LOG v29 had "mma" faster from 67 MB,
    "rank" up to 38 MB."""
    def case(T, L, r, dtype=torch.bfloat16, h_in=4096, h_outs=(4096,), kind="twice", ranks=None):
        g = torch.Generator().manual_seed(T)
        idx = {"twice": lambda: torch.arange(L).repeat(2)[torch.randperm(2 * L, generator=g)][:T],
               "once": lambda: torch.randperm(L, generator=g)[:T],
               "uniform": lambda: torch.randint(0, L, (T,), generator=g)}[kind]().int()
        x = torch.empty(T, h_in, dtype=dtype)
        S = len(h_outs)
        A = torch.empty(S, L, r, h_in, dtype=dtype) if S > 1 else torch.empty(L, r, h_in, dtype=dtype)
        B = [torch.empty(L, h, r, dtype=dtype) for h in h_outs]
        return bc.mma_chunks_pay(make_meta(idx, ranks=ranks), x, A, B if S > 1 else B[0])
    assert case(256, 128, 64)                                     # 268 MB, 2 per chunk
    # each token counted at its own rank (make_meta's rank_sum): mixed ranks {8..64} over
    # 32 adapters, each used twice, are 31 MB ("rank"); at r_max, or all padded to 64, 67 MB
    mixed = torch.tensor([8, 16, 32, 64]).repeat(8)
    assert not case(64, 32, 64, ranks=mixed)
    assert case(64, 32, 64, ranks=torch.full((32,), 64))
    assert case(64, 32, 64, ranks=mixed.clamp(min=48))           # 52 per token: 55 MB
    assert not case(64, 32, 64, ranks=torch.full((32,), 40))      # 42 MB
    assert case(64, 32, 64)                                       # no ranks: all at r_max, 67 MB
    assert case(256, 7, 16, kind="uniform")                       # u7 bs 256: 67 MB
    assert case(64, 7, 16, h_outs=(14336, 14336), kind="uniform")  # 8b gate/up bs 64: 75 MB
    assert not case(128, 7, 16, kind="uniform")                   # u7 bs 128: 34 MB
    assert not case(64, 7, 16, h_outs=(4096, 1024, 1024), kind="uniform")  # 8b q/k/v: 38 MB
    assert not case(64, 7, 16, h_outs=(11008,), kind="uniform")   # Punica's bs 64: 31 MB
    assert not case(128, 128, 64, kind="once")                    # one token per adapter
    assert not case(256, 128, 64, torch.float16)                  # bf16 only
    assert not bc.mma_chunks_pay(None, torch.empty(4, 8, dtype=torch.bfloat16),
                                 torch.empty(2, 8, 8, dtype=torch.bfloat16),
                                 torch.empty(2, 8, 8, dtype=torch.bfloat16))


def test_expand_mma_tiles_mirror():
    """Rule "mma"'s tiles (CPU mirror of bgmv_mma_pick_tiles): bf16 with 16-byte B rows only
    (else None: the launcher runs rule "rank"); MT the smallest whose grid fits one wave of
    6 blocks per SM, at most 16 (a block tile of 1,024 columns)."""
    m = bc.expand_mma_tiles
    assert m(_b_slices(4096, 64), 128, 64, 132) == (11, 128 * 6)     # T2: 768 of 792 blocks
    assert m(_b_slices(4096, 64), 128, 64, 132, 7) == (10, 128 * 7)  # 896 of 924 (H200 KB 2)
    assert m(_b_slices(4096, 16), 14, 16, 132) == (2, 14 * 32)       # T1: 14 chunks
    assert m(_b_slices(4096, 16), 1, 16, 132) == (1, 64)
    assert m(_b_slices(11008, 16), 8, 16, 132) == (2, 8 * 86)        # identical bs 64
    assert m(_b_slices(4096, 16), 4096, 16, 132) == (16, 4096 * 4)   # cannot fit: the largest
    assert m(_b_slices([4096, 1024, 1024], 16), 1, 16) == (1, 64 + 16 + 16)
    assert m(_b_slices(4096, 16, torch.float16), 64, 16) is None
    assert m(_b_slices(4096, 12), 64, 12) is None                    # 24-byte rows
    assert bc.expand_outs(_b_slices(4096, 16), 64, 16, 3) == bc.expand_outs(_b_slices(4096, 16), 64, 16, 2)
    assert bc.expand_tile_rule("mma") == 3


@pytest.mark.skipif(cc.find_cuda_include() is None or shutil.which("g++") is None,
                    reason="needs g++ and the CUDA toolkit headers")
def test_binding_compiles_against_torch_headers(tmp_path):
    """bgmv_ext.cpp (the torch binding) against this torch's headers, g++ -fsyntax-only:
    CI's torch is the CPU build, so this is as far as the binding can be built there.
    A broken copy must fail, so the check can fail."""
    cc.binding_check()
    src = open(bc.BINDING_SOURCE).read()
    broken = tmp_path / "bgmv_ext.cpp"
    broken.write_text(src.replace("return bgmv_str(op, \": \", name,", "return bgmv_str(op, undeclared_name,", 1))
    assert broken.read_text() != src
    with pytest.raises(RuntimeError, match="undeclared_name"):
        cc.binding_check(source=str(broken))


# ---------------------------------------------------------------------------------------
# Rule "rank"'s token list (PERF_LOG v41)
# ---------------------------------------------------------------------------------------
def _group_of(rank: int) -> int:
    """The group bgmv_params.h gives a valid rank >= 1: next_pow2(rank) == 256 >> g."""
    p2 = 1
    while p2 < rank:
        p2 *= 2
    return max(1, 8 - p2.bit_length() + 1)


def test_build_rank_work_groups_and_checks(monkeypatch):
    """build_rank_work: every token with idx != -1 and rank != 0 in exactly one row (token,
    adapter, rank); invalid idx (adapter -2) and negative ranks (rank -1) in group 0, then
    groups by next_pow2(rank) from 128 down (ranks above 128 with 128), index order within a
    group, the group sizes adding up; make_meta builds the same list with the ranks (and
    none without them); check_work refuses a wrong layout always, a list without ranks or
    beside chunks, and, with MULTILORA_CHECK=1, rows that differ from build_rank_work's."""
    g = torch.Generator().manual_seed(11)
    assert [_group_of(r) for r in (1, 2, 3, 4, 5, 8, 9, 16, 33, 64, 65, 128, 129, 500)] == \
        [8, 7, 6, 6, 5, 5, 4, 4, 2, 2, 1, 1, 1, 1]
    for T, L in [(1, 1), (64, 32), (300, 5), (57, 200)]:
        idx = torch.randint(-1, L, (T,), generator=g)
        idx[torch.rand(T, generator=g) < 0.05] = L + 3              # out of range
        idx[torch.rand(T, generator=g) < 0.03] = -7
        ranks = torch.randint(0, 130, (L,), generator=g)
        ranks[torch.rand(L, generator=g) < 0.1] = -2                # negative: NaN rows
        ranks[torch.rand(L, generator=g) < 0.1] = 0
        work, sizes = build_rank_work(idx.int(), ranks.int())
        assert work.dtype == torch.int32 and work.shape == (sum(sizes), 3) and len(sizes) == 9
        want = []
        for t in range(T):
            i = int(idx[t])
            if i == -1:
                continue
            if i < -1 or i >= L:
                want.append((0, t, -2, -1))
            elif ranks[i] < 0:
                want.append((0, t, i, -1))
            elif ranks[i] > 0:
                want.append((_group_of(int(ranks[i])), t, i, int(ranks[i])))
        want.sort(key=lambda w: (w[0], w[1]))
        assert work.tolist() == [list(w[1:]) for w in want]
        assert list(sizes) == [sum(w[0] == k for w in want) for k in range(9)]
        meta = make_meta(idx.int(), ranks=ranks.int())
        assert torch.equal(meta.rank_work[0], work) and meta.rank_work[1] == sizes
        assert make_meta(idx.int()).rank_work is None
        monkeypatch.setenv("MULTILORA_CHECK", "1")
        rows, listed = bc.check_work((work, sizes), idx.int(), ranks.int())
        assert rows is work and listed == list(sizes)
        monkeypatch.delenv("MULTILORA_CHECK")
    idx, ranks = torch.tensor([0, 1, 0, 2], dtype=torch.int32), torch.tensor([8, 64, 3], dtype=torch.int32)
    work, sizes = build_rank_work(idx, ranks)
    for bad in [(work.long(), sizes), (work[:, :2].contiguous(), sizes), (work, sizes[:-1]),
                (work, (1,) + sizes[1:]), (work.t().contiguous().t(), sizes), work,
                (torch.cat([work, work]), tuple(2 * n for n in sizes))]:
        with pytest.raises(ValueError, match="work"):
            bc.check_work(bad, idx, ranks)
    with pytest.raises(ValueError, match="work"):
        bc.check_work((work, sizes), idx, None)                     # needs the ranks
    with pytest.raises(ValueError, match="work"):
        bc.check_work((work, sizes), idx, ranks, build_chunks(idx))
    monkeypatch.setenv("MULTILORA_CHECK", "1")
    tampered = work.clone()
    tampered[0, 2] = 4                                              # another rank
    with pytest.raises(ValueError, match="work"):
        bc.check_work((tampered, sizes), idx, ranks)
    with pytest.raises(ValueError, match="work"):                   # a token left out
        bc.check_work((work[1:].contiguous(), (sizes[0],) + (sizes[1] - 1,) + sizes[2:]
                       if sizes[1] else sizes), idx, ranks)


def test_rank_work_pays_rule():
    """bgmv_lora takes the token list only where it leaves blocks out: a token without
    LoRA (not listed), or one in a group of smaller ranks than r_max's (PERF_LOG v43: with
    every token at r_max's group the list was slower)."""
    ranks = torch.tensor([64, 64, 40, 8], dtype=torch.int32)
    for idx, r_max, pays in [([0, 1, 2, 1], 64, False),     # 64, 64, 40: one group (33..64)
                             ([0, 1, 3, 1], 64, True),      # rank 8
                             ([0, -1, 2, 1], 64, True),     # idx -1 left out
                             ([0, 1, 2, 1], 128, True),     # r_max 128: 64 is a smaller group
                             ([0, 5, 2, 1], 64, False)]:    # invalid idx: group 0, listed
        work = build_rank_work(torch.tensor(idx, dtype=torch.int32), ranks)
        assert bc.rank_work_pays(work, len(idx), r_max) == pays, (idx, r_max)
    assert not bc.rank_work_pays(None, 4, 64)
    zero = build_rank_work(torch.tensor([3, 0]), torch.tensor([64, 64, 64, 0]))  # rank 0: out
    assert bc.rank_work_pays(zero, 2, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixed", "odd", "bad", "slices", "r128", "none", "split",
                                  "unaligned"])
def test_rank_major_B(kind):
    """Rank-major B (to_rank_major; _bgmv_expand_rm_kernel, PERF_LOG v45) in every dtype: the
    full grid, make_meta's token list and the default (which takes "rank" for it) bitwise
    equal; the float64 reference on valid rows, idx = -1 and rank-0 rows
    untouched, invalid idx / ranks NaN; 1-element loads where h_out is not a multiple of
    16 bytes ("unaligned"); ranks above 64 in two steps ("r128"); split-K partial sums
    ("split"); rule "mma"'s chunked shrink before it (bf16); the fused variant refused.
    (The CUDA-graph replay: test_rank_major_B_cuda_graph.)"""
    T, L, r, ranks, h_out, idx_h = _rank_work_case(kind)
    idx = idx_h.int().cuda()
    kw = {"variant": "split", "split_k": 3} if kind == "split" else {}
    for dtype in DTYPES:
        inp = make_lora_inputs(T, 1024, h_out, L, r, dtype, "cuda", ranks=ranks, seed=T,
                               rank_major=True)
        Bs = inp["B"] if isinstance(inp["B"], tuple) else [inp["B"]]
        assert bc.b_rank_major(Bs, r) and all(b.stride(1) == 1 for b in Bs)
        rk = inp["ranks"].clone()
        if kind == "bad":
            rk[1], rk[2] = -1, r + 8
        meta = make_meta(idx, ranks=rk)
        args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], rk)
        full, listed, default = inp["y"].clone(), inp["y"].clone(), inp["y"].clone()
        bc.bgmv_lora(full, *args, tiles="rank", **kw)
        bc.bgmv_lora(listed, *args, meta, tiles="rank", **kw)
        bc.bgmv_lora(default, *args, meta, **kw)
        assert torch.equal(_bits(full), _bits(listed)), (kind, dtype)
        assert torch.equal(_bits(full), _bits(default)), (kind, dtype)
        rank_t = torch.where((idx_h >= 0) & (idx_h < L), rk.cpu()[idx_h.clamp(0, L - 1)], -1)
        ok = (idx_h >= 0) & (idx_h < L) & (rank_t > 0) & (rank_t <= r)
        outs = [listed]
        if dtype == torch.bfloat16 and kind != "bad":   # the chunked mma shrink, then this expand
            mma = inp["y"].clone()
            bc.bgmv_lora(mma, *args, meta, tiles="mma", **kw)
            outs.append(mma)
        if ok.any():
            ref = lora_reference(inp["y"][ok], inp["x"][ok], inp["A"], inp["B"], idx[ok],
                                 inp["scale"], rk)
            for out in outs:
                assert relative_error(out[ok], ref) < TOLERANCE[dtype], (kind, dtype)
        quiet = (idx_h == -1) | (((idx_h >= 0) & (idx_h < L)) & (rank_t == 0))
        for out in outs:
            assert torch.equal(_bits(out[quiet]), _bits(inp["y"][quiet])), (kind, dtype)
        loud = ~ok & ~quiet
        assert torch.isnan(listed[loud]).all() and (kind == "bad") == bool(loud.any())
    with pytest.raises(ValueError, match="^B: expected unit stride along r_max"):
        bc.bgmv_lora(inp["y"].clone(), *args, variant="fused")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixed", "r128", "unaligned"])
def test_rank_major_B_cuda_graph(kind):
    """Rank-major B's default path (token list, PDL) captured in a CUDA graph and replayed:
    bitwise the eager full grid's result, in every dtype."""
    T, L, r, ranks, h_out, idx_h = _rank_work_case(kind)
    idx = idx_h.int().cuda()
    for dtype in DTYPES:
        inp = make_lora_inputs(T, 1024, h_out, L, r, dtype, "cuda", ranks=ranks, seed=T,
                               rank_major=True)
        meta = make_meta(idx, ranks=inp["ranks"])
        args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
        full = inp["y"].clone()
        bc.bgmv_lora(full, *args, tiles="rank")
        y = inp["y"].clone()
        bc.bgmv_lora(y, *args, meta)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        y.copy_(inp["y"])
        with torch.cuda.graph(graph):
            bc.bgmv_lora(y, *args, meta)
        y.copy_(inp["y"])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(y), _bits(full)), (kind, dtype)


def _rank_work_case(kind: str):
    """(T, L, r_max, ranks, h_out, idx CPU int64) of a token-list test case."""
    g = torch.Generator().manual_seed(len(kind))
    T, L, r, ranks, h_out = {
        "mixed": (64, 32, 64, [8, 16, 32, 64] * 8, 4096),
        "odd": (40, 6, 64, [64, 3, 17, 40, 1, 0], 1032),
        "bad": (48, 6, 32, [32, 5, 20, 7, 0, 16], 2048),
        "slices": (33, 5, 32, [32, 8, 1, 20, 16], [1000, 136, 136]),
        "r128": (16, 4, 128, [128, 100, 7, 128], 4096),
        "none": (16, 3, 16, [16, 8, 0], 512),
        "split": (24, 4, 64, [64, 40, 9, 64], 2048),
        "big": (300, 64, 64, None, 4096),
        "unaligned": (20, 4, 24, [24, 5, 13, 0], [1030, 7])}[kind]
    if ranks is None:
        ranks = torch.randint(1, r + 1, (L,), generator=g).tolist()
    idx = torch.randint(0, L, (T,), generator=g)
    if kind == "bad":
        idx[::7] = -1
        idx[3], idx[11] = L, L + 5                       # out of range: NaN rows
    if kind == "none":
        idx[:] = -1
        idx[5] = 2                                       # rank 0: untouched too
    return T, L, r, ranks, h_out, idx


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mixed", "odd", "bad", "slices", "r128", "none", "split", "big"])
def test_rank_work_bitwise_equals_full_grid(kind, monkeypatch):
    """Rule "rank" with make_meta's token list (grids of only the blocks the ranks need,
    PERF_LOG v41) against the same rule's full grid (x = T): bitwise equal, in every dtype
    (fp32 ignores the list: its kernels have no list instances), in a CUDA graph too; the
    float64 reference on valid rows, idx = -1 and rank-0 rows untouched, invalid idx /
    negative or too-large ranks NaN. In half and bf16 a list that leaves out one token
    leaves that token's row untouched, so the kernels do read the list."""
    T, L, r, ranks, h_out, idx_h = _rank_work_case(kind)
    idx = idx_h.int().cuda()
    kw = {"variant": "split", "split_k": 3} if kind == "split" else {}
    for dtype in DTYPES:
        inp = make_lora_inputs(T, 1024, h_out, L, r, dtype, "cuda", ranks=ranks, seed=T)
        # "bad": a rank above r_max and a negative rank (make_lora_inputs needs them valid)
        rk = inp["ranks"].clone()
        if kind == "bad":
            rk[1], rk[2] = -1, r + 8
        meta = make_meta(idx, ranks=rk)
        args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], rk)
        full, listed = inp["y"].clone(), inp["y"].clone()
        bc.bgmv_lora(full, *args, tiles="rank", **kw)
        bc.bgmv_lora(listed, *args, meta, tiles="rank", **kw)
        assert torch.equal(_bits(full), _bits(listed)), (kind, dtype)
        if kind != "bad":      # MULTILORA_CHECK=1 checks the list on the host (bad idx raise)
            monkeypatch.setenv("MULTILORA_CHECK", "1")
            checked = inp["y"].clone()
            bc.bgmv_lora(checked, *args, meta, tiles="rank", **kw)
            monkeypatch.delenv("MULTILORA_CHECK")
            assert torch.equal(_bits(checked), _bits(listed)), (kind, dtype)
        rank_t = torch.where((idx_h >= 0) & (idx_h < L), rk.cpu()[idx_h.clamp(0, L - 1)], -1)
        ok = (idx_h >= 0) & (idx_h < L) & (rank_t > 0) & (rank_t <= r)
        if ok.any():
            ref = lora_reference(inp["y"][ok], inp["x"][ok], inp["A"], inp["B"], idx[ok],
                                 inp["scale"], rk)
            assert relative_error(listed[ok], ref) < TOLERANCE[dtype], (kind, dtype)
        quiet = (idx_h == -1) | (((idx_h >= 0) & (idx_h < L)) & (rank_t == 0))
        assert torch.equal(_bits(listed[quiet]), _bits(inp["y"][quiet]))
        loud = ~ok & ~quiet
        assert torch.isnan(listed[loud]).all() and (kind == "bad") == bool(loud.any())
        # in a CUDA graph, replayed
        y = inp["y"].clone()
        bc.bgmv_lora(y, *args, meta, tiles="rank", **kw)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        y.copy_(inp["y"])
        with torch.cuda.graph(graph):
            bc.bgmv_lora(y, *args, meta, tiles="rank", **kw)
        y.copy_(inp["y"])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(_bits(y), _bits(full)), (kind, dtype)
        # a list without its first row: that token's row stays as it was
        work, sizes = meta.rank_work
        if work.shape[0] and kind != "none":
            first = next(k for k, n in enumerate(sizes) if n)
            short = (work[1:].contiguous(), tuple(n - (k == first) for k, n in enumerate(sizes)))
            y = inp["y"].clone()
            bc.bgmv_lora(y, *args, dataclasses.replace(meta, rank_work=short), tiles="rank", **kw)
            t0 = int(work[0, 0])
            want = inp["y"][t0] if dtype != torch.float32 else full[t0]   # fp32: no list
            assert torch.equal(_bits(y[t0]), _bits(want)), (kind, dtype)
            rest = torch.arange(T) != t0
            assert torch.equal(_bits(y[rest]), _bits(full[rest])), (kind, dtype)
