"""Smoke test of benchmarks/gradient_throughput.py: it runs, writes its JSON, and (a) equals (b)."""

from __future__ import annotations

import json

from benchmark_scripts import load_benchmark


def test_gradient_throughput_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = load_benchmark("gradient_throughput").main(
        ["--smoke", "--json", str(out)]
    )  # batch 4, micro-batch 2, cpu
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    for key in (
        "speedup_vs_loop",
        "ratio_vs_train_step",
        "max_rel_err_vs_loop",
        "model",
        "dim",
        "batch_size",
        "micro_batch",
        "pad_waste_a",
        "pad_waste_c1",
        "torch_threads",
        "device",
        "versions",
    ):
        assert key in data, key
    assert data["model"] == "tiny-llama" and data["batch_size"] == 4 and data["micro_batch"] == 2
    assert data["dim"] == 65_536  # r=32 on q/v of 4 layers of hidden 128
    for variant in ("a_engine", "b_loop", "c_train_step", "c1_train_step_one_batch"):
        v = data["variants"][variant]
        assert v["seconds"] > 0 and v["samples_per_s"] > 0 and v["tokens_per_s"] > 0
    assert data["speedup_vs_loop"] > 0 and data["ratio_vs_train_step"] > 0
    assert 0 <= data["pad_waste_a"] <= data["pad_waste_c1"] < 1
    assert data["max_rel_err_vs_loop"] < 1e-4
    assert data["rel_err_train_grad_vs_mean_row"] < 1e-4
