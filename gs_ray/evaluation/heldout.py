"""Held-out evaluation of a run: every expert and the warm-up adapter on the test split."""

from __future__ import annotations

import logging

import numpy as np

from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources, use_assigned_cpus
from gs_ray.routing.fallback import Fallback
from gs_ray.rundir import GENERALIST, WARMUP, expert_name

log = logging.getLogger(__name__)

BASE = "base"  # the base model with no adapter, in the per-sample losses


def _evaluate_task(
    base_path, model_cfg, adapters, pairs, pad_id, router_folder, prompts, n_latency
):
    from gs_ray.routing.router import load_router
    from gs_ray.training.loop import adapter_losses

    use_assigned_cpus()
    losses = adapter_losses(base_path, model_cfg, adapters, pairs, pad_id, base_key=BASE)
    router = load_router(router_folder)
    return losses, router.predict_proba(prompts), router.route_latency_ms(prompts[:n_latency])


def evaluate(p: Prepared, resume: bool = False) -> dict:
    """Held-out (test split) losses: every expert and the warm-up adapter on every cluster's
    test samples; routed by the router and by the gradient assignment (oracle); with the
    fallback, the generalist alone and the deployed routing (router, low confidence to the
    generalist). Samples left out of clustering are left out here too."""
    import ray

    labels, k = p.assignments()
    with p.run.stage("evaluate"):
        test = p.splits.test
        test = test[labels[test] >= 0]
        adapters = {WARMUP: str(p.run.warmup_adapter)}
        adapters.update({expert_name(c): str(p.run.expert(c)) for c in range(k)})
        fallback = p.cfg.fallback.enabled and p.run.fallback_json.exists()
        if fallback:
            adapters[GENERALIST] = str(p.run.generalist)
        task = ray.remote(_evaluate_task).options(**task_resources())
        per_sample, proba, latency = ray.get(
            task.remote(
                p.base_path,
                p.cfg.model,
                adapters,
                p.pairs(test),
                p.pad_id,
                str(p.run.router),
                [p.samples[i].prompt for i in test],
                p.cfg.eval.latency_samples,
            )
        )
        out = heldout_table(per_sample, proba.argmax(1), labels[test], k)
        out["router_latency_ms"] = latency
        if fallback:
            out.update(fallback_table(per_sample, proba, k, Fallback.load(p.run.fallback_json)))
            log.info(
                "held-out loss with the fallback: generalist alone %.4f, deployed routing "
                "%.4f (%.0f%% of test prompts to the generalist)",
                out["test_loss_generalist"],
                out["test_loss_deployed"],
                100 * out["generalist_share"],
            )
        p.run.add_metrics(evaluation=out)
    log.info(
        "held-out loss: base model %.4f, warm-up %.4f, routed experts %.4f (oracle routing "
        "%.4f); router agrees with the gradient clusters on %.1f%% of test prompts",
        out["test_loss_base"],
        out["test_loss_warmup"],
        out["test_loss_routed"],
        out["test_loss_oracle"],
        100 * out["router_test_accuracy"],
    )
    return out


def fallback_table(
    per_sample: dict[str, np.ndarray], proba: np.ndarray, k: int, fallback: Fallback
) -> dict:
    """The generalist alone and the deployed routing (the router's expert, or the generalist
    where the calibrated confidence is below the threshold), per-sample losses given."""
    experts = np.stack([per_sample[expert_name(c)] for c in range(k)])
    routed, _, back = fallback.route(proba)
    general = per_sample[GENERALIST]
    deployed = np.where(back, general, experts[routed, np.arange(len(routed))])
    return {
        "test_loss_generalist": float(general.mean()),
        "test_loss_deployed": float(deployed.mean()),
        "generalist_share": float(back.mean()),
        "fallback_rule": fallback.rule,
    }


def heldout_table(
    per_sample: dict[str, np.ndarray], routed: np.ndarray, oracle: np.ndarray, k: int
) -> dict:
    """Losses per adapter and routing (router vs gradient assignment), and the expert x
    cluster loss matrix, from per-sample losses of the warm-up, every expert and (when given)
    the base model."""
    rows = np.arange(len(oracle))
    experts = np.stack([per_sample[expert_name(c)] for c in range(k)])  # (k, n_test)
    warm = per_sample[WARMUP]

    def mean(values, mask):
        return float(values[mask].mean()) if mask.any() else None

    matrix = [[mean(experts[e], oracle == c) for c in range(k)] for e in range(k)]
    return {
        "n_test": len(oracle),
        "test_loss_base": float(per_sample[BASE].mean()) if BASE in per_sample else None,
        "test_loss_warmup": float(warm.mean()),
        "test_loss_routed": float(experts[routed, rows].mean()),
        "test_loss_oracle": float(experts[oracle, rows].mean()),
        "router_test_accuracy": float((routed == oracle).mean()),
        "expert_vs_cluster_loss": matrix,
        "own_cluster": [
            {
                "cluster": c,
                "n": int((oracle == c).sum()),
                "expert": matrix[c][c],
                "warmup": mean(warm, oracle == c),
            }
            for c in range(k)
        ],
    }
