"""Consumers of the Stage II gradient stream: one gradient pass, any number of readers.

Stage II computes every sample's LoRA gradient once. Every reader of it is a
``GradientConsumer``. The GradientSpace clusterer is one (``ClusteringConsumer``): it reads all
three phases (validation gradients for K, the online epochs, the final assignment) and, being the
one whose plan the pass follows, is always first and is asked by the host to initialise and to
close epochs. Any other consumer (the GIST, LESS and random selectors of ``gs_ray.selection``)
reads the same batches where they arrive, in the host, after the clusterer: on the final pass by
default (every train and test sample exactly once), or on the phases it names. Each keeps its own
state, hands it to Stage II's checkpoints and takes it back on a resume, and writes its outputs
into the run directory.

Free of Ray and of any model: a consumer sees plain arrays, the sample ids and, when it asks for
them, the per-layer pieces of each row cut by the gradient layout (``GradientComputer.layout``).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gs_ray.core.clustering import GradientSpaceClustering
from gs_ray.io import write_json
from gs_ray.rundir import SKIPPED, UNASSIGNED, RunDir
from gs_ray.stage2.plan import FINAL, ONLINE, VAL

log = logging.getLogger(__name__)


@dataclass
class StreamBatch:
    """One planned batch of the stream as a consumer sees it."""

    phase: str  # val | online | final (gs_ray.stage2.plan)
    epoch: int
    t: int
    idx: np.ndarray  # (b,) indices into the sample list
    ids: list[str]  # (b,) sample ids
    G: np.ndarray  # (b, d) float32; rows of skipped samples are zero
    skipped: np.ndarray  # (b,) bool: non-finite gradients (stage2.nonfinite: skip)
    layout: dict[str, Any] | None = None  # GradientComputer.layout(), when known

    def kept(self) -> tuple[list[str], np.ndarray]:
        """(ids, rows) of the samples whose gradients are usable."""
        keep = ~self.skipped
        return [i for i, k in zip(self.ids, keep) if k], self.G[keep]

    def layers(self) -> dict[str, np.ndarray]:
        """The kept rows cut into named parameter-shaped pieces: name -> (b_kept, *shape)."""
        return split_rows(self.kept()[1], self.layout)


def split_rows(rows: np.ndarray, layout: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """Unflatten gradient rows by a layout (the engine's parameter order, offsets and shapes),
    as ``LoRAGradientEngine.split`` does for a tensor; projected gradients have no layers."""
    if not layout or "offsets" not in layout:
        raise ValueError("the gradient layout is unknown: per-layer pieces are not available")
    if layout.get("projection_dim"):
        raise ValueError("gradients are randomly projected (gradients.projection_dim): no layers")
    offsets = layout["offsets"]
    return {
        name: rows[:, lo:hi].reshape(len(rows), *shape)
        for name, shape, lo, hi in zip(
            layout["param_names"], layout["shapes"], offsets[:-1], offsets[1:]
        )
    }


class GradientConsumer(ABC):
    """A reader of the gradient stream (scikit-learn spirit: settings in ``__init__``, learned
    state ending in ``_``).

    ``name`` names its outputs and its slot in checkpoints (unique among the consumers of one
    pass); ``phases`` are the plan phases it reads (default: the final pass, where every train
    and test sample passes once); ``wants_layers`` asks for the layout (per-layer pieces)."""

    name: str = "consumer"
    phases: ClassVar[frozenset[str]] = frozenset({FINAL})
    wants_layers: ClassVar[bool] = False

    @abstractmethod
    def consume(self, batch: StreamBatch) -> None:
        """Read one batch (each planned batch arrives once, in plan order)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything needed to resume (picklable; saved in Stage II's checkpoints)."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore from ``state()``."""

    @abstractmethod
    def write(self, run: RunDir) -> dict[str, Any]:
        """Write the outputs into the run directory; returns a summary for metrics.json."""


class ClusteringConsumer(GradientConsumer):
    """The GradientSpace clusterer as a reader of the stream (exact transport).

    Validation batches: kept for K selection (SVD + silhouette when the phase ends, ``initialize``
    by the host); online batches: ``partial_fit`` (cosine assignment, FIFO cache, EMA); the final
    pass: one label per sample (``SKIPPED`` for a non-finite gradient). Learned state: the
    clusterer, ``labels_`` and ``val_grads_``. The partial-sums and collective transports update
    the same clusterer from reduced sums instead of rows (``CentroidHost.enter_sums``,
    ``stage2.collective``); only what reaches the host as rows passes through ``consume``."""

    name = "clustering"
    phases: ClassVar[frozenset[str]] = frozenset({VAL, ONLINE, FINAL})

    def __init__(self, clusterer: GradientSpaceClustering, n_samples: int):
        self.clusterer = clusterer
        self.labels_ = np.full(n_samples, UNASSIGNED, dtype=np.int64)
        self.val_grads_: list[np.ndarray] = []

    def consume(self, batch: StreamBatch) -> None:
        rows = batch.G[~batch.skipped] if batch.skipped.any() else batch.G
        if batch.phase == VAL:
            self.val_grads_.append(np.asarray(rows, dtype=np.float32))
        elif batch.phase == ONLINE:
            if len(rows):
                self.clusterer.partial_fit(rows)
        else:
            self.labels_[batch.idx[batch.skipped]] = SKIPPED
            if len(rows):
                self.labels_[batch.idx[~batch.skipped]] = self.clusterer.predict(rows)

    def initialize(self) -> None:
        """K by SVD + silhouette on the validation gradients read so far (once)."""
        if not hasattr(self.clusterer, "cluster_centers_"):
            self.clusterer.initialize(np.concatenate(self.val_grads_))

    def state(self, copy: bool = True) -> dict[str, Any]:
        """``copy=False``: the live arrays, for a checkpoint written at once (no 0.7 GB copy
        of a K = 16 exact cache before each write)."""
        return {
            "clusterer": self.clusterer.state_dict(copy),
            "labels": self.labels_.copy() if copy else self.labels_,
            "val_grads": [g.copy() for g in self.val_grads_] if copy else list(self.val_grads_),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.clusterer.load_state_dict(state["clusterer"])
        self.labels_ = state["labels"].copy()
        self.val_grads_ = list(state["val_grads"])

    def write(self, run: RunDir) -> dict[str, Any]:
        """The clusterer's own outputs: the K-selection table (stage2/k_selection.json) and the
        centroids (stage2/centroids.npy); returns its summary. The assignments, which need the
        run's splits, are written by ``stage2.stage``."""
        summary = self.clusterer.summary()
        write_json(
            run.k_selection_json,
            {
                "table": summary["k_selection"],
                "chosen": {
                    key: summary[key] for key in ("k", "threshold", "n_components", "silhouette")
                },
                **{
                    key: summary[key]
                    for key in ("explained_variance_ratio", "singular_values")
                    if key in summary
                },
                **{key: summary[key] for key in ("min_cluster_size", "single_cluster_reason")},
                "structure": summary.get("structure"),
            },
        )
        if summary.get("structure"):  # the console's word on how strong the clusters are
            log.info("K selection: %s", summary["structure"]["verdict"])
        np.save(run.centroids_path, self.clusterer.cluster_centers_)
        return summary


class ConsumerSet:
    """The consumers of one pass: feeds each the phases it reads, gathers their states."""

    def __init__(self, consumers: Iterable[GradientConsumer] = ()):
        self.consumers = list(consumers)
        names = [c.name for c in self.consumers]
        if len(set(names)) != len(names):
            raise ValueError(f"consumer names must be unique, got {names}")
        self.layout: dict[str, Any] | None = None

    def __iter__(self):
        return iter(self.consumers)

    def __len__(self) -> int:
        return len(self.consumers)

    def set_layout(self, layout: dict[str, Any]) -> None:
        """The gradient layout; a consumer that wants layers of projected gradients fails now."""
        self.layout = layout
        for c in self.consumers:
            if c.wants_layers:
                split_rows(np.zeros((0, layout.get("dim", 0)), np.float32), layout)

    def feed(
        self,
        phase: str,
        epoch: int,
        t: int,
        idx: np.ndarray,
        G: np.ndarray,
        skipped: np.ndarray,
        ids: list[str],
    ) -> None:
        """One batch to every consumer that reads ``phase``."""
        readers = [c for c in self.consumers if phase in c.phases]
        if not readers:
            return
        batch = StreamBatch(phase, epoch, t, np.asarray(idx), list(ids), G, skipped, self.layout)
        for c in readers:
            c.consume(batch)

    def state(self) -> dict[str, Any]:
        return {c.name: c.state() for c in self.consumers}

    def load_state(self, state: dict[str, Any]) -> None:
        for c in self.consumers:
            if c.name in state:
                c.load_state(state[c.name])

    def write(self, run: RunDir) -> dict[str, Any]:
        return {c.name: c.write(run) for c in self.consumers}
