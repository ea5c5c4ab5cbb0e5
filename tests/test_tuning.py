"""K chosen with Ray Tune: one trial per K, the table K -> silhouette -> validation loss."""

from __future__ import annotations

import json

import pytest

from gs_ray.config import load_config
from gs_ray.prepare import prepare
from gs_ray.training.warmup import warmup_local

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_tune_picks_the_k_with_the_lowest_routed_validation_loss(ray_session, tmp_path):
    from gs_ray.evaluation import plots
    from gs_ray.training.tuning import tune_k

    cfg = load_config(None, [
        "--data.demo_size", "240", "--data.n_val", "48", "--model.tiny_hidden_size", "64",
        "--model.tiny_num_layers", "2", "--model.tiny_pretrain_steps", "0", "--lora.r", "4", "--warmup.epochs", "1",
        "--clustering.batch_size", "16", "--clustering.max_epochs", "1",
        "--tune.k_values", "[2, 3]", "--tune.n_samples", "96", "--tune.expert_max_steps", "3",
        "--run.output_dir", str(tmp_path), "--run.name", "tune",
    ])  # fmt: skip
    p = prepare(cfg)
    warmup_local(p)
    best = tune_k(p)
    results = json.loads((p.run.path / "tune" / "results.json").read_text())
    table = results["table"]
    assert [row["k"] for row in table] == [2, 3]
    assert best == min(table, key=lambda r: r["val_loss"])["k"] == results["best_k"]
    for row in table:
        assert 6 < row["val_loss"] < 10  # a real loss of the tiny model, near ln(vocab)
        assert -1 <= row["silhouette"] <= 1
        assert (
            sum(row["cluster_sizes"]) == results["n_fit"] and len(row["cluster_sizes"]) == row["k"]
        )
    assert p.run.manifest()["stages"]["tune"]["best_k"] == best
    plots.pipeline_plots(p.run, best)
    assert (p.run.path / "plots" / "tune_k.png").exists()
