"""Drive the decode and prefill microbenchmarks end to end at tiny sizes on the CPU (torch
modes, Triton modes under the interpreter) and check the JSON and PNG they write."""
import json
import os

import pytest

import multilora_impl
import multilora_impl_prefill

CPU_MODES = ["loop", "cheat_bmm", "gbmm", "bgmv_triton", "sgmv_triton", "none"]


def _check_point(pt, modes, tol):
    for m in modes:
        rec = pt["modes"][m]
        assert "skipped" not in rec, (m, rec)
        assert rec["error"] <= tol, (m, rec["error"])
        assert rec["p20_us"] <= rec["median_us"] <= rec["p80_us"]
        assert rec["median_us"] > 0
    assert (pt["bytes"] > 0) == (pt["lora_rows"] > 0)


def test_decode_script_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTILORA_EXPAND_TILES", "classic")        # recorded in the JSON
    out = str(tmp_path)
    multilora_impl.main(["--device", "cpu", "--modes", *CPU_MODES, "--dtype", "fp32",
                         "--h-in", "40", "--h-out", "24", "--rank", "4", "--num-adapters", "3",
                         "--batch-sizes", "1", "5", "--workloads", "distinct", "skewed",
                         "--no-lora-share", "0.2", "--figures", "decode", "mixed_rank",
                         "--out-dir", out])
    data = json.load(open(os.path.join(out, multilora_impl.DECODE_FIG + ".json")))
    assert data["config"]["h_in"] == 40 and data["env"]["torch"]
    assert data["env"]["settings"]["MULTILORA_EXPAND_TILES"] == "classic"
    assert [(p["workload"], p["batch"]) for p in data["points"]] == [
        ("distinct", 1), ("distinct", 5), ("skewed", 1), ("skewed", 5)]
    for p in data["points"]:
        _check_point(p, CPU_MODES, 1e-5)
        assert len(p["gemm"]) == 3
    mixed = json.load(open(os.path.join(out, "decode_mixed_rank.json")))
    _check_point(mixed["mixed"], CPU_MODES, 1e-5)
    _check_point(mixed["padded"], CPU_MODES, 1e-5)
    for stem in (multilora_impl.DECODE_FIG, "decode_mixed_rank"):
        assert os.path.getsize(os.path.join(out, stem + ".png")) > 10_000
    # --plot-only redraws from the JSON alone
    os.remove(os.path.join(out, "decode_mixed_rank.png"))
    multilora_impl.main(["--plot-only", "--figures", "mixed_rank", "--out-dir", out])
    assert os.path.exists(os.path.join(out, "decode_mixed_rank.png"))


def test_prefill_script_cpu_ragged(tmp_path):
    out = str(tmp_path)
    multilora_impl_prefill.main([
        "--device", "cpu", "--modes", *CPU_MODES, "--dtype", "fp32", "--h-in", "40",
        "--h-out", "24", "--rank", "4", "--tokens-per-request", "3", "9",
        "--fixed-requests", "2", "--num-requests", "1", "3", "--fixed-tokens", "5",
        "--ragged", "--no-lora-share", "0.3", "--out-dir", out])
    stem = multilora_impl_prefill.PREFILL_FIG + "_ragged"
    data = json.load(open(os.path.join(out, stem + ".json")))
    assert data["config"]["ragged"] is True
    assert data["copy_gbs"] > 0 and data["empty_graph_us"] > 0     # ceilings, floor first
    for p in data["sweep_tokens"] + data["sweep_requests"]:
        _check_point(p, CPU_MODES, 1e-5)
        assert sum(p["lengths"]) == p["T"]
    assert [p["num_requests"] for p in data["sweep_requests"]] == [1, 3]
    assert os.path.getsize(os.path.join(out, stem + ".png")) > 10_000


def test_validation_failure_is_not_timed(monkeypatch):
    """A mode that computes a wrong answer is recorded with its error and never timed."""
    import torch
    wrong = multilora_impl.LoraMode("wrong", lambda y, x, A, B, idx, scale, r=None, m=None:
                                    y.add_(0.01 * torch.randn_like(y)))
    monkeypatch.setitem(multilora_impl.MODES, "wrong", wrong)
    idx = multilora_impl.make_workload("uniform", 4, 2, seed=0)
    pt = multilora_impl.bench_point(["wrong", "loop"], idx, 2, 16, [8], 4, torch.float32,
                                    device="cpu")
    assert "validation failed" in pt["modes"]["wrong"]["skipped"]
    assert "median_us" not in pt["modes"]["wrong"]
    assert "median_us" in pt["modes"]["loop"]


def test_public_flag_times_public_kernels_and_reports(tmp_path, capsys, monkeypatch):
    """--public adds the public kernels (when installed) beside ours, records the package
    version, and --report compares our best mode with the best public one (target 6)."""
    import public_kernels as pk
    avail = pk.available()
    public = [m for m, reason in avail.items() if reason is None]
    if not public:
        pytest.skip(f"no public kernels can run here: {avail}")
    # --public registers the public modes process-wide: keep them out of later tests
    monkeypatch.setattr(multilora_impl, "MODES", dict(multilora_impl.MODES))
    out = str(tmp_path)
    multilora_impl.main(["--device", "cpu", "--public", "--modes", "bgmv_triton", "none",
                         "--dtype", "fp16", "--h-in", "32", "--h-out", "24", "--rank", "4",
                         "--num-adapters", "3", "--batch-sizes", "2", "--workloads", "uniform",
                         "--figures", "decode", "--out-dir", out])
    data = json.load(open(os.path.join(out, multilora_impl.DECODE_FIG + ".json")))
    for pkg, version, mode in (("sglang", pk.SGLANG_VERSION, "sglang_csgmv"),
                               ("vllm", pk.VLLM_VERSION, "vllm_triton")):
        got = data["config"]["public"][pkg]
        assert got.get("version") == version if mode in public else "unavailable" in got, got
    (pt,) = data["points"]
    _check_point(pt, ["bgmv_triton", *public], 2e-3)
    capsys.readouterr()
    multilora_impl.main(["--report", "--out-dir", out])
    assert "[6] ours at least as fast as the best public kernel at" in capsys.readouterr().out


def test_stacked_expand_sweep_script_cpu(tmp_path):
    """run_stacked_expand.py end to end on the CPU (--tiny sites, interpreter, fp32): every
    config and folded pair checks out against the torch form and lands in the JSON (the
    checks are the script's own: a wrong config or a stale reference exits)."""
    import run_stacked_expand as rse
    path = str(tmp_path / "sweep.json")
    rows = rse.main(["--device", "cpu", "--tiny", "--folded", "--T", "5", "--block-n", "32",
                     "--num-warps", "4", "--rep-ms", "1", "--json", path])
    data = json.load(open(path))
    assert data["rows"] == rows and data["config"]["tiny"]
    for site, consumer in rse.CONSUMER.items():
        kinds = {r["kind"] for r in rows if r["site"] == site}
        assert kinds == {"torch", "triton", "expand+" + consumer, "folded"}
    assert all(r["error"] < 1e-5 and r["median_us"] > 0 for r in rows)


def test_ceilings_measure_the_floor_right_after_a_copy(monkeypatch, tmp_path):
    """bench_utils.ceilings: copy bandwidth, then the launch floor, so a process's first
    (kept) floor follows a copy whichever benchmark calls it first; the decode script
    calls it before any figure, the prefill script at its sweep's start."""
    import bench_utils as bu
    calls = []
    monkeypatch.setattr(bu, "copy_bandwidth_gbs", lambda device: calls.append("copy") or 1.0)
    monkeypatch.setattr(bu, "empty_graph_us", lambda device: calls.append("floor") or 2.0)
    assert bu.ceilings("cpu") == (1.0, 2.0) and calls == ["copy", "floor"]
    calls.clear()

    def sweep(*args, **kwargs):           # stop the run at its first figure
        calls.append("sweep")
        raise StopIteration
    monkeypatch.setattr(multilora_impl, "run_decode_sweep", sweep)
    with pytest.raises(StopIteration):
        multilora_impl.main(["--device", "cpu", "--figures", "punica", "--out-dir", str(tmp_path)])
    assert calls == ["copy", "floor", "sweep"]


def test_launch_floor_measured_once_per_process(monkeypatch):
    """bench_utils.empty_graph_us measures the launch floor at its first call and reuses it
    (the H200 runs the empty graph at 0.94 us at a process's first measurements, 1.2-1.3 us
    later: every sweep of one run shares the first); fresh=True measures again."""
    import bench_utils as bu
    times = iter([(2.5, 2.0, 3.0), (7.5, 7.0, 8.0)])
    monkeypatch.setattr(bu, "time_fn", lambda fn, device="cuda": next(times))
    monkeypatch.setattr(bu, "_EMPTY_US", {})
    assert bu.empty_graph_us("cpu") == 2.5
    assert bu.empty_graph_us("cpu") == 2.5                 # reused, not measured again
    assert bu.empty_graph_us("cpu", fresh=True) == 7.5     # measured again ...
    assert bu.empty_graph_us("cpu") == 2.5                 # ... the first value stays
