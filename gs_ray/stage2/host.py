"""Stage II: per-sample gradients streamed into the GradientSpace clusterer.

The pieces, each usable without Ray:

* ``Stage2Plan`` - which samples form which batch, in which order: the validation batches, the
  batches B_t of every online epoch (a seeded, length-bucketed shuffle per epoch) and the final
  assignment batches. Every executor follows the same plan, so results do not depend on it.
* ``GradientComputer`` - loads the base model and the warm-up adapter once and turns a batch of
  samples into a (b, d) gradient matrix (in length-sorted micro-batches).
* ``CentroidHost`` - holds the clusterer and applies batches strictly in plan order: collect
  validation gradients, initialise, online updates, end of epoch, final assignment. It knows its
  position, checkpoints itself and resumes from a checkpoint.
* ``GradientWorker`` - a GradientComputer plus the worker side of the ``partial_sums`` transport.

Two executors drive them: ``run_stage2_local`` (one process, the reference pipeline and oracle)
and ``run_stage2_ray``: gradient workers as Ray actors (one per GPU, else one per CPU), one
centroid actor hosting a CentroidHost. The actors are a line each (``ray.remote(...)`` around
these classes). Why hand-made actors and not Ray Data ``map_batches``: the consumer is one
stateful actor that must see batches in the plan's global order; Ray already executes one
caller's actor tasks in submission order, so the driver submits each worker result straight into
the centroid actor (worker -> object store -> actor, never through the driver), bounds the number
of batches in flight (backpressure), and relies on Ray's actor restarts and task retries for
failed workers. The ``partial_sums`` transport also needs per-batch centroid versions passed to
the workers, which a map_batches UDF cannot express cleanly.

Transports (``stage2.transport``):

* ``gradients`` (exact, default): workers send every per-sample gradient; the centroid actor
  assigns with the centroids after batch t-1 and keeps the paper's per-sample FIFO caches.
* ``partial_sums``: each worker keeps its batch's unit gradients, receives the centroids after
  batch t-1 and assigns the batch itself, then sends one sum and count per cluster. The centroid
  actor keeps the cluster caches as a ledger of (batch, row) entries and running sums; for what
  the ledger evicts it asks the worker that holds those rows for their sum (a restarted worker
  recomputes them). Same centroids and assignments as ``gradients`` up to rounding, while the
  actor holds K * d sums instead of K * alpha * |B| * d cached gradients and does K * d work per
  batch instead of |B| * K * d (docs/scaling.md).
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gs_ray import faults
from gs_ray.clustering import GradientSpaceClustering, cluster_sums, cosine_assign, normalize_rows
from gs_ray.config import Config
from gs_ray.data import Sample, Splits, length_bucketed_batches
from gs_ray.gradients import LoRAGradientEngine, RandomProjection, compute_bucketed
from gs_ray.models import load_adapter, load_base_model, resolve_device
from gs_ray.progress import Progress
from gs_ray.rundir import atomic_write_text

log = logging.getLogger(__name__)

VAL, ONLINE, FINAL = "val", "online", "final"
_ORDER = {VAL: 0, ONLINE: 1, FINAL: 2}


@dataclass
class Stage2Plan:
    """The batches of Stage II in their global order (index arrays into the sample list)."""

    val: list[np.ndarray]
    online: list[list[np.ndarray]]  # one list of batches B_t per possible epoch
    final: list[np.ndarray]

    @classmethod
    def build(cls, lengths: np.ndarray, splits: Splits, cfg: Config) -> Stage2Plan:
        c, g, seed = cfg.clustering, cfg.gradients, cfg.run.seed
        val = [splits.val[i : i + c.batch_size] for i in range(0, len(splits.val), c.batch_size)]
        online = [
            length_bucketed_batches(
                lengths, splits.train, c.batch_size, g.bucket_window, seed + 101 * (e + 1)
            )
            for e in range(c.max_epochs)
        ]
        everything = np.sort(np.concatenate([splits.train, splits.test]))
        final = length_bucketed_batches(
            lengths, everything, c.batch_size, g.bucket_window, seed + 7
        )
        return cls(val=val, online=online, final=final)

    def phases(self) -> list[tuple[str, int, list[np.ndarray]]]:
        """(phase, epoch, batches) in execution order (the host may stop epochs early)."""
        out = [(VAL, 0, self.val)]
        out += [(ONLINE, e, b) for e, b in enumerate(self.online)]
        out.append((FINAL, 0, self.final))
        return out

    def online_step(self, epoch: int, t: int) -> int:
        """Global index of online batch t of epoch ``epoch`` (counts across epochs)."""
        return sum(len(b) for b in self.online[:epoch]) + t


class GradientComputer:
    """Base model + warm-up adapter, loaded once; turns samples into per-sample gradients."""

    def __init__(
        self,
        base_path: str,
        cfg: Config,
        adapter_path: str | Path,
        pad_id: int,
        device: torch.device | None = None,
    ):
        if cfg.gradients.torch_threads:
            torch.set_num_threads(cfg.gradients.torch_threads)
        self.device = device or resolve_device(cfg.model.device)
        base = load_base_model(base_path, cfg.model, self.device)
        self.model = load_adapter(base, adapter_path, trainable=True)
        self.engine = LoRAGradientEngine(self.model)
        self.pad_id = pad_id
        self.micro = cfg.gradients.batch_size
        k = cfg.gradients.projection_dim
        self.project = RandomProjection(self.engine.dim, k, seed=cfg.run.seed) if k else None
        self.dim = k or self.engine.dim

    def __call__(self, pairs: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        G = compute_bucketed(self.engine, pairs, self.pad_id, self.micro)
        return (self.project(G) if self.project else G).numpy()

    def layout(self) -> dict[str, Any]:
        """The gradient layout: parameter names, shapes and offsets (for the run directory)."""
        e = self.engine
        return {
            "param_names": e.param_names,
            "shapes": [list(s) for s in e.shapes],
            "offsets": e.offsets.tolist(),
            "dim": e.dim,
            "projection_dim": self.project.k if self.project else None,
        }


def assign_and_sum(Xn: np.ndarray, keep: np.ndarray, centers: np.ndarray) -> dict[str, Any]:
    """Worker side of ``partial_sums``: labels of unit gradients against ``centers``, and the
    per-cluster sums and counts of the kept (non-zero) rows."""
    labels = cosine_assign(Xn, centers)
    sums, counts = cluster_sums(Xn, labels, len(centers), keep)
    return {"labels": labels, "keep": keep, "sums": sums, "counts": counts,
            "n_zero": int((~keep).sum())}  # fmt: skip


def make_clusterer(cfg: Config) -> GradientSpaceClustering:
    """The clusterer with the configured hyper-parameters (chunk cache for partial sums)."""
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
        cache="external" if cfg.stage2.transport == "partial_sums" else "samples",
    )


class CentroidHost:
    """The clusterer plus its position in the plan; what the centroid actor hosts.

    Batches must arrive in plan order (phase, epoch, t). A batch at or before the position is a
    replay (after a restart) and is skipped; a batch that leaves a gap is an error.
    """

    def __init__(self, clusterer: GradientSpaceClustering, n_samples: int):
        self.clusterer = clusterer
        self.labels = np.full(n_samples, -1, dtype=np.int64)
        self.val_grads: list[np.ndarray] = []
        self.position: tuple[str, int, int] = (VAL, 0, -1)  # last applied batch
        self.done_epochs = 0
        self.finished_online = False
        self.busy_seconds = 0.0
        self.bytes_in = 0
        # partial sums: who holds each live batch's rows, and its samples (to recompute them)
        self.owners: dict[int, Any] = {}
        self.batch_pairs: dict[int, list] = {}
        self.workers: list = []

    # ------------------------------------------------------------------ order

    @staticmethod
    def _key(phase: str, epoch: int, t: int) -> tuple[int, int, int]:
        return (_ORDER[phase], epoch, t)

    def is_applied(self, phase: str, epoch: int, t: int) -> bool:
        return self._key(phase, epoch, t) <= self._key(*self.position)

    def _advance(self, phase: str, epoch: int, t: int) -> bool:
        if self.is_applied(phase, epoch, t):
            return False
        same = self.position[0] == phase and self.position[1] == epoch
        if (same and t != self.position[2] + 1) or (not same and t != 0):
            raise RuntimeError(f"batch {(phase, epoch, t)} arrived after {self.position}: a gap")
        self.position = (phase, epoch, t)
        return True

    def apply(self, phase: str, epoch: int, t: int, idx: np.ndarray, G: np.ndarray) -> bool:
        """Apply one batch of gradients; False if it was already applied (replay)."""
        if not self._advance(phase, epoch, t):
            return False
        start = time.perf_counter()
        self.bytes_in += G.nbytes
        if phase == VAL:
            self.val_grads.append(np.asarray(G, dtype=np.float32))
        elif phase == ONLINE:
            self.clusterer.partial_fit(G)
        else:
            self.labels[idx] = self.clusterer.predict(G)
        self.busy_seconds += time.perf_counter() - start
        return True

    # ------------------------------------------------------------------ partial sums

    def set_workers(self, workers: list) -> None:
        """Workers to ask for evicted rows whose owner is unknown (after a resume)."""
        self.workers = list(workers)

    def online_state(self) -> dict[str, Any]:
        """What a worker needs to assign the next batch: the centroids and the oldest batch
        still cached (older rows can be dropped)."""
        return {"centers": self.clusterer.cluster_centers_.copy(),
                "oldest_live": self.clusterer.oldest_live_step()}  # fmt: skip

    def apply_sums(self, t: int, epoch: int, step: int, out: dict, pairs: list, owner) -> dict:
        """Apply a worker's ``reduce`` result for online batch t (global step ``step``): enter it
        in the ledger, fetch the sums of the evicted rows from their owners, update the
        centroids. Returns ``online_state()`` for the next batch."""
        import ray

        if self._advance(ONLINE, epoch, t):
            start = time.perf_counter()
            c = self.clusterer
            evictions = c.push_ledger(step, out["labels"], out["keep"])
            refs = []
            for old, entries in sorted(evictions.items()):
                holder = self.owners.get(old) or self.workers[old % len(self.workers)]
                refs.append(
                    holder.evict_sums.remote(old, entries, self.batch_pairs[old], c.n_clusters_)
                )
            evicted = np.zeros_like(c._cache_sum)
            for part in ray.get(refs):
                evicted += part
            c.partial_fit_external(out["sums"], evicted, len(pairs), out["n_zero"])
            self.owners[step], self.batch_pairs[step] = owner, pairs
            oldest = c.oldest_live_step()
            for old in [s for s in self.batch_pairs if oldest is None or s < oldest]:
                self.batch_pairs.pop(old, None)
                self.owners.pop(old, None)
            self.bytes_in += out["sums"].nbytes + evicted.nbytes + out["labels"].nbytes
            self.busy_seconds += time.perf_counter() - start
        return self.online_state()

    def apply_labels(self, t: int, idx: np.ndarray, labels: np.ndarray) -> bool:
        """Final-pass labels assigned by a worker against the final centroids."""
        if not self._advance(FINAL, 0, t):
            return False
        self.labels[idx] = labels
        self.bytes_in += labels.nbytes
        return True

    # ------------------------------------------------------------------ phase ends

    def initialize(self) -> dict[str, Any]:
        """SVD + silhouette on the collected validation gradients (once)."""
        start = time.perf_counter()
        if not hasattr(self.clusterer, "cluster_centers_"):
            self.clusterer.initialize(np.concatenate(self.val_grads))
        self.busy_seconds += time.perf_counter() - start
        return {"k": self.clusterer.n_clusters_, "silhouette": self.clusterer.silhouette_}

    def end_epoch(self, epoch: int) -> bool:
        """Close online epoch ``epoch`` (idempotent on replay); True when converged."""
        if epoch < self.done_epochs:
            return self.clusterer.converged_
        converged = self.clusterer.end_epoch()
        self.done_epochs = epoch + 1
        self.finished_online = converged or self.done_epochs >= self.clusterer.max_epochs
        log.info(
            "online epoch %d: centroid shift %.5f", epoch + 1, self.clusterer.shift_history_[-1]
        )
        return converged

    def centers(self) -> np.ndarray:
        return self.clusterer.cluster_centers_

    def status(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "finished_online": self.finished_online,
            "done_epochs": self.done_epochs,
            "initialized": hasattr(self.clusterer, "cluster_centers_"),
            "busy_seconds": self.busy_seconds,
            "bytes_in": self.bytes_in,
        }

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "clusterer": self.clusterer.state_dict(),
            "labels": self.labels.copy(),
            "val_grads": [g.copy() for g in self.val_grads],
            "position": self.position,
            "done_epochs": self.done_epochs,
            "finished_online": self.finished_online,
            "batch_pairs": dict(self.batch_pairs),  # owners are actor handles: not kept
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.clusterer.load_state_dict(state["clusterer"])
        self.labels = state["labels"].copy()
        self.val_grads = list(state["val_grads"])
        self.position = tuple(state["position"])
        self.done_epochs = state["done_epochs"]
        self.finished_online = state["finished_online"]
        self.batch_pairs = dict(state["batch_pairs"])
        self.owners = {}

    def save_checkpoint(self, folder: str | Path) -> str:
        """Pickle the state atomically to folder/centroids.ckpt; returns the path."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "centroids.ckpt"
        tmp = folder / f".centroids.ckpt.tmp{os.getpid()}"
        with tmp.open("wb") as f:
            pickle.dump(self.state(), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
        atomic_write_text(folder / "position.txt", f"{self.position}\n")
        return str(path)

    def load_checkpoint(self, folder: str | Path) -> bool:
        """Restore from folder/centroids.ckpt if it exists."""
        path = Path(folder) / "centroids.ckpt"
        if not path.exists():
            return False
        with path.open("rb") as f:
            self.load_state(pickle.load(f))
        return True

    def result(self) -> dict[str, Any]:
        """What the driver needs at the end (the clusterer travels without its caches)."""
        c = self.clusterer
        for name in ("cache_", "ledger_", "_cache_sum"):
            if hasattr(c, name):
                delattr(c, name)
        return {"clusterer": c, "labels": self.labels, "val_grads": self.val_grads,
                **self.status()}  # fmt: skip


class GradientWorker:
    """Hosts a GradientComputer in a Ray actor (one per GPU, or per CPU slot).

    Two concurrency groups: ``compute`` (gradients, one at a time) and ``io`` (assigning,
    evicted-row sums), so that a batch can be assigned while the next one is computed.
    """

    def __init__(self, base_path: str, cfg: Config, adapter_path: str, pad_id: int,
                 fault_spec: str = "", marker_dir: str = ""):  # fmt: skip
        self.computer = GradientComputer(base_path, cfg, adapter_path, pad_id)
        self.faults = faults.parse(fault_spec)
        self.marker_dir = marker_dir
        self.busy_seconds = 0.0
        self.recomputed = 0
        self.memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # step -> (unit rows, keep)
        self.ready: dict[int, threading.Event] = {}
        self.started: set[int] = set()
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self.reconstructed = _was_reconstructed()

    def gradients(self, key: tuple[str, int, int], pairs: list) -> np.ndarray:
        faults.maybe_die(self.faults, "worker", *key, self.marker_dir)
        return self._gradients(pairs)

    def _gradients(self, pairs: list) -> np.ndarray:
        with self.model_lock:  # the engine's hooks are not thread-safe
            start = time.perf_counter()
            G = self.computer(pairs)
            self.busy_seconds += time.perf_counter() - start
        return G

    def _fill(self, key: tuple[str, int, int], step: int, pairs: list) -> None:
        """Compute batch ``step``'s unit gradients into the memo, once."""
        with self.lock:
            if step in self.started:
                return
            self.started.add(step)
        Xn, norms = normalize_rows(self.gradients(key, pairs))
        self.memo[step] = (Xn, norms > 1e-12)
        self._event(step).set()

    def _event(self, step: int):
        with self.lock:
            return self.ready.setdefault(step, threading.Event())

    def compute(self, key: tuple[str, int, int], step: int, pairs: list) -> None:
        """partial sums: compute and keep batch ``step``'s unit gradients."""
        self._fill(key, step, pairs)

    def reduce(self, key: tuple[str, int, int], step: int, pairs: list, state: dict) -> dict:
        """partial sums: assign batch ``step`` against the centroids after the previous batch."""
        if self.reconstructed and step not in self.started:
            # A restarted worker may never see this batch's compute again (it finished before
            # the crash): compute it here rather than wait for it.
            self._fill(key, step, pairs)
        self._event(step).wait()
        Xn, keep = self.memo[step]
        oldest = state["oldest_live"]
        with self.lock:
            for old in [s for s in self.memo if oldest is not None and s < oldest and s != step]:
                self.memo.pop(old, None)
        return assign_and_sum(Xn, keep, state["centers"])

    def evict_sums(self, step: int, entries: list, pairs: list, n_clusters: int) -> np.ndarray:
        """partial sums: (K, d) sums of rows of batch ``step`` that left the caches."""
        if step not in self.memo:  # lost in a restart, or held by a dead worker: recompute
            self.recomputed += 1
            Xn, _ = normalize_rows(self._gradients(pairs))
        else:
            Xn, _ = self.memo[step]
        out = np.zeros((n_clusters, Xn.shape[1]), dtype=np.float64)
        for row, k in entries:
            out[k] += Xn[row]
        return out

    def final_labels(
        self, key: tuple[str, int, int], pairs: list, centers: np.ndarray
    ) -> np.ndarray:
        """partial sums, final pass: labels only."""
        Xn, _ = normalize_rows(self.gradients(key, pairs))
        return cosine_assign(Xn, centers)

    def stats(self) -> dict[str, float]:
        return {"busy_seconds": self.busy_seconds, "pid": os.getpid(),
                "recomputed": self.recomputed}  # fmt: skip

    def layout(self) -> dict[str, Any]:
        return self.computer.layout()


def _was_reconstructed() -> bool:
    """True inside a Ray actor that has been restarted after a crash."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside a Ray actor
        return False


def worker_actor_class():
    """GradientWorker as a Ray actor class with its two concurrency groups."""
    import ray

    cls = type("GradientWorker", (GradientWorker,), {})
    for name, group in (("gradients", "compute"), ("compute", "compute"),
                        ("final_labels", "compute"), ("reduce", "io"),
                        ("evict_sums", "io"), ("stats", "io"), ("layout", "io")):  # fmt: skip
        setattr(cls, name, ray.method(concurrency_group=group)(getattr(GradientWorker, name)))
    return ray.remote(concurrency_groups={"compute": 1, "io": 1})(cls)


# --------------------------------------------------------------------------- executors


def _phase_label(phase: str, epoch: int) -> str:
    return f"stage2 {phase}" + (f" epoch {epoch + 1}" if phase == ONLINE else "")


def run_stage2_local(
    plan: Stage2Plan,
    samples: Sequence[Sample],
    compute: Callable[[list], np.ndarray],
    host: CentroidHost,
) -> CentroidHost:
    """The reference Stage II loop in one process (exact transport): the oracle."""
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and host.finished_online:
            continue
        bar = Progress(_phase_label(phase, epoch), total=sum(len(b) for b in batches))
        for t, idx in enumerate(batches):
            if not host.is_applied(phase, epoch, t):
                host.apply(phase, epoch, t, idx, compute([samples[i].pair for i in idx]))
            bar.update(len(idx))
        bar.close()
        if phase == VAL:
            info = host.initialize()
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            host.end_epoch(epoch)
    return host


def resolve_num_workers(cfg: Config) -> tuple[int, dict[str, float]]:
    """(number of gradient workers, Ray resources per worker) from config and cluster."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and cfg.model.device != "cpu":
        n = cfg.stage2.num_workers or gpus
        return n, {"num_gpus": 1, "num_cpus": 1}
    per = cfg.stage2.cpus_per_worker
    n = cfg.stage2.num_workers or max(1, int(resources.get("CPU", 1) // per))
    return n, {"num_cpus": per}


@dataclass
class Stage2Timing:
    """Per-pass wall time, centroid busy time and bytes moved (for the manifest and benchmark)."""

    passes: list[dict[str, Any]]
    workers: int
    transport: str
    resumed_from: tuple | None = None


def run_stage2_ray(
    plan: Stage2Plan,
    samples: Sequence[Sample],
    cfg: Config,
    base_path: str,
    adapter_path: str,
    pad_id: int,
    checkpoint_dir: str | Path,
    resume: bool = False,
) -> tuple[dict[str, Any], Stage2Timing]:
    """Stage II on Ray: sharded gradient workers feeding one centroid actor.

    Returns the centroid host's result (clusterer, labels, validation gradients) and timings.
    With ``resume`` the centroid actor restarts from ``checkpoint_dir`` and batches it has
    already applied are neither recomputed nor re-applied.
    """
    import ray

    s2 = cfg.stage2
    if s2.transport not in ("gradients", "partial_sums"):
        raise ValueError(
            f"stage2.transport: expected gradients | partial_sums, got {s2.transport!r}"
        )
    sums_mode = s2.transport == "partial_sums"
    n_workers, resources = resolve_num_workers(cfg)
    fault_spec = os.environ.get(faults.ENV, "")
    driver_faults = faults.parse(fault_spec)
    marker_dir = str(Path(checkpoint_dir).parent / "faults")
    wcfg = Config.from_dict(cfg.to_dict())
    wcfg.gradients.torch_threads = cfg.gradients.torch_threads or max(
        1, int(resources.get("num_cpus", 1))
    )
    env = {"env_vars": {k: v for k, v in os.environ.items() if k in ("HF_HUB_OFFLINE", "HF_HOME")}}
    Worker = worker_actor_class().options(
        max_restarts=-1, max_task_retries=-1, runtime_env=env, **resources
    )
    workers = [
        Worker.remote(base_path, wcfg, str(adapter_path), pad_id, fault_spec, marker_dir)
        for _ in range(n_workers)
    ]
    host = ray.remote(CentroidHost).options(num_cpus=0).remote(make_clusterer(cfg), len(samples))
    host.set_workers.remote(workers)
    resumed_from = None
    if resume and ray.get(host.load_checkpoint.remote(str(checkpoint_dir))):
        resumed_from = tuple(ray.get(host.status.remote())["position"])
        log.info("stage2: resumed the centroid actor at %s from %s", resumed_from, checkpoint_dir)
    status = ray.get(host.status.remote())
    limit = n_workers * max(1, s2.max_in_flight)
    log.info("stage2 on Ray: %d workers %s, transport %s, at most %d batches in flight",
             n_workers, resources, s2.transport, limit)  # fmt: skip

    passes = []
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and status["finished_online"]:
            continue
        busy_before, bytes_before = status["busy_seconds"], status["bytes_in"]
        bar = Progress(_phase_label(phase, epoch), total=sum(len(b) for b in batches))
        window: deque = deque()
        applied_here = 0
        state = host.online_state.remote() if sums_mode and phase == ONLINE else None
        final_centers = host.centers.remote() if sums_mode and phase == FINAL else None
        for t, idx in enumerate(batches):
            key = (phase, epoch, t)
            if CentroidHost._key(*key) <= CentroidHost._key(*status["position"]):
                bar.update(len(idx))
                continue
            pairs = [samples[i].pair for i in idx]
            worker = workers[t % n_workers]
            if not sums_mode or phase == VAL:
                done = host.apply.remote(phase, epoch, t, idx, worker.gradients.remote(key, pairs))
            elif phase == ONLINE:
                # Gradients start at once; the assignment waits for the centroids after t-1.
                step = plan.online_step(epoch, t)
                worker.compute.remote(key, step, pairs)
                out = worker.reduce.remote(key, step, pairs, state)
                state = done = host.apply_sums.remote(t, epoch, step, out, pairs, worker)
            else:
                labels = worker.final_labels.remote(key, pairs, final_centers)
                done = host.apply_labels.remote(t, idx, labels)
            window.append((done, len(idx)))
            applied_here += 1
            if s2.checkpoint_every and applied_here % s2.checkpoint_every == 0:
                window.append((host.save_checkpoint.remote(str(checkpoint_dir)), 0))
            faults.maybe_die(driver_faults, "driver", phase, epoch, t, marker_dir)
            while len(window) > limit:  # backpressure
                ref, n = window.popleft()
                ray.get(ref)
                bar.update(n)
        while window:
            ref, n = window.popleft()
            ray.get(ref)
            bar.update(n)
        elapsed = bar.close()
        if phase == VAL:
            info = ray.get(host.initialize.remote())
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            ray.get(host.end_epoch.remote(epoch))
        ray.get(host.save_checkpoint.remote(str(checkpoint_dir)))
        status = ray.get(host.status.remote())
        passes.append({
            "phase": phase, "epoch": epoch, "seconds": round(elapsed, 3),
            "samples": sum(len(b) for b in batches),
            "centroid_busy_seconds": round(status["busy_seconds"] - busy_before, 4),
            "bytes_in": status["bytes_in"] - bytes_before,
        })  # fmt: skip
    result = ray.get(host.result.remote())
    worker_stats = ray.get([w.stats.remote() for w in workers])
    result["layout"] = ray.get(workers[0].layout.remote())
    for actor in [*workers, host]:
        ray.kill(actor)
    result["worker_busy_seconds"] = [w["busy_seconds"] for w in worker_stats]
    result["recomputed_batches"] = sum(w["recomputed"] for w in worker_stats)
    return result, Stage2Timing(passes, n_workers, s2.transport, resumed_from)
