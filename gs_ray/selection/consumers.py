"""The selection methods as consumers of the gradient stream: GIST, LESS and random.

Each is built from the target set's gradients (``from_target``), reads the pool's gradient
batches once (``consume``: the final pass of Stage II, or ``gs-ray select``'s single pool
pass), stores only what its method needs (GIST: k + 1 floats per sample; LESS: an 8,192-dim
projection; random: nothing but the id), and scores, ranks and writes at the end. All three share
one interface, so ``gs-ray select`` and Stage II treat them alike.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, get_args

import numpy as np

from gs_ray.config import SelectionConfig, SelectionMethod
from gs_ray.io import write_json
from gs_ray.rundir import RunDir
from gs_ray.selection import baselines
from gs_ray.selection.gist import FLOAT_BYTES, TargetSubspace, fit_subspace, storage_bytes
from gs_ray.selection.ranking import rank
from gs_ray.stage2.consumers import GradientConsumer, StreamBatch


class Selector(GradientConsumer):
    """A scoring consumer: collects per-sample records, scores them at the end.

    Learned state: ``ids_`` (the pool, in arrival order) and whatever ``_rows`` the method
    stores. Outputs (``write``): ``selection/<method>/scores.jsonl`` (id, score, rank; best
    first) and ``summary.json`` (method, pool size, storage)."""

    method: ClassVar[str]

    def __init__(self, name: str | None = None):
        self.name = name or self.method
        self.ids_: list[str] = []

    @abstractmethod
    def scores(self) -> np.ndarray:
        """One score per id in ``ids_`` (higher: more useful for the target)."""

    def stored_bytes(self) -> int:
        """Bytes of what is kept per pool sample (the method's gradient store)."""
        return 0

    def info(self) -> dict[str, Any]:
        """The method's own facts for the summary."""
        return {}

    def ranking(self) -> tuple[list[str], np.ndarray]:
        """(ids best first, their scores)."""
        scores = self.scores()
        order = rank(self.ids_, scores)
        return [self.ids_[i] for i in order], scores[order]

    def write(self, run: RunDir) -> dict[str, Any]:
        ids, scores = self.ranking()
        run.write_jsonl(
            run.selection_scores(self.name),
            (
                {"id": i, "score": float(s) if np.isfinite(s) else None, "rank": r}
                for r, (i, s) in enumerate(zip(ids, scores))
            ),
        )
        summary = {
            "method": self.method,
            "n_pool": len(ids),
            "stored_bytes": self.stored_bytes(),
            **self.info(),
        }
        write_json(run.selection_summary(self.name), summary)
        return summary


class GistSelector(Selector):
    """GIST: the pool's gradients projected on the target's top-k singular directions."""

    method = "gist"

    def __init__(self, subspace: TargetSubspace, name: str | None = None):
        super().__init__(name)
        self.subspace = subspace
        self.coords_: list[np.ndarray] = []
        self.norms_: list[np.ndarray] = []

    @classmethod
    def from_target(cls, T: np.ndarray, cfg: SelectionConfig, seed: int) -> GistSelector:
        return cls(fit_subspace(T, cfg.gist_rank, cfg.gist_energy))

    def consume(self, batch: StreamBatch) -> None:
        ids, rows = batch.kept()
        coords, norms = self.subspace.project(rows)
        self.ids_ += ids
        self.coords_.append(coords)
        self.norms_.append(norms)

    def projections(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, k) coordinates and (n,) norms: the whole stored state of the pool."""
        k = self.subspace.k
        if not self.coords_:
            return np.zeros((0, k), np.float32), np.zeros(0, np.float32)
        return np.concatenate(self.coords_), np.concatenate(self.norms_)

    def scores(self) -> np.ndarray:
        return self.subspace.score(*self.projections())

    def stored_bytes(self) -> int:
        return len(self.ids_) * (self.subspace.k + 1) * FLOAT_BYTES

    def info(self) -> dict[str, Any]:
        s = self.subspace
        return {
            "k": s.k,
            "energy": s.energy,
            "singular_values": s.singular_values.tolist(),
            **storage_bytes(len(self.ids_), s.k, s.basis.shape[0]),
        }

    def state(self) -> dict[str, Any]:
        coords, norms = self.projections()
        return {"ids": list(self.ids_), "coords": coords, "norms": norms}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ids_ = list(state["ids"])
        self.coords_, self.norms_ = [state["coords"]], [state["norms"]]


class LessSelector(Selector):
    """LESS-style: 8,192-dim random projections, cosine to the target's mean direction.

    Pool rows are projected in groups of ``flush_rows`` (the projection matrix is regenerated
    from its seed for every call, so a few large calls cost far less than many small ones)."""

    method = "less"

    def __init__(
        self,
        direction: np.ndarray,
        dim: int,
        seed: int,
        name: str | None = None,
        flush_rows: int = 256,
    ):
        super().__init__(name)
        self.direction, self.dim, self.seed, self.flush_rows = direction, dim, seed, flush_rows
        self.projected_: list[np.ndarray] = []
        self.pending_: list[np.ndarray] = []

    @classmethod
    def from_target(cls, T: np.ndarray, cfg: SelectionConfig, seed: int) -> LessSelector:
        projector = baselines.less_projector(T.shape[1], cfg.less_dim, seed)
        direction = baselines.less_direction(baselines.project(projector, T))
        return cls(direction, T.shape[1], seed)

    @property
    def k(self) -> int:
        return len(self.direction)

    def consume(self, batch: StreamBatch) -> None:
        ids, rows = batch.kept()
        self.ids_ += ids
        self.pending_.append(np.asarray(rows, np.float32))
        if sum(len(p) for p in self.pending_) >= self.flush_rows:
            self._flush()

    def _flush(self) -> None:
        if self.pending_:
            projector = baselines.less_projector(self.dim, self.k, self.seed)
            self.projected_.append(baselines.project(projector, np.concatenate(self.pending_)))
            self.pending_ = []

    def scores(self) -> np.ndarray:
        self._flush()
        if not self.projected_:
            return np.zeros(0)
        return baselines.less_scores(np.concatenate(self.projected_), self.direction)

    def stored_bytes(self) -> int:
        return len(self.ids_) * self.k * FLOAT_BYTES

    def info(self) -> dict[str, Any]:
        return {"projection_dim": self.k}

    def state(self) -> dict[str, Any]:
        return {
            "ids": list(self.ids_),
            "projected": list(self.projected_),
            "pending": list(self.pending_),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.ids_ = list(state["ids"])
        self.projected_, self.pending_ = list(state["projected"]), list(state["pending"])


class RandomSelector(Selector):
    """Random selection: a seeded score per id (the floor every method must beat)."""

    method = "random"

    def __init__(self, seed: int, name: str | None = None):
        super().__init__(name)
        self.seed = seed

    @classmethod
    def from_target(cls, T: np.ndarray, cfg: SelectionConfig, seed: int) -> RandomSelector:
        return cls(seed)

    def consume(self, batch: StreamBatch) -> None:
        self.ids_ += batch.kept()[0]

    def scores(self) -> np.ndarray:
        return baselines.random_scores(self.ids_, self.seed)

    def state(self) -> dict[str, Any]:
        return {"ids": list(self.ids_)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ids_ = list(state["ids"])


class ScoredSelector(Selector):
    """Scores computed outside the gradient stream (G-SNR: every sample under each member of a
    LoRA ensemble, ``selection.gsnr``), ranked and written like every selector's."""

    method = "gsnr"

    def __init__(self, ids: list[str], scores: np.ndarray, info: dict[str, Any]):
        super().__init__()
        self.ids_, self._scores, self._info = list(ids), np.asarray(scores, np.float64), info

    def consume(self, batch: StreamBatch) -> None:
        raise TypeError("G-SNR scores come from its ensemble, not from the Stage II stream")

    def scores(self) -> np.ndarray:
        # NaN (a non-finite gradient under some member) ranks last
        return np.where(np.isnan(self._scores), -np.inf, self._scores)

    def info(self) -> dict[str, Any]:
        return self._info

    def state(self) -> dict[str, Any]:
        return {"ids": list(self.ids_), "scores": self._scores}

    def load_state(self, state: dict[str, Any]) -> None:
        self.ids_, self._scores = list(state["ids"]), np.asarray(state["scores"])


SELECTORS: dict[str, type[Selector]] = {
    c.method: c for c in (GistSelector, LessSelector, RandomSelector)
}  # consumers of the stream, built from the target's gradients
ENSEMBLE_SELECTORS: dict[str, type[Selector]] = {ScoredSelector.method: ScoredSelector}
assert set(SELECTORS) | set(ENSEMBLE_SELECTORS) == set(get_args(SelectionMethod)), (
    "config.SelectionMethod and the selectors"
)


def make_selector(method: str, T: np.ndarray, cfg: SelectionConfig, seed: int) -> Selector:
    """The selector named by ``selection.method``, fitted to target gradients T (m, d)."""
    if method not in SELECTORS:
        raise ValueError(f"selection.method: expected one of {sorted(SELECTORS)}, got {method!r}")
    return SELECTORS[method].from_target(T, cfg, seed)
