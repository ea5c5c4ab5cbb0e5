"""The two executors of Stage II, which walk the same ``Stage2Plan``.

* ``run_stage2_local`` - one process, exact transport: the reference pipeline and the oracle.
* ``run_stage2_ray`` - gradient workers as Ray actors (one per GPU, else one per CPU), one
  centroid actor hosting a ``CentroidHost``, batches sent by the configured transport
  (``gs_ray.stage2.transports``). The loop here only orders, bounds and checkpoints; the
  workers are one ``WorkerGroup`` (``gs_ray.stage2.group``) with the centroid actor attached,
  and every pass ends in ``PhaseEnd`` (``gs_ray.stage2.phase_end``), as in the other executors.

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
from collections import deque
from collections.abc import Sequence
from pathlib import Path

from gs_ray import faults
from gs_ray.config import Config
from gs_ray.data import Sample
from gs_ray.progress import Progress
from gs_ray.stage2.computer import GradientComputer
from gs_ray.stage2.consumers import GradientConsumer
from gs_ray.stage2.group import WorkerGroup
from gs_ray.stage2.host import CentroidHost
from gs_ray.stage2.launch import WorkerSetup, driver_node_affinity, make_clusterer
from gs_ray.stage2.phase_end import PhaseEnd
from gs_ray.stage2.plan import ONLINE, Stage2Plan, order_key, phase_label
from gs_ray.stage2.result import Stage2Result
from gs_ray.stage2.rows import RowStore, announce, part_of, rows_to_compute
from gs_ray.stage2.transports import TRANSPORTS, make_transport
from gs_ray.stage2.worker import worker_actor_class

log = logging.getLogger(__name__)


def run_stage2_local(
    plan: Stage2Plan, samples: Sequence[Sample], computer: GradientComputer, host: CentroidHost
) -> Stage2Result:
    """The reference Stage II loop in one process (exact transport): the oracle. The host's
    consumers read the same batches (``CentroidHost(..., consumers=[...])``)."""
    if len(host.consumers):
        host.set_layout(computer.layout())
    end = PhaseEnd(host.initialize, host.end_epoch)  # no checkpoints, no pass records
    said = False
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and host.finished_online:
            continue
        bar = Progress(phase_label(phase, epoch), total=sum(len(b) for b in batches))
        held, decision = host.kept_rows()  # rows kept from an earlier pass (stage2/rows.py)
        said = announce(decision, said)
        for t, idx in enumerate(batches):
            if not host.is_applied(phase, epoch, t):
                ids, pairs = [samples[i].id for i in idx], [samples[i].pair for i in idx]
                todo = rows_to_compute(idx, held)
                if todo is None:
                    host.apply(phase, epoch, t, idx, computer.batch(pairs, ids))
                else:
                    part = computer.batch(*part_of(todo, pairs, ids)) if len(todo) else None
                    host.apply_reusing(phase, epoch, t, idx, ids, part)
            bar.update(len(idx))
        end(phase, epoch, batches, bar.close())
    res = host.result(
        {
            "executor": "local",
            "engine_calls": computer.calls,
            "rows_kept_bytes": host.status()["rows_kept_bytes"],
        }
    )
    res.layout = computer.layout()
    return res


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
    if consumers and not TRANSPORTS[s2.transport].whole_gradients:
        raise ValueError(
            f"gradient consumers need stage2.transport: gradients (the {s2.transport} transport "
            "never sends whole gradients to the centroid actor)"
        )
    if s2.transport == "collective":  # replicated state: the group runs its own loop
        from gs_ray.stage2.collective import run_stage2_collective

        return run_stage2_collective(
            plan, samples, cfg, base_path, adapter_path, pad_id, checkpoint_dir, resume=resume
        )
    transport = make_transport(s2.transport)
    ws = WorkerSetup.resolve(cfg, checkpoint_dir)
    n_workers, marker_dir = ws.n_workers, ws.marker_dir
    # the actors go in every case (the group's exit): a failed pass must not hold the CPUs
    with WorkerGroup(
        worker_actor_class(),
        n_workers,
        base_path,
        ws.cfg,
        str(adapter_path),
        pad_id,
        ws.fault_spec,
        marker_dir,
        options=ws.actor_options(max_restarts=-1, max_task_retries=-1),
    ) as workers:
        host = workers.attach(
            ray.remote(CentroidHost)
            .options(num_cpus=0, scheduling_strategy=driver_node_affinity())
            .remote(
                make_clusterer(cfg),
                len(samples),
                list(consumers),
                s2.checkpoint_max_share,
                RowStore.of_plan(plan, len(samples), s2.keep_rows_mb)
                if transport.whole_gradients
                else None,
            )
        )
        transport.bind(workers.workers)
        layout = ray.get(workers[0].layout.remote())
        if consumers:
            ray.get(host.set_layout.remote(layout))
        resumed_from = None
        if resume and ray.get(host.load_checkpoint.remote(str(checkpoint_dir))):
            resumed_from = tuple(ray.get(host.status.remote())["position"])
            log.info(
                "stage2: resumed the centroid actor at %s from %s", resumed_from, checkpoint_dir
            )
        end = PhaseEnd.of_actor(host, checkpoint_dir)
        status = end.status()
        said = False  # what the host's row store decided (stage2/rows.py), said once
        limit = n_workers * max(1, s2.max_in_flight)
        log.info(
            "stage2 on Ray: %d workers %s, transport %s, at most %d batches in flight",
            n_workers,
            ws.resources,
            transport.name,
            limit,
        )

        for phase, epoch, batches in plan.phases():
            if phase == ONLINE and status["finished_online"]:
                continue
            end.begin(status)
            bar = Progress(phase_label(phase, epoch), total=sum(len(b) for b in batches))
            window: deque = deque()
            applied_here = 0
            transport.start_phase(phase, host)
            held, decision = ray.get(host.kept_rows.remote())
            said = announce(decision, said)
            for t, idx in enumerate(batches):
                key = (phase, epoch, t)
                if order_key(*key) <= order_key(*status["position"]):
                    bar.update(len(idx))
                    continue
                step = plan.online_step(epoch, t) if phase == ONLINE else -1
                ids = [samples[i].id for i in idx]
                pairs = [samples[i].pair for i in idx]
                rank = workers.rank_of_batch(t)
                todo = rows_to_compute(idx, held)
                if todo is None:
                    done = transport.submit(key, step, idx, ids, pairs, rank, host)
                else:  # rows kept by the host: only the others are computed
                    part = (
                        workers[rank].gradients.remote(key, *part_of(todo, pairs, ids))
                        if len(todo)
                        else None
                    )
                    done = host.apply_reusing.remote(*key, idx, ids, part)
                window.append((done, len(idx)))
                applied_here += 1
                if s2.checkpoint_every and applied_here % s2.checkpoint_every == 0:
                    window.append((host.save_checkpoint.remote(str(checkpoint_dir), True), 0))
                faults.maybe_die(ws.driver_faults, "driver", phase, epoch, t, marker_dir)
                while len(window) > limit:  # backpressure
                    _drain_one(window, bar)
            while window:
                _drain_one(window, bar)
            status = end(phase, epoch, batches, bar.close())
        worker_stats = workers.gather("stats")
        info = {
            "executor": "ray",
            "workers": n_workers,
            "transport": transport.name,
            "passes": end.passes,
            "resumed_from": resumed_from,
            "bytes_in": status["bytes_in"],
            "rows_kept_bytes": status["rows_kept_bytes"],
            "worker_busy_seconds": [w["busy_seconds"] for w in worker_stats],
            "recomputed_batches": sum(w["recomputed"] for w in worker_stats),
            "engine_calls": sum(w["engine_calls"] for w in worker_stats),
            "worker_nice": [w["nice"] for w in worker_stats],
            "worker_policy": [w["policy"] for w in worker_stats],
            "centroid_nice": status["nice"],
        }
        result: Stage2Result = ray.get(host.result.remote(info))
        result.layout = layout
        return result


def _drain_one(window: deque, bar: Progress) -> None:
    import ray

    ref, n = window.popleft()
    ray.get(ref)
    bar.update(n)
