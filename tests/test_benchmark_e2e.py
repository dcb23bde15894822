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


def test_benchmark_quick_cpu(tmp_path, capsys):
    modes = ["none", "cheat_bmm", "gbmm", "peft"]
    data = run(["--quick", "--device", "cpu", "--modes", *modes, "--out-dir", str(tmp_path),
                "--no-progress", "--engine", "fast", "hf"])
    path = data["json_path"]
    assert os.path.basename(path) == "e2e_tiny_b8_L4_r4_n8_fast-hf.json"   # --quick: n = 8
    rows = [(m, e) for e in ("fast", "hf") for m in modes[:-1]] + [("peft", "peft")]
    d = check_json(path, rows, 8, 8, TOLERANCE[torch.float32])
    assert d["validation"]["gate"] == TOLERANCE[torch.float32]     # fp32: the plain bound
    png = path[:-5] + ".png"
    assert os.path.getsize(png) > 10_000
    table = capsys.readouterr().out
    for word in ("Throughput tok/s", "Time s", "Total Tokens", "vs slowest", "vs none", "peft",
                 "gbmm (fast)", "gbmm (hf)"):
        assert word in table
    os.remove(png)
    run(["--plot-only", path])
    assert os.path.exists(png)


def test_benchmark_rejects_bad_flags():
    with pytest.raises(SystemExit):
        bim.build_parser().parse_args(["--modes", "nonsense"])
    args = bim.build_parser().parse_args(["--max-new-tokens", "3", "--batch_size", "2"])
    assert (args.max_new_tokens, args.batch_size) == (3, 2)


@pytest.mark.gpu
def test_benchmark_short_gpu(tmp_path):
    modes = ["none", "gbmm", "bgmv_triton", "bgmv_cuda", "sgmv_triton", "peft"]
    data = run(["--model-config", "llama3-8b", "--num-layers", "2", "--batch-size", "16",
                "--max-new-tokens", "16", "--num-adapters", "8", "--rank", "16", "--modes", *modes,
                "--out-dir", str(tmp_path), "--no-progress", "--engine", "fast", "hf"])
    rows = [(m, e) for e in ("fast", "hf") for m in modes[:-1]] + [("peft", "peft")]
    d = check_json(data["json_path"], rows, 16, 16, TOLERANCE[torch.bfloat16])
    assert d["env"]["gpu"] and d["env"]["triton"]
    assert all(r["peak_memory_gb"] > 0 for r in d["results"])
