"""Held-out evaluation of a run: every expert and the warm-up adapter on the test split."""

from __future__ import annotations

import logging

import numpy as np

from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources, use_assigned_cpus
from gs_ray.rundir import WARMUP, expert_name

log = logging.getLogger(__name__)

BASE = "base"  # the base model with no adapter, in the per-sample losses


def _evaluate_task(base_path, model_cfg, adapters, pairs, pad_id, router_folder, prompts):
    from gs_ray.routing.router import load_router
    from gs_ray.training.loop import adapter_losses

    use_assigned_cpus()
    losses = adapter_losses(base_path, model_cfg, adapters, pairs, pad_id, base_key=BASE)
    router = load_router(router_folder)
    return losses, router.predict(prompts), router.route_latency_ms(prompts[:20])


def evaluate(p: Prepared, resume: bool = False) -> dict:
    """Held-out (test split) losses: every expert and the warm-up adapter on every cluster's
    test samples; routed by the router and by the gradient assignment (oracle). Samples left
    out of clustering are left out here too."""
    import ray

    labels, k = p.assignments()
    with p.run.stage("evaluate"):
        test = p.splits.test
        test = test[labels[test] >= 0]
        adapters = {WARMUP: str(p.run.warmup_adapter)}
        adapters.update({expert_name(c): str(p.run.expert(c)) for c in range(k)})
        task = ray.remote(_evaluate_task).options(**task_resources())
        per_sample, routed, latency = ray.get(task.remote(
            p.base_path, p.cfg.model, adapters, p.pairs(test), p.pad_id, str(p.run.router),
            [p.samples[i].prompt for i in test],
        ))  # fmt: skip
        out = heldout_table(per_sample, routed, labels[test], k)
        out["router_latency_ms"] = latency
        p.run.add_metrics(evaluation=out)
    log.info("held-out loss: base model %.4f, warm-up %.4f, routed experts %.4f (oracle routing "
             "%.4f); router agrees with the gradient clusters on %.1f%% of test prompts",
             out["test_loss_base"], out["test_loss_warmup"], out["test_loss_routed"], out["test_loss_oracle"],
             100 * out["router_test_accuracy"])  # fmt: skip
    return out


def heldout_table(per_sample: dict[str, np.ndarray], routed: np.ndarray, oracle: np.ndarray,
                  k: int) -> dict:  # fmt: skip
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
        ],  # fmt: skip
    }
