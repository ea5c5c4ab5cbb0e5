"""What the Ray executors of Stage II (``executors.run_stage2_ray`` and the ``collective``
transport's loop) share to launch it: the clusterer built from the config, the gradient
workers' number, resources, configuration and placement (``WorkerSetup``, whose
``actor_options`` a ``group.WorkerGroup`` starts them with), and the centroid actor's place on
the driver's node."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gs_ray import faults
from gs_ray.config import Config, config_from_dict
from gs_ray.core.clustering import GradientSpaceClustering
from gs_ray.stage2.transports import TRANSPORTS


def make_clusterer(cfg: Config) -> GradientSpaceClustering:
    """The clusterer with the configured hyper-parameters and the transport's cache kind."""
    c = cfg.clustering
    return GradientSpaceClustering(
        n_clusters=c.n_clusters,
        k_range=(c.k_min, c.k_max),
        variance_thresholds=tuple(c.variance_thresholds),
        alpha=c.alpha,
        beta=c.beta,
        batch_size=c.batch_size,
        max_epochs=c.max_epochs,
        tol=c.tol,
        n_init=c.kmeans_n_init,
        random_state=cfg.run.seed,
        cache=TRANSPORTS[cfg.stage2.transport].cache,
        min_cluster_size=c.min_cluster_size,
        min_cluster_share=c.min_cluster_share,
        min_silhouette=c.min_silhouette,
        null_draws=c.null_draws,
        null_margin=c.null_margin,
    )


def resolve_num_workers(cfg: Config) -> tuple[int, dict[str, float]]:
    """(number of gradient workers, Ray resources per worker) from config and cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    # model.device cuda asks for GPUs even when none is up yet: an autoscaler adds GPU nodes
    # for the waiting workers (counting only present GPUs would plan CPU workers on the head).
    if (gpus and cfg.model.device != "cpu") or cfg.model.device.startswith("cuda"):
        n = cfg.stage2.num_workers or gpus or 1
        return n, {"num_gpus": 1, "num_cpus": 1}
    per = cfg.stage2.cpus_per_worker
    n = cfg.stage2.num_workers or max(1, int(resources.get("CPU", 1) // per))
    return n, {"num_cpus": per}


@dataclass
class WorkerSetup:
    """What every Ray executor needs to start its gradient workers: how many, their resources
    and config (torch threads = their CPUs), fault injection and the runtime environment."""

    n_workers: int
    resources: dict[str, float]
    fault_spec: str
    driver_faults: Any
    marker_dir: str
    cfg: Config
    env: dict[str, Any]
    placement: dict[str, Any]  # extra actor options: the custom resource, the soft node label

    @classmethod
    def resolve(cls, cfg: Config, checkpoint_dir: str | Path) -> WorkerSetup:
        n_workers, resources = resolve_num_workers(cfg)
        fault_spec = os.environ.get(faults.ENV, "")
        wcfg = config_from_dict(cfg.to_dict())
        wcfg.gradients.torch_threads = cfg.gradients.torch_threads or max(
            1, int(resources.get("num_cpus", 1))
        )
        forwarded = ("HF_HUB_OFFLINE", "HF_HOME")
        env = {"env_vars": {k: v for k, v in os.environ.items() if k in forwarded}}
        return cls(
            n_workers,
            resources,
            fault_spec,
            faults.parse(fault_spec),
            str(Path(checkpoint_dir).parent / "faults"),
            wcfg,
            env,
            worker_placement(cfg),
        )

    def actor_options(self, **restarts: Any) -> dict[str, Any]:
        """Ray actor options of a gradient worker (a ``WorkerGroup``'s ``options``): its
        resources, runtime environment and placement, plus ``restarts`` (``max_restarts``,
        ``max_task_retries``: each executor's own fault policy)."""
        return {**restarts, "runtime_env": self.env, **self.resources, **self.placement}


def worker_placement(cfg: Config) -> dict[str, Any]:
    """Actor options that place gradient workers: one unit of ``stage2.worker_resource`` (hard:
    an autoscaler adds a node that has it) and a soft preference for nodes labelled
    ``stage2.prefer_node_label`` (a worker restarted after its node was lost goes elsewhere)."""
    s2, out = cfg.stage2, {}
    if s2.worker_resource:
        out["resources"] = {s2.worker_resource: 1}
    if s2.prefer_node_label:
        from ray.util.scheduling_strategies import In, NodeLabelSchedulingStrategy

        key, value = s2.prefer_node_label.split("=", 1)
        out["scheduling_strategy"] = NodeLabelSchedulingStrategy(hard={}, soft={key: In(value)})
    return out


def driver_node_affinity():
    """Hard affinity to the driver's node: where the centroid actor lives, so that losing a
    worker node costs only gradient workers. Hard, because Ray placed zero-CPU actors with a
    soft affinity on other nodes (3 of 4 on a two-node cluster); the driver dies with its own
    node anyway."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
