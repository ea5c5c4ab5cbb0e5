"""K chosen with Ray Tune: one trial per K, the table K -> silhouette -> validation loss."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from gs_ray.config import load_config
from gs_ray.prepare import prepare
from gs_ray.training.pretrain import base_model_for
from gs_ray.training.warmup import warmup_local


def _planted(rng, hidden: bool):
    """Two gradient clusters (orthogonal directions); prompts from two vocabularies. ``hidden``:
    the clusters follow a coin flip the prompts do not show; else they follow the vocabulary."""
    n = 160
    vocab = rng.integers(0, 2, size=n)
    truth = rng.integers(0, 2, size=n) if hidden else vocab
    words = [["stock", "bond", "yield", "equity"], ["dragon", "castle", "forest", "king"]]
    prompts = [" ".join(rng.choice(words[v], size=6)) for v in vocab]
    d = 64
    centres = np.eye(d)[:2] * 3
    G = centres[truth] + rng.normal(size=(n, d))
    return G, prompts, truth


@pytest.mark.parametrize("hidden", [True, False])
def test_a_trial_routes_with_a_router_and_merges_what_it_cannot_follow(hidden):
    from gs_ray.training.tuning import routed_partition

    rng = np.random.default_rng(0)
    G, prompts, truth = _planted(rng, hidden)
    cfg = load_config(None, ["--clustering.kmeans_n_init", "2"])
    fit, hold = np.arange(120), np.arange(120, 160)
    part = routed_partition(
        2, G[:40], G[fit], [prompts[i] for i in fit], [prompts[i] for i in hold], cfg, G[hold]
    )
    # The held-out rows (their clusters from their gradients) are the merge's held-out check.
    assert part["routability"]["n_held"] == len(hold)
    if hidden:  # the gradient clusters exist, but no router can follow them: one cluster left
        assert part["k_routed"] == 1 and (part["routed"] == 0).all()
    else:  # a routable split is kept, and the router follows it on held-out prompts
        assert part["k_routed"] == 2 and part["routability"]["held_agreement"] > 0.95
        mapped = np.array([np.bincount(part["labels"][truth[fit] == t]).argmax() for t in (0, 1)])
        assert (part["routed"] == mapped[truth[hold]]).mean() > 0.95
    one = routed_partition(
        1, G[:40], G[fit], [prompts[i] for i in fit], [prompts[i] for i in hold], cfg
    )
    assert one["k_routed"] == 1 and (one["labels"] == 0).all()


def test_a_trial_merges_with_the_encoder_router_too():
    """router.kind encoder: the merge's routers get the prompts' encoder features (a trial
    without them failed before the merge ran)."""
    from gs_ray.training.tuning import routed_partition

    rng = np.random.default_rng(0)
    G, prompts, truth = _planted(rng, hidden=False)
    cfg = load_config(None, ["--clustering.kmeans_n_init", "2", "--router.kind", "encoder"])
    fit, hold = np.arange(120), np.arange(120, 160)
    part = routed_partition(
        2, G[:40], G[fit], [prompts[i] for i in fit], [prompts[i] for i in hold], cfg, G[hold]
    )
    assert part["k_routed"] == 2 and part["routability"]["n_held"] == len(hold)
    mapped = np.array([np.bincount(part["labels"][truth[fit] == t]).argmax() for t in (0, 1)])
    assert (part["routed"] == mapped[truth[hold]]).mean() > 0.95


def test_every_k_gets_the_same_total_steps():
    from gs_ray.training.tuning import step_budget

    rng = np.random.default_rng(1)
    for k in (1, 2, 3, 5, 8):
        labels = rng.integers(0, k, size=97)
        steps = step_budget(labels, k, 60)
        assert sum(steps) == 60 and len(steps) == k
        sizes = np.bincount(labels, minlength=k)
        assert np.all(np.abs(np.array(steps) - 60 * sizes / sizes.sum()) < 1)
    assert step_budget(np.array([0, 0, 2]), 3, 10)[1] == 0  # an empty cluster trains nothing


@pytest.mark.slow
@pytest.mark.ray
def test_tune_picks_the_k_with_the_lowest_routed_validation_loss(
    ray_session, tmp_path, monkeypatch
):
    from mlflow.tracking import MlflowClient

    from gs_ray import tracking
    from gs_ray.evaluation import plots
    from gs_ray.training.tuning import tune_k

    store = (tmp_path / "mlruns").as_uri()  # each trial tracked (Ray's MLflowLoggerCallback)
    monkeypatch.setenv(tracking.FILE_STORE_ENV, "true")
    monkeypatch.delenv(tracking.URI_ENV, raising=False)

    cfg = load_config(
        None,
        [
            "--data.demo_size",
            "240",
            "--data.n_val",
            "48",
            "--model.tiny_hidden_size",
            "64",
            "--model.tiny_num_layers",
            "2",
            "--model.tiny_pretrain_steps",
            "0",
            "--lora.r",
            "4",
            "--warmup.epochs",
            "1",
            "--clustering.batch_size",
            "16",
            "--clustering.max_epochs",
            "1",
            "--tune.k_values",
            "[1, 2]",
            "--tune.n_samples",
            "96",
            "--tune.trial_steps",
            "6",
            "--run.output_dir",
            str(tmp_path),
            "--run.name",
            "tune",
            "--tracking.mlflow",
            store,
        ],
    )
    p = prepare(cfg, base_model=base_model_for)
    warmup_local(p)
    with tracking.open_tracker(cfg, p.run) as tracker, tracker.stage("tune") as stage:
        best = tune_k(p)
    results = json.loads((p.run.path / "tune" / "results.json").read_text())
    table = results["table"]
    assert [row["k"] for row in table] == [1, 2]
    assert best == min(table, key=lambda r: r["val_loss"])["k"] == results["best_k"]
    for row in table:
        assert 6 < row["val_loss"] < 10  # a real loss of the tiny model, near ln(vocab)
        assert row["k"] == 1 or -1 <= row["silhouette"] <= 1
        assert (
            sum(row["cluster_sizes"]) == results["n_fit"]
            and len(row["cluster_sizes"]) == row["k_routed"] <= row["k"]
        )
    assert p.run.manifest()["stages"]["tune"]["best_k"] == best
    # the weak/clear verdict is the K selection's own, against the structureless reference
    assert isinstance(results["weak_structure"], bool) and results["structure_verdict"].startswith(
        "K="
    )
    from gs_ray.evaluation.report import _tune_section

    section = _tune_section(results)
    assert f"K = {best} by routed held-out loss" in section
    assert ("The gradient structure is weak" in section) == results["weak_structure"]
    plots.pipeline_plots(p.run, best)
    assert (p.run.path / "plots" / "tune_k.png").exists()
    # Each trial is an MLflow run nested under the run's tune run, with its K and routed loss.
    client = MlflowClient(store)
    experiment = client.get_run(stage.run_id).info.experiment_id
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{stage.run_id}'")
    logged = sorted((int(r.data.params["k"]), r.data.metrics["val_loss"]) for r in trials)
    assert logged == [(row["k"], row["val_loss"]) for row in table]
    assert tracking.URI_ENV not in os.environ  # MLflow's fluent API set it; the tracker put it back
    history = client.get_metric_history(stage.run_id, "val_loss")
    assert sorted((h.step, h.value) for h in history) == logged  # the table over K
