"""Choosing K with Ray Tune (``clustering.k_selection: tune``): K chosen by what a user gets.

The paper picks K by the SVD + silhouette criterion and reports that the best silhouette K also
gives the best accuracy (Fig. 6). This mode checks that on the user's data, scoring each K the
way the run will be used: one Ray Tune trial per candidate K (K = 1, one LoRA on everything, is a
candidate) clusters a sample of training gradients with K fixed, merges clusters a router
cannot follow (as the run's routability step does), fits a router of the run's kind on the
prompts, trains the experts from the warm-up adapter with the **same total number of
optimizer steps for every K** (``tune.trial_steps``, shared in proportion to cluster sizes), and
reports the held-out loss of the experts **chosen by that router** (the prompts only; the
gradient assignment of a held-out row needs its answer). The K with the lowest routed loss is
used for the full Stage II; the table K -> silhouette -> routed loss is kept in
``run_dir/tune/results.json`` and plotted. Where the silhouette is flat (the clusterer's
``structure`` says weak, or no K is clearly best), the console says so and names the K the
routed loss prefers. With tracking on (``tracking.mlflow``), each trial is an MLflow run nested
under the run's ``tune`` run (``trial_tracking``).

The gradients of the sample are computed once (a Ray task) and shared with the trials through
the object store; ``tune.n_samples`` bounds their size (n x d float32).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import replace
from typing import Any

import numpy as np

from gs_ray import tracking
from gs_ray.config import Config, config_from_dict
from gs_ray.core.seeds import tune_expert_seed, tune_sample_seed
from gs_ray.io import write_json
from gs_ray.prepare import Prepared
from gs_ray.rundir import RunDir, expert_name

log = logging.getLogger(__name__)


def sample_gradients(
    base_path: str, cfg: Config, adapter: str, pad_id: int, pairs: list
) -> np.ndarray:
    """Per-sample gradients of ``pairs`` with the warm-up adapter (run as a Ray task)."""
    from gs_ray.stage2.computer import GradientComputer

    return GradientComputer(base_path, cfg, adapter, pad_id)(pairs)


def routed_partition(
    k: int,
    G_val: np.ndarray,
    G_fit: np.ndarray,
    fit_prompts: list[str],
    hold_prompts: list[str],
    cfg: Config,
    G_hold: np.ndarray | None = None,
) -> dict[str, Any]:
    """A trial's partition as the run would deploy it: the clusterer with K fixed on ``G_fit``,
    the routability merge (if on), and a router of the run's kind fitted on the fit prompts;
    returns the fit labels, the merged K, the held-out rows' routed clusters and the clusterer's
    figures. K = 1: every row in one cluster, nothing to route. ``G_hold``: the held-out rows'
    gradients, which took no part in the centroids: their clusters are the merge's held-out
    check, as the calibration rows are the run's (``merge_for_routability``)."""
    from gs_ray.routing.router import make_router
    from gs_ray.stage2.launch import make_clusterer

    n_fit = len(fit_prompts)
    out: dict[str, Any] = {
        "k": k,
        "silhouette": float("nan"),
        "n_components": 0,
        "routability": None,
    }
    if k == 1:
        return {
            **out,
            "labels": np.zeros(n_fit, dtype=np.int64),
            "k_routed": 1,
            "routed": np.zeros(len(hold_prompts), dtype=np.int64),
        }
    c = config_from_dict(cfg.to_dict())
    c.clustering.n_clusters = k
    est = make_clusterer(c).fit(G_fit, G_val=G_val)
    labels, k_eff = est.labels_.astype(np.int64), k
    features = hold_features = None
    if c.router.kind == "encoder":  # encoded once, for the merge's routers and the trial's
        from gs_ray.routing.encoder import load_encoder

        encoder = load_encoder(c.router.encoder, c.router.max_length)
        features, hold_features = encoder.encode(fit_prompts), encoder.encode(hold_prompts)
    if c.clustering.routability != "off":
        from gs_ray.routing.routability import merge_for_routability

        held: dict[str, Any] = {}
        if G_hold is not None and len(hold_prompts):
            held = {
                "held_texts": hold_prompts,
                "held_labels": est.predict(G_hold),
                "held_features": hold_features,
            }
        merge = merge_for_routability(
            fit_prompts,
            labels,
            k,
            c.router,
            c.clustering.routability_target,
            c.clustering.routability_folds,
            c.run.seed,
            est.cluster_centers_,
            features,
            **held,
        )
        labels, k_eff = merge.labels(labels), merge.k_after
        out["routability"] = {
            "k_after": merge.k_after,
            "agreement": merge.agreement_after,
            "n_held": merge.n_held,
            "held_agreement": merge.held_agreement_after,
        }
    if k_eff == 1:
        routed = np.zeros(len(hold_prompts), dtype=np.int64)
    else:
        router = make_router(c.router, k_eff, c.run.seed)
        if features is None:
            routed = router.fit(fit_prompts, labels).predict(hold_prompts)
        else:  # Router.fit and .predict would encode the same prompts again
            routed = router.fit_features(features, labels).predict_from_features(hold_features)
    return {
        **out,
        "labels": labels,
        "k_routed": k_eff,
        "routed": routed,
        "silhouette": float(est.silhouette_),
        "n_components": int(est.n_components_),
    }


def step_budget(labels: np.ndarray, k: int, total: int) -> list[int]:
    """Optimizer steps per cluster: ``total`` shared in proportion to the clusters' sizes
    (largest remainders), so that every K trains for the same number of steps in all; an empty
    cluster gets none."""
    sizes = np.bincount(np.asarray(labels, dtype=np.int64), minlength=k).astype(float)
    if sizes.sum() == 0:
        return [0] * k
    exact = total * sizes / sizes.sum()
    steps = np.floor(exact).astype(int)
    for c in np.argsort(-(exact - steps), kind="stable")[: total - int(steps.sum())]:
        steps[c] += 1
    return steps.tolist()


def k_trial(
    config: dict[str, Any],
    *,
    G_val,
    G_fit,
    G_hold,
    fit_pairs,
    hold_pairs,
    fit_prompts,
    hold_prompts,
    base_path,
    cfg: Config,
    adapter: str,
    pad_id: int,
) -> None:
    """One Tune trial: the routed partition with K fixed, its experts trained on an equal total
    budget, the routed held-out loss reported. ``G_hold`` gives the held-out rows' clusters (the
    routability merge's held-out check)."""
    import torch
    from ray import tune

    from gs_ray.core.models import load_adapter, load_base_model
    from gs_ray.data import Sample
    from gs_ray.training.loop import TorchEngine, adapter_losses, train_adapter

    part = routed_partition(int(config["k"]), G_val, G_fit, fit_prompts, hold_prompts, cfg, G_hold)
    labels, k = part["labels"], part["k_routed"]
    folder = tune.get_context().get_trial_dir()
    adapters = {}
    for cluster, steps in enumerate(step_budget(labels, k, cfg.tune.trial_steps)):
        members = [Sample(str(i), *fit_pairs[i]) for i in np.flatnonzero(labels == cluster)]
        path = f"{folder}/{expert_name(cluster)}"
        model = load_adapter(load_base_model(base_path, cfg.model), adapter, trainable=True)
        if members and steps:
            per_epoch = math.ceil(len(members) / cfg.experts.batch_size / cfg.experts.grad_accum)
            steps_cfg = replace(cfg.experts, max_steps=steps, epochs=math.ceil(steps / per_epoch))
            torch.manual_seed(tune_expert_seed(cfg.run.seed, cluster))
            train_adapter(TorchEngine(model, steps_cfg), members, steps_cfg, pad_id, cfg.run.seed)
        model.save_pretrained(path)
        adapters[expert_name(cluster)] = path
    losses = adapter_losses(base_path, cfg.model, adapters, hold_pairs, pad_id)
    per_sample = np.stack([losses[expert_name(j)] for j in range(k)])
    rows = np.arange(per_sample.shape[1])
    tune.report(
        {
            "k": part["k"],
            "k_routed": k,
            "val_loss": float(per_sample[part["routed"], rows].mean()),
            "silhouette": part["silhouette"],
            "n_components": part["n_components"],
            "cluster_sizes": np.bincount(labels, minlength=k).tolist(),
        }
    )


def trial_tracking(run: RunDir) -> list:
    """Tune's callbacks that log each trial (its K, its routed loss and silhouette) as an MLflow
    run nested under the run's ``tune`` run, with Ray's own ``MLflowLoggerCallback`` (in the
    driver, beside the tracker); none where tracking is off."""
    parent = tracking.trial_parent(run, "tune")
    if parent is None:
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(parent.uri, experiment_name=parent.experiment, tags=parent.tags)]


def tune_k(p: Prepared, resume: bool = False) -> int:
    """Run the Tune search over ``tune.k_values`` for a prepared run; returns the best K."""
    import ray
    from ray import tune

    from gs_ray.ray_utils import task_resources

    start = time.perf_counter()
    cfg, run = p.cfg, p.run
    rng = np.random.default_rng(tune_sample_seed(cfg.run.seed))
    pool = np.setdiff1d(p.splits.train, p.splits.val)
    chosen = rng.choice(pool, size=min(cfg.tune.n_samples, len(pool)), replace=False)
    n_hold = max(1, int(round(cfg.tune.holdout_fraction * len(chosen))))
    hold, fit = np.sort(chosen[:n_hold]), np.sort(chosen[n_hold:])
    pairs = lambda idx: [p.samples[i].pair for i in idx]  # noqa: E731
    resources = task_resources(cpus=1)
    grad_task = ray.remote(sample_gradients).options(**resources)
    adapter = str(run.warmup_adapter)
    G_val, G_fit, G_hold = ray.get(
        [
            grad_task.remote(p.base_path, cfg, adapter, p.pad_id, pairs(ix))
            for ix in (p.splits.val, fit, hold)
        ]
    )
    prompts = lambda idx: [p.samples[i].prompt for i in idx]  # noqa: E731
    trainable = tune.with_parameters(
        k_trial,
        G_val=G_val,
        G_fit=G_fit,
        G_hold=G_hold,
        fit_pairs=pairs(fit),
        hold_pairs=pairs(hold),
        fit_prompts=prompts(fit),
        hold_prompts=prompts(hold),
        base_path=p.base_path,
        cfg=cfg,
        adapter=adapter,
        pad_id=p.pad_id,
    )
    per_trial = {"gpu": 1} if resources.get("num_gpus") else {"cpu": 1}
    tuner = tune.Tuner(
        tune.with_resources(trainable, per_trial),
        param_space={"k": tune.grid_search(list(cfg.tune.k_values))},
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", max_concurrent_trials=cfg.tune.max_concurrent_trials
        ),
        run_config=tune.RunConfig(
            name="tune_k",
            storage_path=str((run.path / "ray_tune").resolve()),
            callbacks=trial_tracking(run),
        ),
    )
    results = tuner.fit()
    errors = [str(r.error) for r in results if r.error]
    if errors:
        raise RuntimeError(f"Tune trials failed: {errors[:2]}")
    table = sorted(
        (
            {
                key: r.metrics[key]
                for key in (
                    "k",
                    "k_routed",
                    "val_loss",
                    "silhouette",
                    "n_components",
                    "cluster_sizes",
                )
            }
            for r in results
        ),
        key=lambda row: row["k"],
    )
    best = min(table, key=lambda row: (row["val_loss"], row["k"]))
    scored = [row for row in table if np.isfinite(row["silhouette"])]
    best_silhouette = max(scored, key=lambda row: row["silhouette"]) if scored else best
    structure = gradient_structure(G_val, cfg)
    weak = bool(structure["weak"])
    run.tune_results_json.parent.mkdir(parents=True, exist_ok=True)
    write_json(
        run.tune_results_json,
        {
            "table": table,
            "best_k": best["k"],
            "best_silhouette_k": best_silhouette["k"],
            "weak_structure": weak,
            "structure_verdict": structure["verdict"],
            "n_fit": len(fit),
            "n_holdout": len(hold),
            "rule": "routed held-out loss (router on the prompts), equal total steps per K",
        },
    )
    run.add_metrics(
        tune={
            "table": table,
            "best_k": best["k"],
            "weak_structure": weak,
            "best_silhouette_k": best_silhouette["k"],
        }
    )
    run.mark_stage("tune", time.perf_counter() - start, best_k=best["k"])
    log.info(
        "Ray Tune over K (routed held-out loss): %s -> best K=%d (best silhouette at K=%d)",
        [(r["k"], round(r["val_loss"], 4)) for r in table],
        best["k"],
        best_silhouette["k"],
    )
    if weak:
        log.info(
            "Ray Tune over K: the gradient structure is weak (no K clearly above the "
            "structureless reference: %s); the routed loss prefers K=%d",
            structure["verdict"],
            best["k"],
        )
    return best["k"]


def gradient_structure(G_val: np.ndarray, cfg: Config) -> dict[str, Any]:
    """The K selection's own verdict on the validation gradients (``summary()["structure"]``:
    weak when no K is clearly above the structureless reference, docs/k_selection.md), with
    the configured K range and reference; with ``clustering.null_draws: 0`` the old floor rule
    decides (weak: no K >= 2 at ``min_silhouette``)."""
    from gs_ray.stage2.launch import make_clusterer

    c = config_from_dict(cfg.to_dict())
    c.clustering.n_clusters = None
    structure = make_clusterer(c).initialize(G_val).summary()["structure"]
    return structure or {"weak": False, "verdict": "no K selection (one candidate K)"}
