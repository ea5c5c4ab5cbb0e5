"""The router as a pipeline stage: fit it on the training prompts' clusters in a Ray task."""

from __future__ import annotations

import logging

from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources

log = logging.getLogger(__name__)


def fit_and_save_router(texts, labels, k, cfg, seed, cache_path, folder) -> dict:
    """Fit a router on the prompts' cluster labels and save it in ``folder`` (a Ray task)."""
    from gs_ray.routing.router import fit_router

    router, metrics = fit_router(texts, labels, k, cfg, seed, cache_path=cache_path)
    router.save(folder)
    return metrics


def router_stage(p: Prepared, resume: bool = False) -> dict:
    """Train the router (frozen encoder + linear head) on the training prompts' clusters, in a
    Ray task (on a GPU where there is one), and save it in the run directory. Samples left out
    of clustering (no cluster) are left out here too."""
    import ray

    labels, k = p.assignments()
    with p.run.stage("router") as info:
        train = p.splits.train
        train = train[labels[train] >= 0]
        texts = [p.samples[i].prompt for i in train]
        task = ray.remote(fit_and_save_router).options(**task_resources())
        metrics = ray.get(task.remote(texts, labels[train], k, p.cfg.router, p.cfg.run.seed,
                                      str(p.run.sub("router", "features_train.npy")),
                                      str(p.run.router)))  # fmt: skip
        p.run.add_metrics(router=metrics)
        info.update(holdout_accuracy=metrics.get("holdout_accuracy"))
        log.info("router: holdout accuracy %.3f (chance %.3f)",
                 metrics.get("holdout_accuracy") or 0, metrics.get("chance_accuracy") or 0)  # fmt: skip
    return metrics
