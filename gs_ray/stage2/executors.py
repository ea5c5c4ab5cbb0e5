"""The two executors of Stage II, which walk the same ``Stage2Plan``.

* ``run_stage2_local`` - one process, exact transport: the reference pipeline and the oracle.
* ``run_stage2_ray`` - gradient workers as Ray actors (one per GPU, else one per CPU), one
  centroid actor hosting a ``CentroidHost``, batches sent by the configured transport
  (``gs_ray.stage2.transports``). The loop here only orders, bounds and checkpoints.

Why hand-made actors and not Ray Data ``map_batches``: the consumer is one stateful actor that
must see batches in the plan's global order; Ray already executes one caller's actor tasks in
submission order, so the driver submits each worker result straight into the centroid actor
(worker -> object store -> actor, never through the driver), bounds the number of batches in
flight (backpressure), and relies on Ray's actor restarts and task retries for failed workers.
The ``partial_sums`` transport also needs per-batch centroid versions passed to the workers,
which a map_batches UDF cannot express cleanly.

Other consumers of the gradient stream (``gs_ray.stage2.consumers``) ride in the same host, so
one gradient computation serves all of them: in this process for the local executor, inside the
centroid actor for the Ray executor (exact transport only: the other transports never move whole
gradients to the host).
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gs_ray.config import Config
from gs_ray.core.clustering import GradientSpaceClustering
from gs_ray.data import Sample
from gs_ray.progress import Progress
from gs_ray.stage2 import faults
from gs_ray.stage2.computer import GradientComputer
from gs_ray.stage2.consumers import GradientConsumer
from gs_ray.stage2.host import CentroidHost
from gs_ray.stage2.plan import ONLINE, VAL, Stage2Plan, order_key, phase_label
from gs_ray.stage2.result import Stage2Result
from gs_ray.stage2.transports import TRANSPORTS, make_transport
from gs_ray.stage2.worker import worker_actor_class

log = logging.getLogger(__name__)


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
    )


def run_stage2_local(
    plan: Stage2Plan, samples: Sequence[Sample], computer: GradientComputer, host: CentroidHost
) -> Stage2Result:
    """The reference Stage II loop in one process (exact transport): the oracle. The host's
    consumers read the same batches (``CentroidHost(..., consumers=[...])``)."""
    if len(host.consumers):
        host.set_layout(computer.layout())
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and host.finished_online:
            continue
        bar = Progress(phase_label(phase, epoch), total=sum(len(b) for b in batches))
        for t, idx in enumerate(batches):
            if not host.is_applied(phase, epoch, t):
                batch = computer.batch([samples[i].pair for i in idx], [samples[i].id for i in idx])
                host.apply(phase, epoch, t, idx, batch)
            bar.update(len(idx))
        bar.close()
        if phase == VAL:
            info = host.initialize()
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            log_epoch(host.end_epoch(epoch))
    res = host.result({"executor": "local", "engine_calls": computer.calls})
    res.layout = computer.layout()
    return res


def log_epoch(end: dict) -> None:
    """One line per online epoch: how many samples changed cluster, and why it stops."""
    changed = end["changed_share"]
    log.info("online epoch %d: %s of samples changed cluster, centroid shift %.4f%s",
             end["epoch"] + 1, "?" if changed is None or changed != changed else f"{changed:.2%}",
             end["shift"], f"; online phase stops ({end['stop']})" if end["stop"] else "")  # fmt: skip


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
        wcfg = Config.from_dict(cfg.to_dict())
        wcfg.gradients.torch_threads = cfg.gradients.torch_threads or max(
            1, int(resources.get("num_cpus", 1))
        )
        forwarded = ("HF_HUB_OFFLINE", "HF_HOME")
        env = {"env_vars": {k: v for k, v in os.environ.items() if k in forwarded}}
        return cls(n_workers, resources, fault_spec, faults.parse(fault_spec),
                   str(Path(checkpoint_dir).parent / "faults"), wcfg, env,
                   worker_placement(cfg))  # fmt: skip


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


def run_stage2_ray(
    plan: Stage2Plan,
    samples: Sequence[Sample],
    cfg: Config,
    base_path: str,
    adapter_path: str,
    pad_id: int,
    checkpoint_dir: str | Path,
    resume: bool = False,
    consumers: Sequence[GradientConsumer] = (),
) -> Stage2Result:
    """Stage II on Ray: sharded gradient workers feeding one centroid actor.

    With ``resume`` the centroid actor restarts from ``checkpoint_dir`` and batches it has
    already applied are neither recomputed nor re-applied. ``info`` of the result holds the
    workers, the transport and, per pass, wall time, centroid busy time and bytes moved.
    ``consumers`` read the gradient stream inside the centroid actor (their final state comes
    back in ``result.consumers``); they need the exact transport (``gradients``).
    """
    import ray

    s2 = cfg.stage2
    if consumers and s2.transport != "gradients":
        raise ValueError(
            f"gradient consumers need stage2.transport: gradients (the {s2.transport} transport "
            "never sends whole gradients to the centroid actor)"
        )
    if s2.transport == "collective":  # replicated state: the group runs its own loop
        from gs_ray.stage2.collective import run_stage2_collective

        return run_stage2_collective(plan, samples, cfg, base_path, adapter_path, pad_id,
                                     checkpoint_dir, resume=resume)  # fmt: skip
    transport = make_transport(s2.transport)
    ws = WorkerSetup.resolve(cfg, checkpoint_dir)
    n_workers, resources, fault_spec, driver_faults, marker_dir, wcfg, env = (
        ws.n_workers,
        ws.resources,
        ws.fault_spec,
        ws.driver_faults,
        ws.marker_dir,
        ws.cfg,
        ws.env,
    )
    Worker = worker_actor_class().options(
        max_restarts=-1, max_task_retries=-1, runtime_env=env, **resources, **ws.placement
    )
    workers = [
        Worker.remote(base_path, wcfg, str(adapter_path), pad_id, fault_spec, marker_dir)
        for _ in range(n_workers)
    ]
    host = (
        ray.remote(CentroidHost)
        .options(num_cpus=0, scheduling_strategy=driver_node_affinity())
        .remote(make_clusterer(cfg), len(samples), transport.host_helper(workers), list(consumers))
    )
    layout = ray.get(workers[0].layout.remote())
    if consumers:
        ray.get(host.set_layout.remote(layout))
    resumed_from = None
    if resume and ray.get(host.load_checkpoint.remote(str(checkpoint_dir))):
        resumed_from = tuple(ray.get(host.status.remote())["position"])
        log.info("stage2: resumed the centroid actor at %s from %s", resumed_from, checkpoint_dir)
    status = ray.get(host.status.remote())
    limit = n_workers * max(1, s2.max_in_flight)
    log.info("stage2 on Ray: %d workers %s, transport %s, at most %d batches in flight",
             n_workers, resources, transport.name, limit)  # fmt: skip

    passes = []
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and status["finished_online"]:
            continue
        busy_before, bytes_before = status["busy_seconds"], status["bytes_in"]
        bar = Progress(phase_label(phase, epoch), total=sum(len(b) for b in batches))
        window: deque = deque()
        applied_here = 0
        transport.start_phase(phase, host)
        for t, idx in enumerate(batches):
            key = (phase, epoch, t)
            if order_key(*key) <= order_key(*status["position"]):
                bar.update(len(idx))
                continue
            step = plan.online_step(epoch, t) if phase == ONLINE else -1
            ids = [samples[i].id for i in idx]
            pairs = [samples[i].pair for i in idx]
            done = transport.submit(key, step, idx, ids, pairs, workers[t % n_workers], host)
            window.append((done, len(idx)))
            applied_here += 1
            if s2.checkpoint_every and applied_here % s2.checkpoint_every == 0:
                window.append((host.save_checkpoint.remote(str(checkpoint_dir)), 0))
            faults.maybe_die(driver_faults, "driver", phase, epoch, t, marker_dir)
            while len(window) > limit:  # backpressure
                _drain_one(window, bar)
        while window:
            _drain_one(window, bar)
        elapsed = bar.close()
        if phase == VAL:
            info = ray.get(host.initialize.remote())
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            log_epoch(ray.get(host.end_epoch.remote(epoch)))
        ray.get(host.save_checkpoint.remote(str(checkpoint_dir)))
        status = ray.get(host.status.remote())
        passes.append({
            "phase": phase, "epoch": epoch, "seconds": round(elapsed, 3),
            "samples": sum(len(b) for b in batches),
            "centroid_busy_seconds": round(status["busy_seconds"] - busy_before, 4),
            "bytes_in": status["bytes_in"] - bytes_before,
        })  # fmt: skip
    worker_stats = ray.get([w.stats.remote() for w in workers])
    info = {
        "executor": "ray", "workers": n_workers, "transport": transport.name, "passes": passes,
        "resumed_from": resumed_from, "bytes_in": status["bytes_in"],
        "worker_busy_seconds": [w["busy_seconds"] for w in worker_stats],
        "recomputed_batches": sum(w["recomputed"] for w in worker_stats),
        "engine_calls": sum(w["engine_calls"] for w in worker_stats),
    }  # fmt: skip
    result: Stage2Result = ray.get(host.result.remote(info))
    result.layout = layout
    for actor in [*workers, host]:
        ray.kill(actor)
    return result


def _drain_one(window: deque, bar: Progress) -> None:
    import ray

    ref, n = window.popleft()
    ray.get(ref)
    bar.update(n)
