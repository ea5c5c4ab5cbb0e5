"""Smoke test of benchmarks/stage2_checkpoint.py: it runs, writes its JSON, and its figures
hang together (bytes grow as rows * 4 d; the exact cache holds more than the ledger)."""

from __future__ import annotations

import json

from benchmark_scripts import load_benchmark


def test_stage2_checkpoint_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = load_benchmark("stage2_checkpoint").main(
        ["--smoke", "--json", str(out), "--work", str(tmp_path / "w")]
    )
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(result))
    rows = {(r["cache"], r["d"]): r for r in data["rows"]}
    assert set(rows) == {(c, d) for c in ("samples", "external") for d in (1024, 4096)}
    for r in data["rows"]:
        assert r["write_s"] > 0 and r["read_s"] > 0 and r["fsync_s"] >= 0
        assert 4 * r["d"] <= r["bytes_per_row"] < 4 * r["d"] * 1.5, r  # the arrays are the state
    assert rows["samples", 4096]["rows"] == 24 + 3 * 2 * 8 + 4 * 3  # val, caches, centroids
    assert rows["external", 4096]["rows"] == 24 + 4 * 3  # the ledger keeps no rows
    assert rows["samples", 4096]["bytes"] > 2 * rows["samples", 1024]["bytes"]
    ex = data["extrapolation"]["samples"]["llama-3.2-1b"]
    assert ex["d"] == 3_407_872 and ex["bytes"] > ex["rows"] * 4 * ex["d"] * 0.99
    assert not list((tmp_path / "w").iterdir())  # the checkpoints it wrote are gone
