"""The contract: float64 reference, torch baselines, segments, workloads, input checks."""
import pytest
import torch

import multilora_impl as mi

TORCH_MODES = ["loop", "cheat_bmm", "gbmm"]
DT = [torch.float32, torch.float16, torch.bfloat16]


def test_reference_matches_dense_formula():
    """The per-token reference equals an independent dense einsum over one-hot adapters."""
    T, h_in, h_out, L, r = 9, 13, 11, 4, 5
    inp = mi.make_lora_inputs(T, h_in, h_out, L, r, torch.float64, seed=3)
    idx = torch.tensor([0, 3, -1, 1, 1, 2, -1, 3, 0])
    ref = mi.lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"])
    onehot = torch.zeros(T, L, dtype=torch.float64)
    onehot[idx >= 0, idx[idx >= 0]] = 1.0
    v = torch.einsum("th,lrh->tlr", inp["x"], inp["A"])
    d = torch.einsum("tlr,lor,tl,l->to", v, inp["B"], onehot, inp["scale"].double())
    torch.testing.assert_close(ref, inp["y"] + d, rtol=1e-12, atol=1e-12)


def test_reference_ranks_ignore_padding():
    """With ranks, padded entries (NaN) are never read; equal to slicing the weights."""
    inp = mi.make_lora_inputs(5, 16, 8, 3, 6, torch.float64, ranks=[2, 6, 1], seed=4)
    idx = torch.tensor([0, 1, 2, -1, 0])
    ref = mi.lora_reference(inp["y"], inp["x"], inp["A"], inp["B"], idx, inp["scale"], inp["ranks"])
    assert torch.isfinite(ref).all()
    t, i, r = 4, 0, 2
    manual = inp["y"][t] + inp["scale"][i] * (inp["B"][i, :, :r] @ (inp["A"][i, :r] @ inp["x"][t]))
    torch.testing.assert_close(ref[t], manual)


@pytest.mark.parametrize("mode", TORCH_MODES)
@pytest.mark.parametrize("dtype", DT)
@pytest.mark.parametrize("T,h_in,h_out,L,r,ranks", [
    (1, 40, 24, 1, 1, None),
    (3, 72, 56, 3, 16, None),
    (7, 33, [24, 8, 8], 4, 8, None),            # q/k/v-like slices
    (33, 64, [40, 40], 5, 12, [1, 12, 7, 3, 5]),  # gate/up-like slices, mixed ranks
    (17, 128, 96, 6, 128, [128, 1, 64, 33, 2, 100]),
])
def test_torch_modes_match_reference(mode, dtype, T, h_in, h_out, L, r, ranks):
    inp = mi.make_lora_inputs(T, h_in, h_out, L, r, dtype, ranks=ranks, seed=T + L)
    idx = mi.make_workload("uniform", T, L, no_lora_share=0.3, seed=T)
    err = mi.check_mode(mode, inp, idx)
    assert err <= mi.TOLERANCE[dtype], (mode, dtype, err)


def test_to_rank_major_keeps_shape_and_values():
    """to_rank_major: the same [L, h_out, r_max] values with unit stride along h_out (each
    adapter's rank rows of h_out contiguous), for one tensor and for a tuple of slices;
    make_lora_inputs(rank_major=True) stores B so, with the same values as the row layout."""
    B = torch.randn(3, 40, 8)
    rm = mi.to_rank_major(B)
    assert rm.shape == B.shape and torch.equal(rm, B)
    assert rm.stride() == (8 * 40, 1, 40) and rm.transpose(1, 2).is_contiguous()
    rms = mi.to_rank_major((B, B[:, :24]))
    assert isinstance(rms, tuple) and [b.stride(1) for b in rms] == [1, 1]
    row = mi.make_lora_inputs(5, 16, [24, 8], 3, 8, torch.float32, ranks=[8, 3, 5], seed=2)
    col = mi.make_lora_inputs(5, 16, [24, 8], 3, 8, torch.float32, ranks=[8, 3, 5], seed=2,
                              rank_major=True)
    for a, b in zip(row["B"], col["B"]):
        assert torch.equal(a.nan_to_num(7.0), b.nan_to_num(7.0)) and b.stride(1) == 1


@pytest.mark.parametrize("mode", TORCH_MODES + ["sgmv_triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rank_major_B_matches_reference(mode, dtype):
    """Every mode that runs on the CPU (the Triton one under the interpreter) gives the
    reference's answer with B stored rank-major, mixed ranks with NaN pads included."""
    inp = mi.make_lora_inputs(13, 48, [40, 16], 5, 16, dtype, ranks=[16, 1, 9, 0, 4], seed=5,
                              rank_major=True)
    idx = mi.make_workload("uniform", 13, 5, no_lora_share=0.2, seed=6)
    assert mi.check_mode(mode, inp, idx) <= mi.TOLERANCE[dtype]


@pytest.mark.parametrize("workload", mi.WORKLOADS)
def test_workloads_all_modes(workload):
    inp = mi.make_lora_inputs(16, 48, 40, 16, 8, torch.float32, seed=1)
    idx = mi.make_workload(workload, 16, 16, seed=2)
    for mode in TORCH_MODES:
        assert mi.check_mode(mode, inp, idx) <= 1e-5


def test_none_mode_is_a_noop_and_wrong_answer():
    inp = mi.make_lora_inputs(4, 16, 8, 2, 4, torch.float32, seed=0)
    idx = torch.tensor([0, 1, 0, 1])
    assert mi.check_mode("none", inp, idx) > 1e-2   # LoRA is not negligible in these inputs


def test_check_mode_catches_touched_skip_rows():
    bad = mi.LoraMode("bad", lambda y, *a: y.add_(1.0))
    inp = mi.make_lora_inputs(4, 16, 8, 2, 4, torch.float32, seed=0)
    with pytest.raises(AssertionError, match="idx = -1"):
        mi.check_mode(bad, inp, torch.tensor([0, -1, 1, -1]))


def test_segments_roundtrip():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        T = int(torch.randint(1, 60, (1,), generator=g))
        idx = torch.randint(-1, 4, (T,), generator=g)
        starts, adapters = mi.build_segments(idx)
        assert starts.dtype == adapters.dtype == torch.int32
        assert starts[0] == 0 and starts[-1] == T and len(starts) == len(adapters) + 1
        assert (starts[1:] > starts[:-1]).all()
        assert (adapters[1:] != adapters[:-1]).all()      # maximal runs
        assert torch.equal(mi.idx_from_segments(starts, adapters), idx)


def test_make_meta_groups():
    idx = torch.tensor([2, 0, -1, 2, 2, 0], dtype=torch.int32)
    meta = mi.make_meta(idx)
    assert meta.num_segments == 5 and meta.max_seg_len == 2
    got = {a: pos.tolist() for a, pos in meta.groups}
    assert got == {0: [1, 5], 2: [0, 3, 4]}
    assert meta.rank_sum is None                     # no ranks given
    ranks = torch.randint(1, 65, (3,), dtype=torch.int32)
    assert mi.make_meta(idx, ranks=ranks).rank_sum == 2 * int(ranks[0]) + 3 * int(ranks[2])


def test_workload_shapes():
    n, L = 64, 8
    d = mi.make_workload("distinct", n, n, seed=0)
    assert sorted(d.tolist()) == list(range(n))
    d2 = mi.make_workload("distinct", n, L, seed=0)
    assert torch.bincount(d2.long()).tolist() == [n // L] * L
    assert set(mi.make_workload("identical", n, L).tolist()) == {0}
    u = mi.make_workload("uniform", 4000, L, seed=1)
    assert torch.bincount(u.long()).min() > 350
    s = torch.bincount(mi.make_workload("skewed", 4000, L, seed=1).long(), minlength=L)
    assert s[0] > 3 * s[-1]                               # Zipf-like: head much hotter
    z = mi.make_workload("uniform", 1000, L, no_lora_share=0.25, seed=2)
    assert 180 < int((z == -1).sum()) < 320
    with pytest.raises(ValueError, match="workload"):
        mi.make_workload("zipf", 4, 2)


def _args(**over):
    inp = mi.make_lora_inputs(4, 16, 8, 3, 4, torch.float32, seed=0)
    args = dict(y=inp["y"], x=inp["x"], A=inp["A"], B=inp["B"],
                idx=torch.tensor([0, 1, -1, 2], dtype=torch.int32), scale=inp["scale"], ranks=None)
    args.update(over)
    return args


@pytest.mark.parametrize("over,arg", [
    (dict(x=torch.randn(4, 16, dtype=torch.float64)), "x"),
    (dict(x=torch.randn(4, 17)), "A"),
    (dict(x=torch.randn(0, 16)), "x"),
    (dict(y=torch.randn(4, 9)), "y"),
    (dict(y=torch.randn(8, 4).t()), "y"),
    (dict(A=torch.randn(3, 4, 16, dtype=torch.float16)), "A"),
    (dict(A=torch.randn(3, 129, 16)), "A"),
    (dict(B=torch.randn(3, 8, 5)), "B"),
    (dict(B=(torch.randn(3, 8, 4), torch.randn(3, 8, 4))), "B"),
    (dict(idx=torch.tensor([0, 1, 2], dtype=torch.int32)), "idx"),
    (dict(idx=torch.tensor([0.0, 1, 2, 0])), "idx"),
    (dict(scale=torch.ones(3, dtype=torch.float64)), "scale"),
    (dict(scale=torch.ones(2)), "scale"),
    (dict(ranks=torch.tensor([1, 2], dtype=torch.int32)), "ranks"),
    (dict(ranks=[1, 2, 3]), "ranks"),
])
def test_bad_input_names_argument(over, arg):
    a = _args(**over)
    with pytest.raises(ValueError, match=rf"^{arg}"):
        mi.check_lora_args(**a)
    for mode in TORCH_MODES:   # every torch mode validates the same way
        with pytest.raises(ValueError, match=rf"^{arg}"):
            mi.get_mode(mode)(a["y"], a["x"], a["A"], a["B"], a["idx"], a["scale"], a["ranks"])


def test_idx_range_checked_on_request():
    a = _args(idx=torch.tensor([0, 3, -1, 2], dtype=torch.int32))
    mi.check_lora_args(**a)                                 # not checked in the hot path
    with pytest.raises(ValueError, match=r"^idx: expected values in \[-1, 2\]"):
        mi.check_lora_args(**a, check_idx_range=True)
    b = _args(idx=torch.tensor([0, -2, -1, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^idx"):
        mi.check_lora_args(**b, check_idx_range=True)
    c = _args(ranks=torch.tensor([1, 5, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"^ranks"):
        mi.check_lora_args(**c, check_idx_range=True)


def test_unknown_mode():
    with pytest.raises(ValueError, match="mode: expected one of"):
        mi.get_mode("bgmv_fast")


def test_registry_has_every_mode():
    assert set(mi.MODES) == {"none", "loop", "cheat_bmm", "gbmm", "bgmv_triton", "bgmv_cuda",
                             "sgmv_triton"}


def test_report_public_counts_losses_and_survives_untimed_points(capsys):
    pts = [("a", {"bgmv_cuda": {"median_us": 2.0}, "sglang_triton": {"median_us": 3.0}}),
           ("b", {"bgmv_cuda": {"median_us": 4.0}, "sglang_csgmv": {"median_us": 3.0}}),
           ("c", {"bgmv_triton": {"error": 1.0}, "sglang_csgmv": {"median_us": 3.0}}),
           ("d", {"bgmv_cuda": {"median_us": 1.0}})]                 # no public timing
    mi.report_public(pts)
    out = capsys.readouterr().out
    assert "[6] b: ours bgmv_cuda 4.00 us > sglang_csgmv 3.00 us" in out
    assert "[6] c: no mode of ours timed" in out
    assert "at least as fast as the best public kernel at 1 of 3 points" in out
