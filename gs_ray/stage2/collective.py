"""The ``collective`` transport: replicated centroid state, one all-reduce per online step.

Every gradient worker holds a replica of the online state: the centroids, the running cache sums
and the cluster caches as a ledger of (batch, row) entries (a ``CentroidHost`` whose clusterer has
the external cache), plus the unit gradients of its own rows of the batches still cached. Online
batch B_t is split into W contiguous shares, one per worker (rank order = row order). Each step
every worker

1. computes its share's gradients and assigns them against C_{t-1} (its replica's centroids);
2. all-gathers the labels, so every replica pushes the same rows, in the same order, into the
   same FIFO ledger and learns the same evictions;
3. sums, per cluster, its own entering rows minus its own evicted rows; one all-reduce of these
   (K, d) sums gives every replica the same update of the running sums, then the same EMA.

So with |B_t| = W * b the centroids and assignments equal the single-process run with batch size
W * b (up to the float64 summation order of the sums). The collective layer is
``torch.distributed`` with gloo: the replicas keep their state in NumPy on the host, also on GPU
nodes (moving the sums onto the GPU and the group onto NCCL is the next step, docs/scaling.md).
The centroid actor
(``CollectiveHost``) keeps coordination, the validation pass and initialisation (SVD +
silhouette), checkpoints (a replica's state, adopted every ``stage2.checkpoint_every`` steps) and
the final assignment merge.

Faults: the group (a ``WorkerGroup``, joined into one process group) is all-or-nothing. When a
worker dies (or a collective fails because a peer died), the driver ends the whole group (its
workers' stats read, then all killed), starts a new one and loads the centroid actor's last
checkpoint into every replica; live cached rows whose holder was restarted are recomputed when the
ledger evicts them. Steps replayed after the checkpoint are computed exactly as the first time, so
the result is identical.
"""

from __future__ import annotations

import logging
import socket
import time
from collections import deque
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray import faults
from gs_ray.config import Config, config_from_dict
from gs_ray.core.cosine import cluster_sums, cosine_assign, normalize_rows
from gs_ray.data import Sample
from gs_ray.local_ray import LOOPBACK, host_loopback_store, is_loopback
from gs_ray.progress import Progress
from gs_ray.rundir import SKIPPED
from gs_ray.stage2.batch import check_finite
from gs_ray.stage2.group import WorkerGroup
from gs_ray.stage2.host import CentroidHost
from gs_ray.stage2.phase_end import PhaseEnd
from gs_ray.stage2.plan import FINAL, ONLINE, VAL, Stage2Plan, order_key, phase_label
from gs_ray.stage2.result import Stage2Result
from gs_ray.stage2.worker import GradientWorker

log = logging.getLogger(__name__)

MAX_GROUP_RESTARTS = 3  # a group that keeps failing is a bug, not a fault
COLLECTIVE_TIMEOUT_S = 300  # a collective waiting on a dead peer fails after this at the latest
_ZERO, _SKIP = -1, -2  # label codes in the all-gather: zero gradient, non-finite (skipped)


def shares(n: int, world: int) -> list[tuple[int, int]]:
    """[lo, hi) row range of each rank in a batch of n rows (contiguous, sizes differ by <= 1)."""
    edges = np.cumsum([0] + [len(a) for a in np.array_split(np.arange(n), world)])
    return [(int(edges[r]), int(edges[r + 1])) for r in range(world)]


# --------------------------------------------------------------------------- the collective layer


class TorchCollective:
    """The two collectives a step needs, over a ``torch.distributed`` process group."""

    def __init__(self) -> None:
        self.bytes = 0  # payload bytes this rank contributed

    def all_reduce_sum(self, x: np.ndarray) -> np.ndarray:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(x))
        dist.all_reduce(t)
        self.bytes += x.nbytes
        return t.numpy()

    def all_gather(self, x: np.ndarray) -> list[np.ndarray]:
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(x))
        out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(out, t)
        self.bytes += x.nbytes
        return [o.numpy() for o in out]


# --------------------------------------------------------------------------- the replica (pure)


class Replica:
    """One worker's copy of the online state and its own cached rows (no Ray, no model).

    ``gradients(epoch, t, lo, hi)`` returns (GradientBatch of rows lo:hi of online batch t of epoch
    ``epoch``); ``comm`` is a ``TorchCollective`` (or anything with the same two methods)."""

    def __init__(
        self,
        host: CentroidHost,
        plan: Stage2Plan,
        rank: int,
        world: int,
        comm,
        gradients,
        row_dtype: str = "float32",
    ):
        self.host, self.plan, self.rank, self.world, self.comm = host, plan, rank, world, comm
        self.gradients = gradients
        self.row_dtype = np.dtype(row_dtype) if row_dtype != "bfloat16" else "bfloat16"
        self.memo: dict[int, tuple[int, np.ndarray]] = {}  # step -> (lo, own unit rows)
        self.where = {
            plan.online_step(e, t): (e, t) for e, b in enumerate(plan.online) for t in range(len(b))
        }
        self.recomputed = 0
        self.seconds = {"compute": 0.0, "collective": 0.0, "update": 0.0}

    def _rows(self, step: int) -> tuple[int, np.ndarray]:
        """(lo, own unit rows) of a live step; recomputed if this replica was restarted."""
        if step not in self.memo:
            self.recomputed += 1
            epoch, t = self.where[step]
            lo, hi = shares(len(self.plan.online[epoch][t]), self.world)[self.rank]
            batch = self.gradients(epoch, t, lo, hi)
            self.memo[step] = (lo, self._store(normalize_rows(batch.G)[0]))
        return self.memo[step]

    def _store(self, Xn: np.ndarray) -> np.ndarray:
        if self.row_dtype == "bfloat16":
            import torch

            return torch.from_numpy(Xn).to(torch.bfloat16)
        return Xn.astype(self.row_dtype, copy=False)

    @staticmethod
    def _load(rows) -> np.ndarray:
        return rows.float().numpy() if hasattr(rows, "float") else np.asarray(rows, np.float32)

    def step(self, epoch: int, t: int) -> dict[str, float]:
        """Online batch t of epoch ``epoch``: compute, all-gather labels, all-reduce sums, update.
        A batch already applied (replay after a restart) is skipped."""
        host, c = self.host, self.host.clusterer
        if host.is_applied(ONLINE, epoch, t):
            return {}
        step = self.plan.online_step(epoch, t)
        idx = self.plan.online[epoch][t]
        parts = shares(len(idx), self.world)
        lo, hi = parts[self.rank]
        t0 = time.perf_counter()
        batch = self.gradients(epoch, t, lo, hi)
        Xn, norms = normalize_rows(batch.G)
        keep = (norms > 1e-12) & ~batch.skipped
        labels = cosine_assign(Xn, c.cluster_centers_)
        start_labels = cosine_assign(Xn, c.epoch_start_centers)  # for the convergence rule
        self.memo[step] = (lo, self._store(Xn))
        t1 = time.perf_counter()
        # (1) every replica learns every label: the ledgers stay identical
        width = max(b - a for a, b in parts)
        code = np.full((2, width), _ZERO, dtype=np.int64)
        code[0, : hi - lo] = np.where(batch.skipped, _SKIP, np.where(keep, labels, _ZERO))
        code[1, : hi - lo] = start_labels
        gathered = self.comm.all_gather(code)
        codes = np.concatenate([g[0, : b - a] for g, (a, b) in zip(gathered, parts)])
        starts = np.concatenate([g[1, : b - a] for g, (a, b) in zip(gathered, parts)])
        t2 = time.perf_counter()
        host._advance(ONLINE, epoch, t)
        host.skipped.update(int(i) for i in idx[codes == _SKIP])
        n_used = int((codes != _SKIP).sum())
        if n_used == 0:  # the reference skips an update with no usable row
            self.seconds["compute"] += t1 - t0
            return {"compute": t1 - t0, "collective": t2 - t1, "update": 0.0}
        evictions = c.push_ledger(step, np.maximum(codes, 0), codes >= 0, np.maximum(starts, 0))
        delta, _ = cluster_sums(Xn, labels, c.n_clusters_, keep)
        for old, entries in evictions.items():  # only this rank's rows: their holder sums them
            a, b = shares(self._size(old), self.world)[self.rank]
            mine = [(row - a, k) for row, k in entries if a <= row < b]
            if mine:
                rows = Xn if old == step else self._load(self._rows(old)[1])
                for row, k in mine:
                    delta[k] -= rows[row]
        t3 = time.perf_counter()
        total = self.comm.all_reduce_sum(delta)
        t4 = time.perf_counter()
        # the evicted sums are inside ``total``
        c.partial_fit_external(total, None, n_used, int((codes == _ZERO).sum()))
        oldest = c.oldest_live_step()
        for old in [s for s in self.memo if oldest is None or s < oldest]:
            del self.memo[old]
        t5 = time.perf_counter()
        out = {"compute": t1 - t0 + t3 - t2, "collective": t2 - t1 + t4 - t3, "update": t5 - t4}
        for key, v in out.items():
            self.seconds[key] += v
        return out

    def _size(self, step: int) -> int:
        epoch, t = self.where[step]
        return len(self.plan.online[epoch][t])


# --------------------------------------------------------------------------- the centroid actor


class CollectiveHost(CentroidHost):
    """The centroid actor of the collective transport: validation pass, initialisation,
    checkpoints of a replica's state, the final merge. It never sees an online gradient."""

    def replica_state(self) -> dict[str, Any]:
        """What a new replica starts from (no validation gradients: replicas do not need them)."""
        return {**self.state(), "val_grads": []}

    def adopt(self, state: dict[str, Any], folder: str | Path | None = None) -> tuple:
        """Take a replica's online state as the host's (a checkpoint); save it to ``folder``."""
        self.load_state({**state, "val_grads": self.val_grads, "labels": self.labels})
        if folder is not None:
            self.save_checkpoint(folder)
        return self.position


# --------------------------------------------------------------------------- the worker


class CollectiveWorker(GradientWorker):
    """A gradient worker that is also one rank of the collective group (one replica)."""

    def __init__(
        self,
        base_path: str,
        cfg: Config,
        adapter_path: str,
        pad_id: int,
        fault_spec: str,
        marker_dir: str,
        shared: tuple,
        n_samples: int,
        clusterer_factory,
    ):
        super().__init__(base_path, cfg, adapter_path, pad_id, fault_spec, marker_dir)
        self.plan, self.pairs, self.ids = shared  # the plan, every sample's pair and id
        self.n_samples = n_samples
        self.clusterer_factory = clusterer_factory
        self.row_dtype = cfg.stage2.row_dtype
        self.replica: Replica | None = None

    def address(self, world: int) -> tuple[str, int]:
        """Where rank 0 listens for the group's rendezvous (this node, a free port). On a
        loopback node (gs-ray's own local Ray) this process hosts the store itself, listening
        on 127.0.0.1 alone (torch's would listen on every interface)."""
        import ray

        ip = ray.util.get_node_ip_address()
        if is_loopback(ip):
            return LOOPBACK, host_loopback_store(world, COLLECTIVE_TIMEOUT_S)
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, ip: str, port: int, rank: int, world: int) -> int:
        """Join the process group (gloo; all ranks call this at once)."""
        import os

        import torch.distributed as dist

        if is_loopback(ip) and "GLOO_SOCKET_IFNAME" not in os.environ:
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: talk over loopback
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{ip}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        self.rank, self.world = rank, world
        return rank

    def load(self, state: dict[str, Any]) -> tuple:
        """Start this replica from the centroid actor's state (after init, or a checkpoint)."""
        host = CentroidHost(self.clusterer_factory(), self.n_samples)
        host.load_state(state)
        self.replica = Replica(
            host,
            self.plan,
            self.rank,
            self.world,
            TorchCollective(),
            self._share_gradients,
            self.row_dtype,
        )
        return host.position

    def _share_gradients(self, epoch: int, t: int, lo: int, hi: int):
        idx = self.plan.online[epoch][t][lo:hi]
        if t % self.world == self.rank:  # one rank per batch is the fault's target
            faults.maybe_die(self.faults, "worker", ONLINE, epoch, t, self.marker_dir)
        return check_finite(
            self.raw_gradients([self.pairs[i] for i in idx]),
            [self.ids[i] for i in idx],
            self.computer.nonfinite,
        )

    def step(self, epoch: int, t: int) -> dict[str, float]:
        return self.replica.step(epoch, t)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        return self.replica.host.end_epoch(epoch)

    def state(self) -> dict[str, Any]:
        return self.replica.host.state()

    def own_final_labels(self, key, pairs: list, ids: list[str]) -> np.ndarray:
        """Final pass: labels against this replica's (final) centroids; SKIPPED kept."""
        batch = self.batch_gradients(key, pairs, ids)
        labels = cosine_assign(normalize_rows(batch.G)[0], self.replica.host.centers())
        labels[batch.skipped] = SKIPPED
        return labels

    def collective_stats(self) -> dict[str, Any]:
        r = self.replica
        return {
            **self.stats(),
            "recomputed": r.recomputed if r else 0,
            "seconds": dict(r.seconds) if r else {},
            "collective_bytes": r.comm.bytes if r else 0,
        }


# --------------------------------------------------------------------------- the executor


def _join(group: WorkerGroup) -> None:
    """Make the group's workers one process group: rank 0 opens the rendezvous, all join."""
    import ray

    n = len(group)
    ip, port = ray.get(group[0].address.remote(n))
    ray.get([w.join.remote(ip, port, r, n) for r, w in enumerate(group)])


def run_stage2_collective(
    plan: Stage2Plan,
    samples: Sequence[Sample],
    cfg: Config,
    base_path: str,
    adapter_path: str,
    pad_id: int,
    checkpoint_dir: str | Path,
    resume: bool = False,
) -> Stage2Result:
    """Stage II with the collective transport (see the module docstring). ``info`` holds the
    group restarts and, per online pass, compute / collective / update seconds per step."""

    import ray

    from gs_ray.stage2.launch import WorkerSetup, driver_node_affinity, make_clusterer

    s2 = cfg.stage2
    ws = WorkerSetup.resolve(cfg, checkpoint_dir)
    n_workers = ws.n_workers
    shared = ray.put((plan, [s.pair for s in samples], [s.id for s in samples]))
    # worker_actor_class() marks GradientWorker's methods with its concurrency groups; the
    # subclass inherits the marks, so it declares the same groups (one thread each).
    Worker = ray.remote(concurrency_groups={"compute": 1, "io": 1})(CollectiveWorker)
    worker_args = (
        base_path,
        ws.cfg,
        adapter_path,
        pad_id,
        ws.fault_spec,
        ws.marker_dir,
        shared,
        len(samples),
        _ClustererFactory(cfg),
    )

    # The centroid actor holds the last checkpoint in memory: keep it on the driver's node. It
    # outlives the groups (a new group starts from its checkpoint) and goes when the run does.
    host = (
        ray.remote(CollectiveHost)
        .options(num_cpus=0, scheduling_strategy=driver_node_affinity())
        .remote(make_clusterer(cfg), len(samples))
    )
    try:
        resumed_from = None
        if resume and ray.get(host.load_checkpoint.remote(str(checkpoint_dir))):
            resumed_from = tuple(ray.get(host.status.remote())["position"])
            log.info(
                "stage2: resumed the centroid actor at %s from %s", resumed_from, checkpoint_dir
            )
        log.info("stage2 on Ray: %d workers %s, transport collective", n_workers, ws.resources)
        ckpt = str(checkpoint_dir)
        restarts, stats, passes, steps, restarted_from = 0, [], [], [], []
        while True:
            # every exit of the group reads its workers' stats and kills them all
            group = WorkerGroup(
                Worker,
                n_workers,
                *worker_args,
                options=ws.actor_options(max_restarts=0),
                stats="collective_stats",
            )
            try:
                with group:
                    _join(group)
                    _run_phases(plan, samples, s2, host, group, ckpt, ws, passes, steps)
                    layout = ray.get(group[0].layout.remote())
                stats += group.stats
                break
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
                stats += group.stats
                restarts += 1
                if restarts > MAX_GROUP_RESTARTS:
                    raise
                position = ray.get(host.status.remote())["position"]
                restarted_from.append(list(position))  # the checkpoint the new group starts from
                log.warning(
                    "stage2: collective group failed (%s); restart %d from %s",
                    type(err).__name__,
                    restarts,
                    position,
                )
        steps_arr = {
            k: [s[k] for s in steps if k in s] for k in ("compute", "collective", "update")
        }
        info = {
            "executor": "ray",
            "workers": n_workers,
            "transport": "collective",
            "passes": passes,
            "resumed_from": resumed_from,
            "group_restarts": restarts,
            "restarted_from": restarted_from,
            "bytes_in": ray.get(host.status.remote())["bytes_in"],
            "step_seconds": {
                k: round(float(np.mean(v)), 6) if v else 0.0 for k, v in steps_arr.items()
            },
            "collective_bytes_per_worker": max((s["collective_bytes"] for s in stats), default=0),
            "recomputed_batches": sum(s["recomputed"] for s in stats),
            "worker_busy_seconds": [s["busy_seconds"] for s in stats],
            "engine_calls": sum(s["engine_calls"] for s in stats),
        }
        result: Stage2Result = ray.get(host.result.remote(info))
        result.layout = layout
        return result
    finally:
        ray.kill(host)


class _ClustererFactory:
    """A picklable ``make_clusterer(cfg)`` for the replicas."""

    def __init__(self, cfg: Config):
        self.cfg = cfg.to_dict()

    def __call__(self):
        from gs_ray.stage2.launch import make_clusterer

        return make_clusterer(config_from_dict(self.cfg))


def _run_phases(plan, samples, s2, host, group, ckpt, ws, passes, steps):
    """Walk the plan from the centroid actor's position with one group (raises if it fails)."""
    import ray

    def adopt():  # a replica's state becomes the host's, and its checkpoint
        ray.get(host.adopt.remote(group[0].state.remote(), ckpt))

    end = PhaseEnd.of_actor(
        host,
        ckpt,
        end_epoch=lambda epoch: group.gather("end_epoch", epoch)[0],  # every replica closes it
        checkpoint=lambda phase: (
            adopt() if phase == ONLINE else ray.get(host.save_checkpoint.remote(ckpt))
        ),
        whole_pass_seconds=True,
        passes=passes,
    )
    W = len(group)
    status = end.status()
    limit = W * max(1, s2.max_in_flight)
    loaded = False
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and status["finished_online"]:
            continue
        bar = Progress(phase_label(phase, epoch), total=sum(len(b) for b in batches))
        window: deque = deque()
        end.begin(status)
        if phase != VAL and not loaded:  # every replica starts from the host's state
            group.gather("load", host.replica_state.remote())
            loaded = True
        done_here = 0
        for t, idx in enumerate(batches):
            key = (phase, epoch, t)
            if order_key(*key) <= order_key(*status["position"]):
                bar.update(len(idx))
                continue
            ids = [samples[i].id for i in idx]
            pairs = [samples[i].pair for i in idx]
            worker = group.for_batch(t)
            if phase == VAL:
                window.append(
                    (
                        host.apply.remote(*key, idx, worker.gradients.remote(key, pairs, ids)),
                        len(idx),
                    )
                )
            elif phase == FINAL:
                labels = worker.own_final_labels.remote(key, pairs, ids)
                window.append((host.apply_labels.remote(t, idx, labels), len(idx)))
            else:
                window.append((group.call_all("step", epoch, t), len(idx)))
                done_here += 1
                if s2.checkpoint_every and done_here % s2.checkpoint_every == 0:
                    while window:
                        _drain(window, bar, steps)
                    adopt()
            faults.maybe_die(ws.driver_faults, "driver", phase, epoch, t, ws.marker_dir)
            while len(window) > limit:
                _drain(window, bar, steps)
        while window:
            _drain(window, bar, steps)
        status = end(phase, epoch, batches, bar.close())


def _drain(window: deque, bar: Progress, steps: list) -> None:
    import ray

    refs, n = window.popleft()
    out = ray.get(refs)
    if isinstance(refs, list):  # an online step: keep the slowest rank's split
        done = [o for o in out if o]
        if done:
            steps.append({k: max(o[k] for o in done) for k in done[0]})
    bar.update(n)
