"""Consumers of the Stage II gradient stream: one gradient pass, any number of readers.

Stage II computes every sample's LoRA gradient once. The GradientSpace clusterer (hosted by
``CentroidHost``) is the stream's built-in consumer: it decides the plan (validation batches,
online epochs, the final assignment pass). Any other consumer (GIST and LESS scorers, random
selection, later the spectra and G-SNR of ``gs_ray.selection``) reads the same batches where
they arrive, in the host, after the clusterer: on the final pass by default (every train and
test sample exactly once), or on the phases it names. It keeps its own state, hands it to
Stage II's checkpoints and takes it back on a resume, and writes its outputs into the run
directory.

Free of Ray and of any model: a consumer sees plain arrays, the sample ids and, when it asks for
them, the per-layer pieces of each row cut by the gradient layout (``GradientComputer.layout``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from gs_ray.rundir import RunDir
from gs_ray.stage2.plan import FINAL


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

    def feed(self, phase: str, epoch: int, t: int, idx: np.ndarray, G: np.ndarray,
             skipped: np.ndarray, ids: list[str]) -> None:  # fmt: skip
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
