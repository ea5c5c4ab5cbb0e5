"""The routing stages of the pipeline, each a Ray task around a pure module:

* ``routability`` (after Stage II): merge the clusters a prompt router cannot tell apart
  (``routability.py``), so that the experts are trained on a partition the router can follow;
* ``router``: fit the router on the training prompts' clusters;
* ``calibrate`` (after the experts, the generalist and the router): temperature-scale the router
  on the calibration rows and choose the generalist fallback's threshold (``fallback.py``).
"""

from __future__ import annotations

import json
import logging

import numpy as np

from gs_ray.io import write_json
from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources, use_assigned_cpus
from gs_ray.rundir import GENERALIST, expert_name

log = logging.getLogger(__name__)


def fit_and_save_router(texts, labels, k, cfg, seed, cache_path, folder) -> dict:
    """Fit a router on the prompts' cluster labels and save it in ``folder`` (a Ray task)."""
    from gs_ray.routing.router import make_router

    router = make_router(cfg, k, seed, cache_path=cache_path).fit(texts, labels)
    router.save(folder)
    return router.metrics


def router_stage(p: Prepared, resume: bool = False) -> dict:
    """Train the router (frozen encoder + linear head) on the training prompts' clusters, in a
    Ray task (on a GPU where there is one), and save it in the run directory. Samples left out
    of clustering (no cluster) are left out here too."""
    import ray

    labels, k = p.assignments()
    with p.run.stage("router") as info:
        train = p.fit_rows()  # the calibration rows are the fallback's, not the router's
        train = train[labels[train] >= 0]
        texts = [p.samples[i].prompt for i in train]
        task = ray.remote(fit_and_save_router).options(**task_resources())
        metrics = ray.get(
            task.remote(
                texts,
                labels[train],
                k,
                p.cfg.router,
                p.cfg.run.seed,
                str(p.run.router_features),
                str(p.run.router),
            )
        )
        p.run.add_metrics(router=metrics)
        info.update(holdout_accuracy=metrics.get("holdout_accuracy"))
        log.info(
            "router: holdout accuracy %.3f (chance %.3f)",
            metrics.get("holdout_accuracy") or 0,
            metrics.get("chance_accuracy") or 0,
        )
    return metrics


def _routability_task(
    texts, labels, k, router_cfg, target, folds, seed, centroids, cache_path, held=((), None, "")
):
    """``held``: the calibration rows' (prompts, clusters, encoder features' cache path)."""
    from gs_ray.routing.encoder import encode_cached
    from gs_ray.routing.routability import merge_for_routability

    use_assigned_cpus()
    (held_texts, held_labels, held_cache), features, held_features = held, None, None
    if router_cfg.kind == "encoder":
        features = encode_cached(texts, router_cfg.encoder, cache_path, router_cfg.max_length)
        if len(held_texts):
            held_features = encode_cached(
                held_texts, router_cfg.encoder, held_cache, router_cfg.max_length
            )
    return merge_for_routability(
        texts,
        labels,
        k,
        router_cfg,
        target,
        folds,
        seed,
        centroids,
        features,
        held_texts=held_texts,
        held_labels=held_labels,
        held_features=held_features,
    ).to_dict()


def routability_stage(p: Prepared, resume: bool = False) -> dict:
    """Merge Stage II's clusters that a router of the run's kind confuses, by cross-validation
    on the training prompts, until its agreement reaches ``clustering.routability_target`` (or
    K = 1). Writes ``stage2/routability.json`` (the mapping and every merge's reason) and adds
    its summary to ``stage2/k_selection.json``; ``Prepared.assignments`` applies it."""
    import ray

    cfg, run = p.cfg, p.run
    labels, k = p.stage2_assignments()
    with run.stage("routability") as info:
        rows = p.fit_rows()
        rows = rows[labels[rows] >= 0]
        # The calibration rows took no part in Stage II's centroids (Stage2Plan.build): their
        # clusters are what a new prompt's would be, and the merge checks the router on them.
        held = p.calibration_rows()
        held = held[labels[held] >= 0]
        centroids = np.load(run.centroids_path) if run.centroids_path.exists() else None
        task = ray.remote(_routability_task).options(**task_resources())
        result = ray.get(
            task.remote(
                [p.samples[i].prompt for i in rows],
                labels[rows],
                k,
                cfg.router,
                cfg.clustering.routability_target,
                cfg.clustering.routability_folds,
                cfg.run.seed,
                centroids,
                str(run.router_features),
                (
                    [p.samples[i].prompt for i in held],
                    labels[held],
                    str(run.calibration_features),
                ),
            )
        )
        result["n_rows"] = len(rows)
        write_json(run.routability_json, result)
        ks = json.loads(run.k_selection_json.read_text())
        ks["routability"] = {
            key: result[key]
            for key in (
                "k_before",
                "k_after",
                "agreement_before",
                "agreement_after",
                "n_held",
                "held_agreement_before",
                "held_agreement_after",
                "target",
                "met",
            )
        }
        ks["routability"]["merges"] = [s["why"] for s in result["steps"]]
        write_json(run.k_selection_json, ks)
        run.add_metrics(routability=ks["routability"])
        info.update(
            k_before=result["k_before"],
            k_after=result["k_after"],
            agreement_after=result["agreement_after"],
        )
    for step in result["steps"]:
        log.info("routability: merged %s: %s", step["merged"], step["why"])
    from gs_ray.routing.routability import summary_line

    log.info(summary_line(result))
    p.assignments(reload=True)
    return result


def _calibrate_task(base_path, model_cfg, adapters, pairs, pad_id, router_folder, prompts):
    from gs_ray.routing.router import load_router
    from gs_ray.training.loop import adapter_losses

    use_assigned_cpus()
    return (
        adapter_losses(base_path, model_cfg, adapters, pairs, pad_id),
        load_router(router_folder).predict_proba(prompts),
    )


def calibrate_stage(p: Prepared, resume: bool = False) -> dict:
    """Calibrate the router on the calibration rows (held out of every training) and choose the
    fallback to the generalist (``routing/fallback.py``); writes ``router/fallback.json``."""
    import ray

    from gs_ray.routing.fallback import Fallback, choose_fallback

    labels, k = p.assignments()
    with p.run.stage("calibrate") as info:
        rows = p.calibration_rows()
        rows = rows[labels[rows] >= 0]
        if len(rows) == 0:
            fb = Fallback(
                summary={
                    "n_calibration": 0,
                    "why": "no calibration rows (the "
                    "training split is too small): routed without fallback",
                }
            )
        else:
            adapters = {expert_name(c): str(p.run.expert(c)) for c in range(k)}
            adapters[GENERALIST] = str(p.run.generalist)
            task = ray.remote(_calibrate_task).options(**task_resources())
            losses, proba = ray.get(
                task.remote(
                    p.base_path,
                    p.cfg.model,
                    adapters,
                    p.pairs(rows),
                    p.pad_id,
                    str(p.run.router),
                    [p.samples[i].prompt for i in rows],
                )
            )
            expert = np.stack([losses[expert_name(c)] for c in range(k)])
            fb = choose_fallback(
                proba, labels[rows], expert, losses[GENERALIST], p.cfg.fallback.thresholds
            )
        fb.save(p.run.fallback_json)
        p.run.add_metrics(
            fallback={
                "temperature": fb.temperature,
                "rule": fb.rule,
                "threshold": fb.threshold,
                **fb.summary,
            }
        )
        info.update(
            rule=fb.rule,
            threshold=fb.threshold,
            generalist_share=fb.summary.get("generalist_share"),
        )
    s = fb.summary
    if s.get("n_calibration"):
        log.info(
            "fallback: %s (threshold %.3f, temperature %.2f): %.0f%% of %d calibration rows "
            "to the generalist; calibration loss generalist %.4f, routed %.4f, chosen %.4f",
            fb.rule,
            fb.threshold,
            fb.temperature,
            100 * s["generalist_share"],
            s["n_calibration"],
            s["loss_generalist"],
            s["loss_routed"],
            s["loss_chosen"],
        )
    else:
        log.info("fallback: %s", s.get("why"))
    return fb.to_dict()
