"""Adapters to public Triton multi-LoRA kernels (public_kernels.py: SGLang's csgmv and
triton backends, vLLM's lora_shrink / lora_expand), against the float64 reference.

Without the pinned packages (SGLang installed with `pip install --no-deps
sglang==0.5.10.post1`; vLLM's four kernel files extracted by `.ci/setup`) only the tests that
need no package run and each mode's tests skip. With them: CPU tier in the Triton
interpreter at small, awkward sizes (mixed ranks with NaN pads, rank 0, idx = -1 rows kept
bit-identical, 1-3 output slices, fp32 / fp16, chunk sizes 16 / 32 / 128; bf16 is skipped
in the interpreter, see BF16_INTERPRETER_BUG), and the
ValueErrors for what SGLang's and vLLM's kernels cannot do. GPU tier (`pytest -m gpu`): Llama-3-8B
shapes in bf16 and CUDA-graph capture / replay.
"""
import os
import sys

import pytest
import torch

import public_kernels as pk
from multilora_impl import (LLAMA3_8B_LAYERS, TOLERANCE, check_mode, lora_reference,
                            make_lora_inputs, make_meta, make_workload, relative_error)

F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32
AVAILABLE = pk.available()
REASON = AVAILABLE["sglang_csgmv"]
needs_pkg = pytest.mark.skipif(REASON is not None, reason=f"SGLang kernels unavailable: {REASON}")
needs_vllm = pytest.mark.skipif(AVAILABLE["vllm_triton"] is not None,
                                reason=f"vLLM kernels unavailable: {AVAILABLE['vllm_triton']}")


def _need(mode: str) -> None:
    if AVAILABLE[mode] is not None:
        pytest.skip(f"{mode} unavailable: {AVAILABLE[mode]}")
MODES = {m.name: m for m in pk.lora_modes()}
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The Triton interpreter adds two bf16 tensors as raw 16-bit patterns (a bf16 + bf16 add
# gives garbage such as 1e-30 or inf; bf16 -> fp32 -> add is right). SGLang's expand adds
# the bf16-rounded LoRA term to the bf16 output in bf16, so bf16 is checked on the GPU only.
BF16_INTERPRETER_BUG = "Triton interpreter: bf16 + bf16 adds bit patterns; bf16 is GPU-tier"


def test_available_never_raises_and_names_every_mode():
    avail = pk.available()
    assert set(avail) == set(pk.MODE_NAMES) == set(MODES)
    for reason in avail.values():
        assert reason is None or isinstance(reason, str) and reason
    info = pk.versions()
    assert set(info) == {"sglang", "vllm"}
    for pkg, mode in (("sglang", "sglang_csgmv"), ("vllm", "vllm_triton")):
        assert ("version" in info[pkg]) == (avail[mode] is None), (pkg, info[pkg])


def test_chunk_size_rule():
    assert [pk.sglang_chunk_size(n) for n in (1, 63, 64, 255, 256, 9999)] == \
        [16, 16, 32, 32, 128, 128]
    assert pk.sglang_chunk_size(4096, max_chunk_size=16) == 16
    assert pk.sglang_chunk_size(4096, max_chunk_size=32) == 32


@needs_pkg
def test_loading_leaves_no_stub_modules():
    """The two stubs live in sys.modules only while SGLang's kernel files load."""
    pk._load_sglang()
    for name in ("sglang.srt.utils", "sglang.srt.lora.utils"):
        mod = sys.modules.get(name)
        assert mod is None or (getattr(mod, "cached_triton_kernel", None)
                               is not pk._identity_cached_triton_kernel
                               and getattr(mod, "LoRABatchInfo", None) is not pk.SglangBatchInfo)


@needs_vllm
def test_loading_vllm_leaves_no_vllm_modules():
    """vLLM's stubs and its files' real module names live in sys.modules only during the
    load (a later real `import vllm` is unaffected); its custom-op registration is not
    used (the files' own fallback: the plain functions)."""
    ns = pk._load_vllm()
    assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
    assert ns.shrink is ns.lora_shrink_op._lora_shrink and ns.expand is ns.lora_expand_op._lora_expand
    assert ns.utils.is_batch_invariant is False


# (T, h_in, h_out or slices, L, r_max, ranks, dtype, idx dtype, share of -1 rows)
CASES = {
    "T1-fp32": (1, 40, 24, 2, 8, None, F32, torch.int32, 0.0),
    "T5-fp16-qkv-mixed-r0": (5, 72, [24, 56, 24], 4, 16, [16, 1, 0, 7], F16, torch.int64, 0.2),
    "T19-bf16-2slices": (19, 40, [56, 56], 3, 32, [32, 9, 20], BF16, torch.int32, 0.25),
    "T37-fp16-r128": (37, 72, 40, 3, 128, [128, 9, 64], F16, torch.int32, 0.2),
    "T70-fp32-mixed": (70, 40, 56, 5, 16, [3, 16, 8, 1, 12], F32, torch.int64, 0.25),
    "T260-fp16-r1": (260, 24, 24, 3, 1, None, F16, torch.int32, 0.1),
}


@pytest.mark.parametrize("mode", list(pk.MODE_NAMES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(mode, case):
    _need(mode)
    T, h_in, h_out, L, r_max, ranks, dtype, idx_dtype, share = CASES[case]
    if dtype == BF16 and INTERPRETER:
        pytest.skip(BF16_INTERPRETER_BUG)
    inp = make_lora_inputs(T, h_in, h_out, L, r_max, dtype, "cpu", ranks=ranks, seed=T)
    idx = make_workload("uniform", T, L, no_lora_share=share, seed=T + 1).to(idx_dtype)
    if T >= 3:
        idx[T // 2] = -1
    if mode == "vllm_triton" and dtype == F32:                 # its kernels assert 16-bit
        with pytest.raises(ValueError, match="^x: expected float16 or bfloat16"):
            check_mode(MODES[mode], inp, idx)
        return
    err = check_mode(MODES[mode], inp, idx)     # also: idx = -1 rows bit-identical
    assert err <= TOLERANCE[dtype], f"{mode} {case}: error {err:.3g}"


@pytest.mark.parametrize("workload", ["distinct", "identical", "skewed"])
@pytest.mark.parametrize("mode", ["sglang_csgmv", "sglang_triton", "vllm_triton"])
def test_prefill_layout_workloads(mode, workload):
    """Requests of ragged lengths, each contiguous, adapter per request by workload."""
    _need(mode)
    lens = [1, 17, 5, 40, 2, 9]
    ad = make_workload(workload, len(lens), 4, no_lora_share=0.2, seed=3)
    idx = torch.repeat_interleave(ad, torch.tensor(lens))
    inp = make_lora_inputs(idx.numel(), 48, [40, 24, 24], 4, 16, F16, "cpu", ranks=[16, 4, 16, 8],
                           seed=5)
    err = check_mode(MODES[mode], inp, idx)
    assert err <= TOLERANCE[F16], f"{mode} {workload}: error {err:.3g}"


@needs_pkg
def test_metadata_contents():
    """-1 -> the rank-0 slot L; csgmv chunks never mix adapters and never exceed C."""
    idx = torch.tensor([2, -1, 0, 2, 2, 0, -1, 1, 2, 2], dtype=torch.int32)
    inp = make_lora_inputs(10, 32, 16, 3, 8, F32, "cpu", seed=0)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    m = pk._prepare("csgmv", *args, chunk_size=2)
    bi = m.batch_info
    assert bi.lora_ranks.tolist() == [8, 8, 8, 0] and bi.scalings[3].item() == 0.0
    perm, ptr, w = bi.permutation.tolist(), bi.seg_indptr.tolist(), bi.weight_indices.tolist()
    assert sorted(perm) == list(range(10)) and ptr[0] == 0 and ptr[-1] == 10
    slot = [3 if i < 0 else i for i in idx.tolist()]
    for s, a in enumerate(w):
        assert 1 <= ptr[s + 1] - ptr[s] <= 2
        assert all(slot[perm[j]] == a for j in range(ptr[s], ptr[s + 1]))
    mt = pk._prepare("triton", *args)
    assert mt.batch_info.weight_indices.tolist() == [2, 3, 0, 2, 0, 3, 1, 2]
    assert mt.batch_info.seg_lens.tolist() == [1, 1, 1, 2, 1, 1, 1, 2]
    assert mt.batch_info.max_len == 2 and m.weights is None     # one contiguous slice: as is


@needs_vllm
def test_vllm_metadata_and_weights():
    """LoRAKernelMeta's tensors (tokens sorted stably by adapter, the active ids with -1
    first, counts, start offsets) and the weights as vLLM stores them: zero past each
    adapter's rank (our padding may hold NaN), scale folded into B."""
    idx = torch.tensor([2, -1, 0, 2, 2, 0, -1, 1, 2, 2], dtype=torch.int32)
    inp = make_lora_inputs(10, 32, [16, 8], 4, 8, F16, "cpu", ranks=[8, 3, 0, 5], seed=0)
    m = pk.prepare_vllm_triton(inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert m.sorted_tokens.tolist() == [1, 6, 2, 5, 7, 0, 3, 4, 8, 9]
    assert m.lora_ids.tolist() == [-1, 0, 1, 2, -1]
    assert m.num_tokens_per_lora.tolist() == [2, 2, 1, 5, 0]
    assert m.lora_token_start_loc.tolist() == [0, 2, 4, 5, 10, 0]
    assert m.num_active_loras_cpu.item() == 4 and not m.no_lora_flag_cpu.item()
    assert m.buffer.shape == (2, 10, 8) and m.buffer.dtype == F32
    for s, (a, b) in enumerate(zip(m.lora_a, m.lora_b)):
        for i, r in enumerate([8, 3, 0, 5]):
            assert torch.equal(a[i, :r], inp["A"][s, i, :r]) and not a[i, r:].any()
            want = (inp["B"][s][i, :, :r].float() * inp["scale"][i]).to(F16)
            assert torch.equal(b[i, :, :r], want) and not b[i, :, r:].any()
    none = pk.prepare_vllm_triton(inp["x"], inp["A"], inp["B"], torch.full((10,), -1),
                                  inp["scale"], inp["ranks"])
    assert none.no_lora_flag_cpu.item()


@needs_pkg
def test_non_contiguous_weights_and_strided_y():
    inp = make_lora_inputs(9, 40, 24, 3, 8, F32, "cpu", ranks=[8, 2, 5], seed=2)
    idx = make_workload("uniform", 9, 3, no_lora_share=0.2, seed=4)
    A = inp["A"].transpose(1, 2).contiguous().transpose(1, 2)     # same values, new strides
    B = inp["B"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not A.is_contiguous() and not B.is_contiguous()
    for name in pk.SGLANG_MODE_NAMES:
        err = check_mode(MODES[name], dict(inp, A=A, B=B), idx)
        assert err <= TOLERANCE[F32], name
    # A column slice of a wider y: the triton backend takes row strides, csgmv refuses.
    wide = torch.zeros(9, 40)
    y = wide[:, 8:32]
    y.copy_(inp["y"])
    pk.sglang_triton_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert wide[:, :8].abs().sum() == 0 and wide[:, 32:].abs().sum() == 0
    with pytest.raises(ValueError, match="^y: .*contiguous"):
        pk.sglang_csgmv_lora(y, inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])


@needs_vllm
def test_vllm_non_contiguous_weights_and_inputs():
    """vLLM's stored weights are copies (any strides in), x is made contiguous by its
    shrink, 4 slices run; a strided y is refused (its expand asserts contiguity)."""
    inp = make_lora_inputs(9, 40, [24, 8, 8, 16], 3, 8, F16, "cpu", ranks=[8, 2, 5], seed=2)
    idx = make_workload("uniform", 9, 3, no_lora_share=0.2, seed=4)
    A = inp["A"].transpose(2, 3).contiguous().transpose(2, 3)
    B = tuple(b.transpose(1, 2).contiguous().transpose(1, 2) for b in inp["B"])
    x = torch.zeros(40, 9, dtype=F16).t()
    x.copy_(inp["x"])
    assert not A.is_contiguous() and not B[0].is_contiguous() and not x.is_contiguous()
    err = check_mode(MODES["vllm_triton"], dict(inp, A=A, B=B, x=x), idx)
    assert err <= TOLERANCE[F16]
    wide = torch.zeros(9, 72, dtype=F16)
    with pytest.raises(ValueError, match="^y: .*contiguous"):
        pk.vllm_triton_lora(wide[:, 8:64], inp["x"], inp["A"], inp["B"], idx, inp["scale"],
                            inp["ranks"])


@needs_pkg
def test_unsupported_inputs_raise_value_error():
    inp = make_lora_inputs(6, 32, [16, 8, 8, 8], 2, 4, F16, "cpu", seed=1)
    idx = torch.tensor([0, 1, -1, 0, 1, 1], dtype=torch.int32)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    for name in pk.SGLANG_MODE_NAMES:
        with pytest.raises(ValueError, match="^B: .*at most 3"):       # 4 slices
            MODES[name](inp["y"].clone(), *args)
    inp = make_lora_inputs(6, 32, [16, 8], 2, 4, F16, "cpu", seed=1)
    with pytest.raises(ValueError, match="^B: .*equal width"):         # gate_up needs equal
        pk.sglang_triton_lora(inp["y"].clone(), inp["x"], inp["A"], inp["B"], idx,
                              inp["scale"], None)
    inp = make_lora_inputs(6, 32, 16, 2, 4, F16, "cpu", seed=1)
    x_nc = torch.zeros(32, 6, dtype=F16).t()
    x_nc.copy_(inp["x"])
    for name in pk.MODE_NAMES:
        if AVAILABLE[name] is not None:
            continue
        if name in pk.SGLANG_MODE_NAMES:
            with pytest.raises(ValueError, match="^x: .*contiguous"):
                MODES[name](inp["y"].clone(), x_nc, inp["A"], inp["B"], idx, inp["scale"])
        with pytest.raises(ValueError, match="^idx: "):                 # out of range, host
            MODES[name].make_meta(inp["x"], inp["A"], inp["B"], torch.tensor(
                [0, 2, 0, 0, 0, 0]), inp["scale"])
        with pytest.raises(ValueError, match="^ranks: "):
            MODES[name].make_meta(inp["x"], inp["A"], inp["B"], idx, inp["scale"],
                                  torch.tensor([4, 5], dtype=torch.int32))
        with pytest.raises(ValueError, match="^x: .*dtype"):            # contract checks
            MODES[name](inp["y"].double(), inp["x"].double(), inp["A"].double(),
                        inp["B"].double(), idx, inp["scale"])


@needs_pkg
def test_meta_must_match_the_call():
    inp = make_lora_inputs(6, 32, 16, 2, 4, F16, "cpu", seed=1)
    idx = torch.tensor([0, 1, -1, 0, 1, 1], dtype=torch.int32)
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    meta = pk.prepare_sglang_csgmv(*args)
    other_A = inp["A"].clone()
    with pytest.raises(ValueError, match="^meta: "):
        pk.sglang_csgmv_lora(inp["y"].clone(), inp["x"], other_A, inp["B"], idx, inp["scale"],
                             None, meta)
    with pytest.raises(ValueError, match="^meta: "):                    # wrong kind
        pk.sglang_triton_lora(inp["y"].clone(), *args, meta)
    with pytest.raises(ValueError, match="^meta: "):                    # a plain LoraMeta
        pk.sglang_csgmv_lora(inp["y"].clone(), *args, make_meta(idx))
    if AVAILABLE["vllm_triton"] is None:
        vmeta = pk.prepare_vllm_triton(*args)
        with pytest.raises(ValueError, match="^meta: "):
            pk.vllm_triton_lora(inp["y"].clone(), inp["x"], other_A, inp["B"], idx,
                                inp["scale"], None, vmeta)
        with pytest.raises(ValueError, match="^meta: "):                # another package's
            pk.vllm_triton_lora(inp["y"].clone(), *args, meta)
        with pytest.raises(ValueError, match="^meta: "):
            pk.sglang_csgmv_lora(inp["y"].clone(), *args, vmeta)


# ---------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(pk.MODE_NAMES))
@pytest.mark.parametrize("proj", ["qkv", "gate_up", "down"])
@pytest.mark.parametrize("T", [1, 64, 256, 2048])
def test_gpu_llama3_8b_bf16(mode, proj, T):
    _need(mode)
    h_in, h_outs = LLAMA3_8B_LAYERS[proj]
    inp = make_lora_inputs(T, h_in, h_outs if len(h_outs) > 1 else h_outs[0], 8, 16, BF16,
                           "cuda", ranks=[16, 8, 16, 4, 16, 16, 12, 16], seed=T)
    idx = make_workload("uniform", T, 8, no_lora_share=0.1, seed=T).cuda()
    err = check_mode(MODES[mode], inp, idx)
    assert err <= TOLERANCE[BF16], f"{mode} {proj} T={T}: error {err:.3g}"


@pytest.mark.gpu
@needs_pkg
def test_gpu_fp32_refused_unless_ieee(monkeypatch):
    inp = make_lora_inputs(4, 64, 64, 2, 8, F32, "cuda", seed=0)
    idx = torch.tensor([0, 1, -1, 1], dtype=torch.int32, device="cuda")
    monkeypatch.delenv("TRITON_F32_DEFAULT", raising=False)
    with pytest.raises(ValueError, match="^x: .*TF32"):
        check_mode(MODES["sglang_csgmv"], inp, idx)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", list(pk.MODE_NAMES))
def test_gpu_cuda_graph_replay(mode):
    """Capture once with a meta from prepare, replay on new x / y values."""
    _need(mode)
    T, h = 64, 4096
    inp = make_lora_inputs(T, h, h, 7, 16, BF16, "cuda", seed=1)
    idx = make_workload("uniform", T, 7, no_lora_share=0.1, seed=1).cuda()
    args = (inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    m = MODES[mode]
    meta = m.make_meta(*args)
    y = inp["y"].clone()
    m(y.clone(), *args, meta)                       # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        m(y, *args, meta)
    for seed in range(3):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        inp["x"].copy_(torch.randn(inp["x"].shape, generator=gen, device="cuda"))
        y0 = torch.randn(y.shape, generator=gen, device="cuda").to(BF16)
        y.copy_(y0)
        g.replay()
        ref = lora_reference(y0, *args)
        assert relative_error(y, ref) <= TOLERANCE[BF16]
