"""Gradient rows kept for reuse: Stage II's later passes read what the first online epoch computed.

Stage II's model (the base model and the warm-up adapter) is frozen, so a sample's gradient is the
same in every pass; only the rounding can differ, because a row is computed beside the other
samples of its batch. Recomputing it in every online epoch and again in the final pass is the
paper's streaming, which holds nothing but the clusterer's caches. Where the training rows fit a
budget (``stage2.keep_rows_mb``) the centroid host keeps those of the first online epoch that
reaches them, and every later batch is assembled from them: a worker computes only the rows that
are not kept (the final pass's test samples). Every executor that sends whole gradients (the local
oracle, the Ray executor with the ``gradients`` transport) walks the same plan and keeps the same
rows, so their results stay equal. The rows are never checkpointed: after a restart the host
holds none, and the passes recompute (and keep) them again.

Free of Ray: the host owns a ``RowStore``; executors ask the host which samples it holds at the
start of each pass (``CentroidHost.kept_rows``), say once what the store decided (``announce``)
and split each batch with ``rows_to_compute``.
"""

from __future__ import annotations

import logging

import numpy as np

from gs_ray.stage2.batch import GradientBatch
from gs_ray.stage2.plan import Stage2Plan

log = logging.getLogger(__name__)

MB = 2**20


class RowStore:
    """The float32 gradient rows of the samples ``kept`` (the training rows), up to a budget.

    Nothing is held until the first row arrives; then the whole set is held if
    ``len(kept) * d * 4`` bytes fit ``budget_mb``, or never (the store turns itself off and
    says so once).

    Rows are kept by reference, not copied: the store holds the batches' own (b, d) arrays
    (``blocks``) and, per kept sample, which block and row hold it. A batch's array is never
    written after it reaches the host (on Ray it is a read-only view of the object store), so
    the reference is the row. Copying cost the centroid actor more than its whole clustering
    update: 10-16 ms per batch of 32 at d = 65,536 (a first write into fresh pages), against
    9 ms for the update (benchmarks/stage2_scaling.py, docs/scaling.md).
    """

    def __init__(self, kept: np.ndarray, n_samples: int, budget_mb: float):
        kept = np.unique(np.asarray(kept, dtype=np.int64))
        self.n_samples = n_samples
        self.budget_bytes = int(budget_mb * MB)
        self.slot = np.full(n_samples, -1, dtype=np.int64)
        self.slot[kept] = np.arange(len(kept))
        self.n_kept = len(kept)
        self.blocks: list[np.ndarray] = []  # the kept batches' gradient arrays, by reference
        # per slot: its block (-1: none yet), its row there, whether it was skipped; allocated
        # with the first row, where the store lives (arrays that reached a Ray actor through
        # its constructor are read-only)
        self.block = np.full(0, -1, dtype=np.int64)
        self.row = np.zeros(0, dtype=np.int64)
        self.skipped = np.zeros(0, dtype=bool)
        self.dim: int | None = None
        self.enabled = self.budget_bytes > 0 and len(kept) > 0
        # what was decided, for the driver's console (the centroid actor's own log lines do not
        # reach it): None until the first row arrives
        self.decision: str | None = None

    def _decide(self, d: int) -> bool:
        """Whether the set's rows of dimension d fit the budget; records the decision."""
        need = self.n_kept * d * 4
        if need <= self.budget_bytes:
            self.decision = (
                f"the centroid actor keeps the {self.n_kept} training rows ({need / MB:.0f} MB, "
                "stage2.keep_rows_mb): the later passes reuse them"
            )
            return True
        self.decision = (
            f"the {self.n_kept} training rows take {need / MB:.0f} MB (d = {d}), over "
            f"stage2.keep_rows_mb = {self.budget_bytes / MB:.0f}: every pass recomputes them"
        )
        return False

    @property
    def filled(self) -> np.ndarray:
        """(n_kept,) bool: the slots whose row is held (empty before the first row)."""
        return self.block >= 0

    def keep(self, idx: np.ndarray, batch: GradientBatch) -> None:
        """Keep the rows of ``batch`` (samples ``idx``) that belong to the set and are new: the
        store then references ``batch.G``, which nobody may write afterwards."""
        if not self.enabled:
            return
        if self.dim is None:
            if not self._decide(batch.G.shape[1]):
                self.enabled = False
                return
            self.dim = int(batch.G.shape[1])
            self.block = np.full(self.n_kept, -1, dtype=np.int64)
            self.row = np.zeros(self.n_kept, dtype=np.int64)
            self.skipped = np.zeros(self.n_kept, dtype=bool)
        slots = self.slot[np.asarray(idx, dtype=np.int64)]
        new = (slots >= 0) & (self.block[np.maximum(slots, 0)] < 0)
        if new.any():
            # The whole batch by reference where every row is new (a first online epoch);
            # else a copy of the new rows only (after a resume a pass can meet rows already
            # held), so that the store never holds more than its rows' bytes.
            G = batch.G if new.all() else batch.G[new]
            self.block[slots[new]] = len(self.blocks)
            self.row[slots[new]] = np.arange(len(G))
            self.skipped[slots[new]] = batch.skipped[new]
            self.blocks.append(G if G.dtype == np.float32 else G.astype(np.float32))

    @classmethod
    def of_plan(cls, plan: Stage2Plan, n_samples: int, budget_mb: float) -> RowStore:
        """The store of ``plan``'s training rows (every online epoch's samples)."""
        return cls(plan.train, n_samples, budget_mb)

    @property
    def complete(self) -> bool:
        return self.enabled and self.dim is not None and bool(self.filled.all())

    def held(self) -> np.ndarray | None:
        """(n_samples,) bool: the samples whose rows a batch can take from here; None while the
        set is incomplete (a pass then computes whole batches, and fills the set)."""
        return (self.slot >= 0) if self.complete else None

    @property
    def nbytes(self) -> int:
        """The bytes the store holds alive (its blocks: only kept rows, at most the budget)."""
        return sum(int(b.nbytes) for b in self.blocks)

    def assemble(
        self, idx: np.ndarray, ids: list[str], part: GradientBatch | None
    ) -> GradientBatch:
        """Batch ``idx`` from the kept rows and ``part``, the computed rows of the samples not
        kept (``rows_to_compute``'s positions, in order)."""
        idx = np.asarray(idx, dtype=np.int64)
        slots = self.slot[idx]
        here = slots >= 0
        if not self.complete or (part is None and not here.all()):
            raise RuntimeError("a batch needs rows that are neither kept nor computed")
        G = np.empty((len(idx), self.dim), dtype=np.float32)
        skipped = np.zeros(len(idx), dtype=bool)
        at = np.flatnonzero(here)
        for j, s in zip(at.tolist(), slots[at].tolist(), strict=True):
            G[j] = self.blocks[self.block[s]][self.row[s]]
        skipped[here] = self.skipped[slots[here]]
        if part is not None:
            if len(part.G) != int((~here).sum()):
                raise RuntimeError(
                    f"{len(part.G)} computed rows for {int((~here).sum())} samples not kept"
                )
            G[~here] = part.G
            skipped[~here] = part.skipped
        return GradientBatch(G, skipped, list(ids))


def announce(decision: str | None, said: bool) -> bool:
    """Log the store's ``decision`` once, on the driver; returns whether it has been said."""
    if decision and not said:
        log.info("stage2: %s", decision)
        return True
    return said


def rows_to_compute(idx: np.ndarray, held: np.ndarray | None) -> np.ndarray | None:
    """Positions in batch ``idx`` whose rows must be computed; None when no rows are held (the
    whole batch is computed and applied the usual way)."""
    if held is None:
        return None
    return np.flatnonzero(~held[np.asarray(idx, dtype=np.int64)])


def part_of(todo: np.ndarray, pairs: list, ids: list[str]) -> tuple[list, list[str]]:
    """The (pairs, ids) of a batch's positions ``todo``: the rows a worker computes."""
    return [pairs[j] for j in todo], [ids[j] for j in todo]
