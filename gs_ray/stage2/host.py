"""The centroid host: the stream's consumers plus its position in the plan (what the centroid
actor hosts).

Free of Ray: batches arrive through method calls in plan order, whoever sends them. The host is
where the gradient stream is read: by the clusterer (``ClusteringConsumer``) first, then by any
other consumers (``gs_ray.stage2.consumers``) on the phases they read, from the same batch. The
``partial_sums`` transport applies a batch in two calls: ``enter_sums`` books the batch's rows in
the cluster caches' ledger and says which cached rows fall out and which worker holds them;
``finish_sums`` takes those rows' sums, computed by the workers meanwhile, and updates the
centroids. The host never waits on a worker: between the two calls it is free.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray.core.clustering import GradientSpaceClustering
from gs_ray.io import atomic_write_text
from gs_ray.rundir import SKIPPED
from gs_ray.stage2.batch import GradientBatch
from gs_ray.stage2.consumers import ClusteringConsumer, ConsumerSet, GradientConsumer
from gs_ray.stage2.plan import FINAL, ONLINE, VAL, order_key
from gs_ray.stage2.result import Stage2Result
from gs_ray.stage2.rows import RowStore
from gs_ray.statefile import load_state, save_state

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "centroids"  # centroids.json + centroids.[01].bin (gs_ray/statefile.py)
LEGACY_PICKLE = "centroids.ckpt"  # older gs-ray: never loaded


class CentroidHost:
    """The stream's consumers (the clusterer first) plus their position in the plan.

    Batches must arrive in plan order (phase, epoch, t). A batch at or before the position is a
    replay (after a restart) and is skipped; a batch that leaves a gap is an error.
    ``consumers`` are the other consumers (``self.consumers``); ``self.stream`` is all of them.
    """

    def __init__(
        self,
        clusterer: GradientSpaceClustering,
        n_samples: int,
        consumers: list[GradientConsumer] | tuple[GradientConsumer, ...] = (),
        checkpoint_max_share: float = 1.0,
        rows: RowStore | None = None,
    ):
        self.clustering = ClusteringConsumer(clusterer, n_samples)
        # periodic checkpoints take at most this share of the time (stage2.checkpoint_max_share)
        self.checkpoint_max_share = checkpoint_max_share
        self._last_checkpoint: tuple[float, float] | None = None  # (ended at, seconds it took)
        self.checkpoints_skipped = 0
        self.consumers = ConsumerSet(consumers)
        self.stream = ConsumerSet([self.clustering, *consumers])
        self.position: tuple[str, int, int] = (VAL, 0, -1)  # last applied batch
        self.done_epochs = 0
        self.finished_online = False
        self.busy_seconds = 0.0  # applying batches and phase ends (checkpoints apart), wall
        # the CPU time of the same work (its thread's): where it falls short of busy_seconds,
        # the actor waited for a core (or memory) that others held
        self.busy_cpu_seconds = 0.0
        self.checkpoint_seconds = 0.0  # writing checkpoints (the actor is busy then too)
        self.bytes_in = 0
        self.skipped: set[int] = set()  # sample indices with non-finite gradients (policy skip)
        # partial sums: the rank of the worker that holds each live batch's rows, and the
        # batch's samples (to recompute them); the batch entered but not yet finished
        self.owners: dict[int, int] = {}
        self.batch_pairs: dict[int, list] = {}
        self._entered: dict[str, Any] | None = None
        # the training rows kept for the later passes (stage2.keep_rows_mb; gs_ray/stage2/rows.py)
        self.rows = rows

    @property
    def clusterer(self) -> GradientSpaceClustering:
        return self.clustering.clusterer

    @property
    def labels(self) -> np.ndarray:
        """(n_samples,) the final pass's labels so far (UNASSIGNED where not reached)."""
        return self.clustering.labels_

    @property
    def val_grads(self) -> list[np.ndarray]:
        return self.clustering.val_grads_

    # ------------------------------------------------------------------ order

    def is_applied(self, phase: str, epoch: int, t: int) -> bool:
        return order_key(phase, epoch, t) <= order_key(*self.position)

    def _advance(self, phase: str, epoch: int, t: int) -> bool:
        if self.is_applied(phase, epoch, t):
            return False
        same = self.position[0] == phase and self.position[1] == epoch
        if (same and t != self.position[2] + 1) or (not same and t != 0):
            raise RuntimeError(f"batch {(phase, epoch, t)} arrived after {self.position}: a gap")
        self.position = (phase, epoch, t)
        return True

    def _note_skipped(self, idx: np.ndarray, skipped: np.ndarray) -> None:
        if skipped.any():
            self.skipped.update(int(i) for i in idx[skipped])

    # ------------------------------------------------------------------ exact transport

    def apply(self, phase: str, epoch: int, t: int, idx: np.ndarray, batch: GradientBatch) -> bool:
        """Apply one batch of gradients; False if it was already applied (replay)."""
        return self._apply(phase, epoch, t, idx, lambda: batch, batch.nbytes)

    def apply_reusing(
        self,
        phase: str,
        epoch: int,
        t: int,
        idx: np.ndarray,
        ids: list[str],
        part: GradientBatch | None,
    ) -> bool:
        """Apply batch ``idx`` assembled from the kept rows and ``part``, the computed rows of
        its samples that are not kept (``rows.rows_to_compute``); False if already applied."""
        rows = self.rows
        if rows is None:
            raise RuntimeError("this host keeps no gradient rows")
        nbytes = part.nbytes if part is not None else 0
        return self._apply(phase, epoch, t, idx, lambda: rows.assemble(idx, ids, part), nbytes)

    def _apply(
        self,
        phase: str,
        epoch: int,
        t: int,
        idx: np.ndarray,
        make: Callable[[], GradientBatch],
        nbytes: int,
    ) -> bool:
        """Apply the batch ``make()`` builds (built only if it is not a replay; its building
        counts as busy time); ``nbytes`` is what travelled to the host for it."""
        if not self._advance(phase, epoch, t):
            return False
        with self._busy():
            batch: GradientBatch = make()
            self.bytes_in += nbytes
            self._note_skipped(idx, batch.skipped)
            if len(self.consumers) and len(batch.ids) != len(batch.G):
                raise ValueError("gradient consumers need the batch's sample ids")
            self.stream.feed(phase, epoch, t, idx, batch.G, batch.skipped, batch.ids)
            if phase == ONLINE and self.rows is not None:
                self.rows.keep(idx, batch)
        return True

    @contextmanager
    def _busy(self) -> Iterator[None]:
        """Count the block's wall time as busy, and its thread's CPU time as busy CPU."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.busy_seconds += time.perf_counter() - wall
            self.busy_cpu_seconds += time.thread_time() - cpu

    def kept_rows(self) -> tuple[np.ndarray | None, str | None]:
        """The samples whose gradient rows this host keeps for the next pass (None: none), and
        what its row store decided (None: nothing yet, or no store)."""
        if self.rows is None:
            return None, None
        return self.rows.held(), self.rows.decision

    def set_layout(self, layout: dict[str, Any]) -> None:
        """The gradient layout, for consumers that read per-layer pieces (before any batch)."""
        self.stream.set_layout(layout)

    # ------------------------------------------------------------------ partial sums

    def online_state(self, copy: bool = True) -> dict[str, Any]:
        """What a worker needs to assign the next batch: the centroids and the oldest batch
        still cached (older rows can be dropped). ``copy=False``: the live arrays, for a
        return value that is serialized before the host runs its next call (the centroid
        actor runs one call at a time), not for a caller in this process that keeps it."""
        c = self.clusterer
        centers, start = c.cluster_centers_, c.epoch_start_centers
        return {
            "centers": centers.copy() if copy else centers,
            "start_centers": start.copy() if copy else start,
            "oldest_live": c.oldest_live_step(),
        }

    def enter_sums(
        self, t: int, epoch: int, step: int, out: dict, pairs: list, owner: int
    ) -> dict[str, Any]:
        """First half of applying a worker's reduced batch t (global step ``step``, held by the
        worker of rank ``owner``): enter its rows in the caches' ledger. Returns what the
        workers must sum for ``finish_sums``: ``{"k": K, "evictions": {old_step: [holder rank
        or None (unknown after a resume), [(row, cluster), ...], the batch's pairs]}}``
        (``evicted_share``); no evictions on a replay."""
        if not self._advance(ONLINE, epoch, t):
            return {"k": self.clusterer.n_clusters_, "evictions": {}}
        with self._busy():
            c = self.clusterer
            evictions = c.push_ledger(step, out["labels"], out["keep"], out["start_labels"])
            plan = {
                old: [self.owners.get(old), entries, self.batch_pairs[old]]
                for old, entries in sorted(evictions.items())
            }
            self.owners[step], self.batch_pairs[step] = owner, pairs
            oldest = c.oldest_live_step()
            for old in [s for s in self.batch_pairs if oldest is None or s < oldest]:
                self.batch_pairs.pop(old, None)
                self.owners.pop(old, None)
            self._entered = {
                "t": t,
                "epoch": epoch,
                "sums": out["sums"],
                "n": len(pairs),
                "n_zero": out["n_zero"],
            }
            self.bytes_in += out["sums"].nbytes + out["labels"].nbytes
        return {"k": c.n_clusters_, "evictions": plan}

    def finish_sums(self, t: int, epoch: int, *evicted: np.ndarray | None) -> dict:
        """Second half: the evicted rows' sums, one (K, d) part per worker (None: it held none
        of them), update the centroids. Returns ``online_state()`` (also on a replay)."""
        entered = self._entered
        if entered is None or (entered["t"], entered["epoch"]) != (t, epoch):
            return self.online_state()  # a replay
        with self._busy():
            parts = [p for p in evicted if p is not None]
            self.bytes_in += sum(p.nbytes for p in parts)
            c = self.clusterer
            c.partial_fit_external(entered["sums"], parts, entered["n"], entered["n_zero"])
            self._entered = None
            state = self.online_state(copy=False)  # Ray serializes it before the next call
        return state

    def apply_sums(
        self,
        t: int,
        epoch: int,
        step: int,
        out: dict,
        pairs: list,
        owner: int,
        evicted: Callable[[dict[str, Any]], np.ndarray | None],
    ) -> dict:
        """Both halves in one process; ``evicted(plan)`` sums every row the plan evicts (tests
        and benchmarks: the Ray transport has the workers sum their shares between the calls)."""
        plan = self.enter_sums(t, epoch, step, out, pairs, owner)
        self.finish_sums(t, epoch, evicted(plan) if plan["evictions"] else None)
        return self.online_state()

    def apply_labels(self, t: int, idx: np.ndarray, labels: np.ndarray) -> bool:
        """Final-pass labels assigned by a worker against the final centroids (SKIPPED kept)."""
        if not self._advance(FINAL, 0, t):
            return False
        self.labels[idx] = labels
        self.skipped.update(int(i) for i in idx[labels == SKIPPED])
        self.bytes_in += labels.nbytes
        return True

    # ------------------------------------------------------------------ phase ends

    def initialize(self) -> dict[str, Any]:
        """SVD + silhouette on the collected validation gradients (once)."""
        with self._busy():
            self.clustering.initialize()
        return {"k": self.clusterer.n_clusters_, "silhouette": self.clusterer.silhouette_}

    @property
    def initialized(self) -> bool:
        return hasattr(self.clusterer, "cluster_centers_")

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Close online epoch ``epoch`` (idempotent on replay); what the epoch's end says:
        changed share, centroid shift, converged, and why the online phase stops (if it does)."""
        c = self.clusterer
        if epoch >= self.done_epochs:
            c.end_epoch()
            self.done_epochs = epoch + 1
            self.finished_online = c.converged_ or self.done_epochs >= c.max_epochs
        return {
            "epoch": epoch,
            "changed_share": c.changed_share_history_[epoch],
            "shift": c.shift_history_[epoch],
            "converged": bool(c.converged_),
            "stop": c.stop_reason_ if self.finished_online else None,
        }

    def centers(self) -> np.ndarray:
        return self.clusterer.cluster_centers_

    def status(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "finished_online": self.finished_online,
            "done_epochs": self.done_epochs,
            "initialized": self.initialized,
            "busy_seconds": self.busy_seconds,
            "busy_cpu_seconds": self.busy_cpu_seconds,
            "checkpoint_seconds": self.checkpoint_seconds,
            "checkpoints_skipped": self.checkpoints_skipped,
            "bytes_in": self.bytes_in,
            "rows_kept_bytes": self.rows.nbytes if self.rows is not None else 0,
            "nice": os.nice(0),  # its process's scheduling niceness (stage2.worker_nice)
        }

    # ------------------------------------------------------------------ checkpoints

    def state(self, copy: bool = True) -> dict[str, Any]:
        """The clusterer's state (top level), the position, and the other consumers' states;
        ``copy=False``: the clusterer's live arrays (what a checkpoint writes at once)."""
        if self._entered is not None:
            raise RuntimeError(
                f"batch {self._entered['t']} is entered but not finished: no consistent state"
            )
        return {
            **self.clustering.state(copy),
            "position": self.position,
            "done_epochs": self.done_epochs,
            "finished_online": self.finished_online,
            "skipped": sorted(self.skipped),
            "batch_pairs": dict(self.batch_pairs),  # owners: ranks of this pass's workers
            "consumers": self.consumers.state(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.clustering.load_state(state)
        self.position = tuple(state["position"])
        self.done_epochs = state["done_epochs"]
        self.finished_online = state["finished_online"]
        self.skipped = set(state.get("skipped", ()))
        self.batch_pairs = dict(state["batch_pairs"])
        self.owners = {}
        saved = state.get("consumers", {})
        for c in self.consumers:
            if c.name not in saved and any(
                order_key(ph, 0, 0) <= order_key(*self.position) for ph in c.phases
            ):
                raise RuntimeError(
                    f"the checkpoint at {self.position} has no state for consumer {c.name!r}, "
                    "which would miss batches already applied: run Stage II afresh"
                )
        self.consumers.load_state(saved)

    def checkpoint_due(self) -> bool:
        """Whether a periodic checkpoint fits the budget: the time since the last one ended is
        at least its write time * (1 / checkpoint_max_share - 1), so that writing takes at most
        that share of the pass. (The exact cache is most of the state, 738 MB for K = 16 at
        d = 65,536: written every 20 batches, checkpoints took up to 49% of the online pass on
        the 2-core CPU before they were written in place; docs/scaling.md.)"""
        if self._last_checkpoint is None or self.checkpoint_max_share >= 1:
            return True
        ended, took = self._last_checkpoint
        return time.monotonic() - ended >= took * (1 / self.checkpoint_max_share - 1)

    def save_checkpoint(self, folder: str | Path, periodic: bool = False) -> str | None:
        """The state, without pickle (``statefile``: arrays in folder/centroids.[01].bin, the
        rest in folder/centroids.json, written last); returns the JSON path. A ``periodic`` one
        (mid-pass) is skipped, returning None, while it is not ``checkpoint_due``: a crash then
        costs at most the batches since the last one, which is what the budget buys."""
        if periodic and not self.checkpoint_due():
            self.checkpoints_skipped += 1
            return None
        start = time.perf_counter()
        path = save_state(folder, CHECKPOINT_NAME, self.state(copy=False))
        atomic_write_text(Path(folder) / "position.txt", f"{self.position}\n")
        took = time.perf_counter() - start
        self.checkpoint_seconds += took
        self._last_checkpoint = (time.monotonic(), took)
        return str(path)

    def load_checkpoint(self, folder: str | Path) -> bool:
        """Restore from folder/centroids.json (+ the .bin it names) if they exist. A pickled
        checkpoint of an older gs-ray (centroids.ckpt) is never loaded (unpickling runs code):
        Stage II then starts afresh, and says so."""
        state = load_state(folder, CHECKPOINT_NAME)
        if state is None:
            if (Path(folder) / LEGACY_PICKLE).exists():
                log.warning(
                    "%s: a pickled checkpoint of an older gs-ray is not loaded (pickle "
                    "runs code); Stage II starts afresh",
                    Path(folder) / LEGACY_PICKLE,
                )
            return False
        self.load_state(state)
        return True

    def result(self, info: dict[str, Any] | None = None) -> Stage2Result:
        """The Stage II result (the clusterer travels without its caches)."""
        val = np.concatenate(self.val_grads) if self.val_grads else np.zeros((0, 0), np.float32)
        info = {**(info or {}), "n_skipped": len(self.skipped)}
        return Stage2Result(
            self.clusterer.without_caches(), self.labels.copy(), val, {}, info, list(self.consumers)
        )
