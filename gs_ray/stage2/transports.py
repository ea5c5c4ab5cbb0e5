"""How gradients travel from the gradient workers to the centroid actor: one strategy per
``stage2.transport``, each saying once what its workers compute and what the host applies.

* ``gradients`` (``ExactTransport``, default): workers send every per-sample gradient; the
  centroid actor assigns with the centroids after batch t-1 and keeps the paper's per-sample
  FIFO caches.
* ``partial_sums`` (``PartialSumsTransport``): each worker keeps its batch's unit gradients,
  receives the centroids after batch t-1 and assigns the batch itself, then sends one sum and
  count per cluster. The centroid actor keeps the cluster caches as a ledger of (batch, row)
  entries and running sums, and applies a batch in two calls: ``enter_sums`` books the batch
  and names the rows the caches evict; every worker then sums its share of those rows
  (``evicted_share``; a restarted worker recomputes them), and ``finish_sums`` updates the
  centroids. The actor never waits on a worker. Same centroids and assignments as
  ``gradients`` up to rounding, while the actor holds K * d sums instead of K * alpha * |B| * d
  cached gradients and does K * d work per batch instead of |B| * K * d (docs/scaling.md).
* ``collective`` (``CollectiveTransport``): every worker holds a replica of the centroids, the
  running sums and the ledger; one all-reduce of per-cluster sums plus an all-gather of labels
  per step (``gs_ray.stage2.collective``). No actor touches K * d per step.

A transport has a driver side (``bind`` to the worker group, then ``submit``: which remote calls
one batch becomes) and, where it needs one, a worker side (``PartialSumsWorker``, mixed into
``GradientWorker``). The executor (``run_stage2_ray``) keeps only the loop, backpressure and
checkpoints.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Any, ClassVar, get_args

import numpy as np

from gs_ray.config import WHOLE_GRADIENT_TRANSPORTS
from gs_ray.config import Transport as TransportName
from gs_ray.core.cosine import cluster_sums, cosine_assign, normalize_rows
from gs_ray.rundir import SKIPPED
from gs_ray.stage2.batch import GradientBatch
from gs_ray.stage2.plan import FINAL, ONLINE, VAL, BatchKey

# --------------------------------------------------------------------------- driver side


class Transport(ABC):
    """The driver side of a transport: turns one planned batch into remote calls."""

    name: ClassVar[str]
    cache: ClassVar[str]  # the clusterer's cache: "samples" (per-sample FIFO) or "external"
    whole_gradients: ClassVar[bool] = False  # every gradient row reaches the centroid actor

    def bind(self, workers: list) -> None:
        """The worker group's actors, in rank order (called once, before any batch)."""
        self.workers = list(workers)

    def start_phase(self, phase: str, host) -> None:  # noqa: B027 - optional hook
        """Called before a phase's first batch is submitted."""

    @abstractmethod
    def submit(
        self,
        key: BatchKey,
        step: int,
        idx: np.ndarray,
        ids: list[str],
        pairs: list,
        rank: int,
        host,
    ):
        """Submit batch ``key`` (global online step ``step``) to the worker of rank ``rank``
        and to ``host``; returns the object ref whose completion means the host has applied
        it."""


def send_gradients(key: BatchKey, idx: np.ndarray, ids: list[str], pairs: list, worker, host):
    """The worker computes the batch's gradients; the host applies them (worker -> object
    store -> actor, never through the driver)."""
    return host.apply.remote(*key, idx, worker.gradients.remote(key, pairs, ids))


class ExactTransport(Transport):
    """Every per-sample gradient goes to the centroid actor."""

    name, cache, whole_gradients = "gradients", "samples", True

    def submit(self, key, step, idx, ids, pairs, rank, host):
        return send_gradients(key, idx, ids, pairs, self.workers[rank], host)


class PartialSumsTransport(Transport):
    """Workers assign their own batches; only per-cluster sums reach the centroid actor."""

    name, cache = "partial_sums", "external"

    def __init__(self) -> None:
        self.state = None  # ref: the host's online state after the last submitted batch
        self.final_centers = None

    def start_phase(self, phase: str, host) -> None:
        if phase == ONLINE:
            self.state = host.online_state.remote()
        elif phase == FINAL:
            self.final_centers = host.centers.remote()

    def submit(self, key, step, idx, ids, pairs, rank, host):
        phase, epoch, t = key
        worker = self.workers[rank]
        if phase == VAL:  # validation gradients travel whole, as in the exact transport
            return send_gradients(key, idx, ids, pairs, worker, host)
        if phase == ONLINE:
            # Gradients start at once; the assignment waits for the centroids after t-1.
            worker.compute.remote(key, step, pairs, ids)
            out = worker.reduce.remote(key, step, pairs, ids, self.state)
            plan = host.enter_sums.remote(t, epoch, step, out, pairs, rank)
            n = len(self.workers)
            shares = [w.evicted_share.remote(plan, r, n) for r, w in enumerate(self.workers)]
            self.state = host.finish_sums.remote(t, epoch, *shares)
            return self.state
        labels = worker.final_labels.remote(key, pairs, ids, self.final_centers)
        return host.apply_labels.remote(t, idx, labels)


class CollectiveTransport(Transport):
    """Replicated centroid state on the workers, one all-reduce per step
    (``gs_ray.stage2.collective``). Its online steps are collectives of the whole worker group,
    so it has its own loop (``run_stage2_collective``), not one remote call per batch."""

    name, cache = "collective", "external"

    def submit(self, key, step, idx, ids, pairs, rank, host):
        raise NotImplementedError("the collective transport runs in run_stage2_collective")


TRANSPORTS: dict[str, type[Transport]] = {
    t.name: t for t in (ExactTransport, PartialSumsTransport, CollectiveTransport)
}
assert set(TRANSPORTS) == set(get_args(TransportName)), "config.Transport and TRANSPORTS differ"
assert {n for n, t in TRANSPORTS.items() if t.whole_gradients} == set(WHOLE_GRADIENT_TRANSPORTS)


def make_transport(name: str) -> Transport:
    """The transport strategy named by ``stage2.transport``."""
    if name not in TRANSPORTS:
        raise ValueError(f"stage2.transport: expected one of {sorted(TRANSPORTS)}, got {name!r}")
    return TRANSPORTS[name]()


# --------------------------------------------------------------------------- host side


# --------------------------------------------------------------------------- worker side


def assign_and_sum(
    Xn: np.ndarray, keep: np.ndarray, centers: np.ndarray, start_centers: np.ndarray
) -> dict[str, Any]:
    """Labels of unit gradients against ``centers`` (and against the epoch's starting
    centroids, for the convergence rule), and the per-cluster sums and counts of the kept
    (non-zero, not skipped) rows."""
    labels = cosine_assign(Xn, centers)
    sums, counts = cluster_sums(Xn, labels, len(centers), keep)
    return {
        "labels": labels,
        "start_labels": cosine_assign(Xn, start_centers),
        "keep": keep,
        "sums": sums,
        "counts": counts,
        "n_zero": int((~keep).sum()),
    }


class PartialSumsWorker:
    """The worker side of ``partial_sums``, mixed into ``GradientWorker``: it keeps each live
    batch's unit gradients (``memo``) until the centroid actor no longer caches them.

    Needs ``self.batch_gradients(key, pairs, ids) -> GradientBatch`` and
    ``self.raw_gradients(pairs) -> ndarray`` from the class it is mixed into."""

    def _init_partial_sums(self, reconstructed: bool) -> None:
        self.memo: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # step -> (unit rows, keep)
        self.ready: dict[int, threading.Event] = {}
        self.started: set[int] = set()
        self.lock = threading.Lock()
        self.recomputed = 0
        self.reconstructed = reconstructed

    def _event(self, step: int) -> threading.Event:
        with self.lock:
            return self.ready.setdefault(step, threading.Event())

    def _fill(self, key: BatchKey, step: int, pairs: list, ids: list[str]) -> None:
        """Compute batch ``step``'s unit gradients into the memo, once."""
        with self.lock:
            if step in self.started:
                return
            self.started.add(step)
        batch: GradientBatch = self.batch_gradients(key, pairs, ids)
        Xn, norms = normalize_rows(batch.G)
        self.memo[step] = (Xn, (norms > 1e-12) & ~batch.skipped)
        self._event(step).set()

    def compute(self, key: BatchKey, step: int, pairs: list, ids: list[str]) -> None:
        """Compute and keep batch ``step``'s unit gradients."""
        self._fill(key, step, pairs, ids)

    def reduce(self, key: BatchKey, step: int, pairs: list, ids: list[str], state: dict) -> dict:
        """Assign batch ``step`` against the centroids after the previous batch."""
        if self.reconstructed and step not in self.started:
            # A restarted worker may never see this batch's compute again (it finished before
            # the crash): compute it here rather than wait for it.
            self._fill(key, step, pairs, ids)
        self._event(step).wait()
        Xn, keep = self.memo[step]
        oldest = state["oldest_live"]
        with self.lock:
            for old in [s for s in self.memo if oldest is not None and s < oldest and s != step]:
                self.memo.pop(old, None)
        return assign_and_sum(Xn, keep, state["centers"], state["start_centers"])

    def evicted_share(self, plan: dict, rank: int, n_workers: int) -> np.ndarray | None:
        """This worker's share of the rows a batch evicts (``CentroidHost.enter_sums``'s
        plan): the (K, d) sum of those of the batches it holds, and of those whose holder is
        unknown (after a resume) that fall to its rank; None when it has none."""
        out = None
        for old, (holder, entries, pairs) in plan["evictions"].items():
            if (holder if holder is not None else old % n_workers) == rank:
                part = self.evict_sums(old, entries, pairs, plan["k"])
                out = part if out is None else out + part
        return out

    def evict_sums(self, step: int, entries: list, pairs: list, n_clusters: int) -> np.ndarray:
        """(K, d) sums of rows of batch ``step`` that left the caches."""
        if step not in self.memo:  # lost in a restart, or held by a dead worker: recompute
            self.recomputed += 1
            G = self.raw_gradients(pairs)
            Xn, _ = normalize_rows(np.where(np.isfinite(G), G, 0.0))  # evicted rows are finite
        else:
            Xn, _ = self.memo[step]
        out = np.zeros((n_clusters, Xn.shape[1]), dtype=np.float64)
        for row, k in entries:
            out[k] += Xn[row]
        return out

    def final_labels(
        self, key: BatchKey, pairs: list, ids: list[str], centers: np.ndarray
    ) -> np.ndarray:
        """Final pass: labels only (SKIPPED for left-out samples)."""
        batch: GradientBatch = self.batch_gradients(key, pairs, ids)
        Xn, _ = normalize_rows(batch.G)
        labels = cosine_assign(Xn, centers)
        labels[batch.skipped] = SKIPPED
        return labels
