"""Choosing K with Ray Tune (``clustering.k_selection: tune``).

The paper picks K by the SVD + silhouette criterion and reports that the best silhouette K also
gives the best accuracy (Fig. 6). This mode checks that on the user's data: one Ray Tune trial
per candidate K clusters a sample of training gradients with K fixed, briefly trains K experts
from the warm-up adapter on their clusters, and reports the validation loss of the routed
experts (each held-out sample routed to the expert of its gradient cluster). The K with the
lowest validation loss is used for the full Stage II; the table K -> silhouette -> validation
loss is kept in ``run_dir/tune/results.json`` and plotted.

The gradients of the sample are computed once (a Ray task) and shared with the trials through
the object store; ``tune.n_samples`` bounds their size (n x d float32).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from gs_ray.config import Config
from gs_ray.io import write_json
from gs_ray.prepare import Prepared
from gs_ray.rundir import expert_name

log = logging.getLogger(__name__)


def sample_gradients(
    base_path: str, cfg: Config, adapter: str, pad_id: int, pairs: list
) -> np.ndarray:
    """Per-sample gradients of ``pairs`` with the warm-up adapter (run as a Ray task)."""
    from gs_ray.stage2.computer import GradientComputer

    return GradientComputer(base_path, cfg, adapter, pad_id)(pairs)


def k_trial(config: dict[str, Any], *, G_val, G_fit, G_hold, fit_pairs, hold_pairs, base_path,
            cfg: Config, adapter: str, pad_id: int) -> None:  # fmt: skip
    """One Tune trial: cluster with K fixed, train K experts briefly, report routed val loss."""
    import torch
    from ray import tune

    from gs_ray.core.models import load_adapter, load_base_model
    from gs_ray.data import Sample
    from gs_ray.stage2.launch import make_clusterer
    from gs_ray.training.loop import TorchEngine, adapter_losses, train_adapter

    k = int(config["k"])
    c = Config.from_dict(cfg.to_dict())
    c.clustering.n_clusters = k
    est = make_clusterer(c).fit(G_fit, G_val=G_val)
    routed = est.predict(G_hold)
    steps_cfg = replace(c.experts, max_steps=c.tune.expert_max_steps)
    folder = tune.get_context().get_trial_dir()
    adapters = {}
    for cluster in range(k):
        members = [Sample(str(i), *fit_pairs[i]) for i in np.flatnonzero(est.labels_ == cluster)]
        path = f"{folder}/{expert_name(cluster)}"
        model = load_adapter(load_base_model(base_path, c.model), adapter, trainable=True)
        if members:
            torch.manual_seed(c.run.seed + cluster)
            train_adapter(TorchEngine(model, steps_cfg), members, steps_cfg, pad_id, c.run.seed)
        model.save_pretrained(path)
        adapters[expert_name(cluster)] = path
    losses = adapter_losses(base_path, c.model, adapters, hold_pairs, pad_id)
    per_sample = np.stack([losses[expert_name(j)] for j in range(k)])[
        routed, np.arange(len(routed))
    ]
    tune.report({"k": k, "val_loss": float(per_sample.mean()), "silhouette": float(est.silhouette_),
                 "n_components": int(est.n_components_),
                 "cluster_sizes": np.bincount(est.labels_, minlength=k).tolist()})  # fmt: skip


def tune_k(p: Prepared, resume: bool = False) -> int:
    """Run the Tune search over ``tune.k_values`` for a prepared run; returns the best K."""
    import ray
    from ray import tune

    from gs_ray.ray_utils import task_resources

    start = time.perf_counter()
    cfg, run = p.cfg, p.run
    rng = np.random.default_rng(cfg.run.seed + 3)
    pool = np.setdiff1d(p.splits.train, p.splits.val)
    chosen = rng.choice(pool, size=min(cfg.tune.n_samples, len(pool)), replace=False)
    n_hold = max(1, int(round(cfg.tune.holdout_fraction * len(chosen))))
    hold, fit = np.sort(chosen[:n_hold]), np.sort(chosen[n_hold:])
    pairs = lambda idx: [p.samples[i].pair for i in idx]  # noqa: E731
    resources = task_resources(cpus=1)
    grad_task = ray.remote(sample_gradients).options(**resources)
    adapter = str(run.warmup_adapter)
    G_val, G_fit, G_hold = ray.get([grad_task.remote(p.base_path, cfg, adapter, p.pad_id, pairs(ix))
                                    for ix in (p.splits.val, fit, hold)])  # fmt: skip
    trainable = tune.with_parameters(
        k_trial, G_val=G_val, G_fit=G_fit, G_hold=G_hold, fit_pairs=pairs(fit),
        hold_pairs=pairs(hold), base_path=p.base_path, cfg=cfg, adapter=adapter, pad_id=p.pad_id,
    )  # fmt: skip
    per_trial = {"gpu": 1} if resources.get("num_gpus") else {"cpu": 1}
    tuner = tune.Tuner(
        tune.with_resources(trainable, per_trial),
        param_space={"k": tune.grid_search(list(cfg.tune.k_values))},
        tune_config=tune.TuneConfig(metric="val_loss", mode="min",
                                    max_concurrent_trials=cfg.tune.max_concurrent_trials),
        run_config=tune.RunConfig(name="tune_k", storage_path=str((run.path / "ray_tune").resolve())),
    )  # fmt: skip
    results = tuner.fit()
    errors = [str(r.error) for r in results if r.error]
    if errors:
        raise RuntimeError(f"Tune trials failed: {errors[:2]}")
    table = sorted(
        ({key: r.metrics[key] for key in ("k", "val_loss", "silhouette", "n_components",
                                          "cluster_sizes")} for r in results),
        key=lambda row: row["k"],
    )  # fmt: skip
    best = min(table, key=lambda row: (row["val_loss"], row["k"]))
    best_silhouette = max(table, key=lambda row: row["silhouette"])
    write_json(run.sub("tune", "results.json"), {
        "table": table, "best_k": best["k"], "best_silhouette_k": best_silhouette["k"],
        "n_fit": len(fit), "n_holdout": len(hold),
    })  # fmt: skip
    run.add_metrics(tune={"table": table, "best_k": best["k"],
                          "best_silhouette_k": best_silhouette["k"]})  # fmt: skip
    run.mark_stage("tune", time.perf_counter() - start, best_k=best["k"])
    log.info("Ray Tune over K: %s -> best K=%d (best silhouette at K=%d)",
             [(r["k"], round(r["val_loss"], 4)) for r in table], best["k"], best_silhouette["k"])  # fmt: skip
    return best["k"]
