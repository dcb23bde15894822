"""benchmark_inference_multilora.py end to end: the --quick run on the CPU (JSON, table,
PNG, --plot-only), and a short real-size run on the GPU with every mode and PEFT."""
import json
import os

import pytest
import torch

import benchmark_inference_multilora as bim
from multilora_impl import TOLERANCE

pytest.importorskip("peft", reason="the benchmark's reference and `peft` mode need peft")


def run(argv):
    return bim.main(bim.build_parser().parse_args(argv))


def check_json(path, rows, B, n, tol):
    data = json.load(open(path))
    assert data["env"]["torch"] and data["env"]["transformers"] and "git_commit" in data["env"]
    c = data["config"]
    assert (c["batch_size"], c["max_new_tokens"]) == (B, n)
    assert len(c["adapter_of_request"]) == B
    assert [(r["mode"], r["engine"]) for r in data["results"]] == rows
    v = data["validation"]
    assert v["tolerance"] == tol and v["lora_effect"] > 4 * v["gate"]   # the check can fail
    for r in data["results"]:
        assert r["status"] == "ok", r
        assert r["total_tokens"] == B * n                 # exactly max_new_tokens each
        assert r["tokens_per_s"] > 0 and r["prefill_s"] > 0 and r["ms_per_step"] > 0
        if r["mode"] not in ("none", "peft"):             # peft is the reference
            assert r["logits_error"] <= v["gate"], r
    return data


def test_benchmark_quick_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MULTILORA_STACKED_EXPAND", "torch")   # the CPU default, made explicit
    modes = ["none", "cheat_bmm", "gbmm", "stacked", "peft"]
    data = run(["--quick", "--device", "cpu", "--modes", *modes, "--out-dir", str(tmp_path),
                "--no-progress", "--engine", "fast", "hf"])
    path = data["json_path"]
    assert os.path.basename(path) == "e2e_tiny_b8_L4_r4_n8_fast-hf.json"   # --quick: n = 8
    # stacked runs in the fast engine only
    rows = [(m, e) for e in ("fast", "hf") for m in modes[:-1] if (m, e) != ("stacked", "hf")] \
        + [("peft", "peft")]
    d = check_json(path, rows, 8, 8, TOLERANCE[torch.float32])
    assert d["validation"]["gate"] == TOLERANCE[torch.float32]     # fp32: the plain bound
    assert d["env"]["settings"]["MULTILORA_STACKED_EXPAND"] == "torch"    # knobs recorded
    # "auto" engine options resolve to the torch forms on the CPU
    assert d["config"]["engine_options"] == dict(fused_elementwise=False, sampler="torch",
                                                 attention="sdpa")
    png = path[:-5] + ".png"
    assert os.path.getsize(png) > 10_000
    table = capsys.readouterr().out
    for word in ("Throughput tok/s", "Time s", "Total Tokens", "vs slowest", "vs none", "peft",
                 "gbmm (fast)", "gbmm (hf)"):
        assert word in table
    os.remove(png)
    run(["--plot-only", path])
    assert os.path.exists(png)


TINY = ["--model-config", "tiny", "--device", "cpu", "--max-new-tokens", "4", "--prompt-len", "8",
        "--num-adapters", "4", "--rank", "4", "--warmup-tokens", "2", "--no-progress"]


def check_points(data, batches, workloads, modes, n):
    """A multi-point JSON: the grid in order, every point validated and timed, exactly
    B x n tokens per row, and total tokens rising with the batch for every mode."""
    c = data["config"]
    assert (c["batch_sizes"], c["workloads"], c["max_new_tokens"]) == (batches, workloads, n)
    assert "batch_size" not in c and "adapter_of_request" not in c      # per point instead
    assert [(p["workload"], p["batch_size"]) for p in data["points"]] == \
        [(w, b) for w in workloads for b in batches]
    for p in data["points"]:
        B, v = p["batch_size"], p["validation"]
        assert len(p["adapter_of_request"]) == len(p["prompt_tokens"]) == B
        assert v["tolerance"] == TOLERANCE[torch.float32] == v["gate"]
        assert v["lora_effect"] > 4 * v["gate"]                         # the check can fail
        assert [r["mode"] for r in p["results"]] == modes
        for r in p["results"]:
            assert r["status"] == "ok", (B, r)
            assert r["total_tokens"] == B * n and r["steps"] == n - 1
            assert r["tokens_per_s"] > 0 and r["ms_per_step"] > 0 and r["prefill_s"] > 0
            assert r["decode_tokens_per_s"] > 0
            if r["mode"] != "none":
                assert r["logits_error"] <= v["gate"], (B, r)
    for w in workloads:
        for m in modes:
            tot = [r["total_tokens"] for p in data["points"] if p["workload"] == w
                   for r in p["results"] if r["mode"] == m]
            assert len(tot) == len(batches) and tot == sorted(set(tot))   # strictly rising


def test_benchmark_batch_sweep_cpu(tmp_path, capsys):
    """--batch-sizes: one engine for the largest batch, every mode at every batch, one
    JSON, the line plot, and --plot-only redraws it with the targets."""
    modes = ["none", "cheat_bmm", "gbmm"]
    data = run([*TINY, "--batch-sizes", "4", "1", "2", "--modes", *modes,
                "--out-dir", str(tmp_path), "--targets"])
    path = data["json_path"]
    assert os.path.basename(path) == "e2e_sweep_tiny_L4_r4_n4_uniform.json"
    d = json.load(open(path))
    assert d["kind"] == "sweep" and d["flatness"] == []
    check_points(d, [1, 2, 4], ["uniform"], modes, 4)
    png = path[:-5] + ".png"
    assert data["pngs"] == [png] and os.path.getsize(png) > 10_000
    out = capsys.readouterr().out
    assert "tokens/s (ms/step) vs batch" in out and "cheat_bmm" in out
    assert out.count("best LoRA mode tokens/s") == 3 and "n/a (not timed)" in out  # no peft
    os.remove(png)
    run(["--plot-only", path, "--targets"])
    assert os.path.getsize(png) > 10_000
    assert "best LoRA mode / none" in capsys.readouterr().out


def test_benchmark_workloads_cpu(tmp_path, capsys):
    """--workloads: every mode under each workload at one batch; the ratio table, the
    grouped bars and the flatness target, from the run and from --plot-only."""
    modes = ["none", "gbmm"]
    data = run([*TINY, "--batch-size", "4", "--workloads", "distinct", "identical",
                "--modes", *modes, "--out-dir", str(tmp_path), "--targets"])
    path = data["json_path"]
    assert os.path.basename(path) == "e2e_workloads_tiny_b4_L4_r4_n4_distinct-identical.json"
    d = json.load(open(path))
    assert d["kind"] == "workloads"
    check_points(d, [4], ["distinct", "identical"], modes, 4)
    idx = {p["workload"]: p["adapter_of_request"] for p in d["points"]}
    assert sorted(idx["distinct"]) == [0, 1, 2, 3] and idx["identical"] == [0] * 4
    assert [(f["label"], f["reference"]) for f in d["flatness"]] == \
        [(m, "identical") for m in modes]
    for f in d["flatness"]:
        tps = {p["workload"]: r["tokens_per_s"] for p in d["points"] for r in p["results"]
               if r["label"] == f["label"]}
        assert f["tokens_per_s"] == tps
        assert f["ratio"]["distinct"] == pytest.approx(tps["distinct"] / tps["identical"])
    png = path[:-5] + ".png"
    assert data["pngs"] == [png] and os.path.getsize(png) > 10_000
    out = capsys.readouterr().out
    assert "dist/iden" in out and "distinct / identical" in out
    ratio = d["flatness"][1]["ratio"]["distinct"]                     # gbmm: the only LoRA mode
    verdict = "PASS" if ratio >= bim.TARGETS["distinct_vs_identical"][1] else "FAIL"
    assert any(line.split()[:1] == [verdict] and "distinct / identical" in line
               for line in out.splitlines())
    os.remove(png)
    run(["--plot-only", path, "--targets"])
    assert os.path.getsize(png) > 10_000
    assert "dist/iden" in capsys.readouterr().out


def test_targets_from_json():
    """The targets read the JSON: fastest LoRA row vs none of its engine and vs peft."""
    rows = [dict(mode=m, engine=e, label=m, tokens_per_s=t) for m, e, t in
            [("none", "fast", 9000.0), ("bgmv_cuda", "fast", 8500.0),
             ("gbmm", "fast", 300.0), ("peft", "peft", 200.0)]]
    data = dict(env={}, config=dict(batch_size=64, workload="uniform"), results=rows)
    got = {t["target"]: t for t in bim.targets(data)}
    assert set(got) == {"best_tokens_per_s", "best_vs_none", "best_vs_peft"}
    assert got["best_tokens_per_s"]["mode"] == "bgmv_cuda" and got["best_tokens_per_s"]["pass"]
    assert got["best_vs_none"]["value"] == pytest.approx(8500 / 9000)
    assert got["best_vs_none"]["pass"]
    assert got["best_vs_peft"]["value"] == pytest.approx(42.5) and got["best_vs_peft"]["pass"]
    rows[1]["tokens_per_s"] = 7000.0
    got = {t["target"]: t for t in bim.targets(data)}
    assert not got["best_tokens_per_s"]["pass"] and not got["best_vs_none"]["pass"]


def test_benchmark_rejects_bad_flags():
    with pytest.raises(SystemExit):
        bim.build_parser().parse_args(["--modes", "nonsense"])
    args = bim.build_parser().parse_args(["--max-new-tokens", "3", "--batch_size", "2"])
    assert (args.max_new_tokens, args.batch_size) == (3, 2)
    with pytest.raises(SystemExit):
        bim.build_parser().parse_args(["--workloads", "popular"])
    with pytest.raises(SystemExit):
        bim.build_parser().parse_args(["--batch-sizes", "two"])


@pytest.mark.gpu
def test_benchmark_short_gpu(tmp_path):
    modes = ["none", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "stacked", "peft"]
    data = run(["--model-config", "llama3-8b", "--num-layers", "2", "--batch-size", "16",
                "--max-new-tokens", "16", "--num-adapters", "8", "--rank", "16", "--modes", *modes,
                "--out-dir", str(tmp_path), "--no-progress", "--engine", "fast", "hf"])
    rows = [(m, e) for e in ("fast", "hf") for m in modes[:-1] if (m, e) != ("stacked", "hf")] \
        + [("peft", "peft")]
    d = check_json(data["json_path"], rows, 16, 16, TOLERANCE[torch.bfloat16])
    assert d["env"]["gpu"] and d["env"]["triton"]
    assert all(r["peak_memory_gb"] > 0 for r in d["results"])
    assert d["config"]["engine_options"] == dict(fused_elementwise=True, sampler="triton",
                                                 attention="triton")    # "auto" on a GPU


def test_lora_overlap_flag_recorded(tmp_path):
    """--lora-overlap shrink: the fast engine runs the halves of modes that have them (and
    the plain path for the others); the JSON says which, and the logits gate still holds."""
    data = run(TINY + ["--batch-size", "4", "--modes", "none", "bgmv_triton", "gbmm",
                       "--lora-overlap", "shrink", "--out-dir", str(tmp_path)])
    d = json.load(open(data["json_path"]))
    assert d["config"]["lora_overlap"] == "shrink"
    by = {r["mode"]: r for r in d["results"]}
    assert by["bgmv_triton"]["lora_overlap"] == "shrink" and by["gbmm"]["lora_overlap"] == "off"
    assert by["bgmv_triton"]["status"] == "ok"
    assert by["bgmv_triton"]["logits_error"] <= d["validation"]["gate"]


def test_decode_step_bytes_and_estimate_cli(capsys):
    """The bytes-bound ceiling: Llama-3-8B's 7.50e9 weights read once per step (32 layers of
    218,103,808 + the 525,336,576 LM head), the KV cache (8 KV heads x 128) over the filled
    context, and each adapter's A and B once."""
    from multilora_model import MODEL_CONFIGS
    b = bim.decode_step_bytes(MODEL_CONFIGS["llama3-8b"], 64, 288, 7, 16)
    assert b["weights"] == 2 * (32 * 218_103_808 + 525_336_576)
    assert b["kv_cache"] == 2 * 64 * 288 * 32 * 2 * 1024
    assert b["lora"] == 2 * 7 * 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024)
                                           + 3 * (4096 + 14336))
    est = bim.token_ceiling(MODEL_CONFIGS["llama3-8b"], 64, 32, 512, 7, 16, 4000.0)
    assert est["tokens_per_s"]["lora"] < est["tokens_per_s"]["none"]
    run(["--estimate", "--model-config", "llama3-8b", "--batch-size", "64", "--prompt-len", "32",
         "--max-new-tokens", "512", "--num-adapters", "7", "--rank", "16", "--copy-gbs", "4000"])
    out = capsys.readouterr().out
    assert "weights 15.01 GB" in out and "tokens/s" in out


def test_profile_flag_prints_kernel_table(tmp_path, capsys, monkeypatch):
    reports = []                                         # every row, not only the printed 30
    printer = bim.print_profile
    monkeypatch.setattr(bim, "print_profile", lambda t, rows: (reports.append(rows), printer(t, rows)))
    run(TINY + ["--batch-size", "2", "--modes", "bgmv_triton", "--profile", "2",
                "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "profile bgmv_triton: one decode step, batch 2 (eager, 2 steps minus the prefill)" in out
    # per step: one shrink and one expand per LoRA site, 4 sites x 2 layers (prefill gone);
    # on the CPU the op times are host times, so where they rank in the table varies
    (all_rows,) = reports
    calls = {k: n for _, n, k in all_rows if k in ("multilora::bgmv_shrink", "multilora::bgmv_expand")}
    assert calls == {"multilora::bgmv_shrink": 8.0, "multilora::bgmv_expand": 8.0}
    log = tmp_path / "profile.log"                       # the report reads back, group table
    log.write_text(out)                                  # (printed after it) left out
    (title, rows), = bim.read_profile_log(str(log))
    assert title == "bgmv_triton: one decode step"
    printed = [k[:100] for _, _, k in all_rows[:30]]                  # the printed top 30
    assert rows and rows[0][2] == printed[0] and {k for _, _, k in rows} <= set(printed)
    assert not {k for _, _, k in rows} & {g for g, _ in bim.PROFILE_GROUPS}


def test_profile_summary_groups_the_committed_h200_log(capsys):
    """--profile-summary re-reads a saved --profile report: the H200 log in plots/ has 128
    LoRA expand and 128 shrink calls per step (4 sites x 32 layers) for bgmv_cuda, none for
    `none`, and the groups add up to the kernels they came from."""
    log = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "plots",
                       "e2e_profile_llama3-8b_b64_L7_r16_n16.txt")
    reports = dict(bim.read_profile_log(log))
    assert set(reports) == {"none: one decode step", "bgmv_cuda: one decode step"}
    for title, rows in reports.items():
        groups = {g: (us, n) for g, us, n in bim.group_profile(rows)}
        assert abs(sum(us for us, _ in groups.values()) - sum(r[0] for r in rows)) < 1e-6
        lora = title.startswith("bgmv_cuda")
        assert (groups.get("LoRA expand", (0, 0))[1], groups.get("LoRA shrink", (0, 0))[1]) \
            == ((128, 128) if lora else (0, 0))
        assert groups["base GEMMs (cuBLAS, split-K reduce)"][1] == 161   # 5 per layer + LM head
    run(["--profile-summary", log])
    assert "group (all kernels)" in capsys.readouterr().out


def test_fused_elementwise_and_sampler_flags(tmp_path):
    """--fused-elementwise / --sampler / --attention reach the engine (recorded in the config and the file
    name) and the run still validates against PEFT and generates every token."""
    data = run(TINY + ["--batch-size", "2", "--modes", "none", "gbmm", "--fused-elementwise",
                       "--sampler", "triton_split", "--attention", "triton",
                       "--out-dir", str(tmp_path)])
    c = data["config"]
    assert c["fused_elementwise"] == "on" and c["sampler"] == "triton_split"
    assert c["engine_options"] == dict(fused_elementwise=True, sampler="triton_split",
                                       attention="triton")
    assert c["attention"] == "triton"
    path = tmp_path / "e2e_tiny_b2_L4_r4_n4_fused_sampler-triton_split_attn-triton.json"
    assert data["json_path"] == str(path)
    check_json(str(path), [("none", "fast"), ("gbmm", "fast")], 2, 4, TOLERANCE[torch.float32])
