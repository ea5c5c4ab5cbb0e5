"""What Stage II leaves behind, whichever executor ran it, and how it lands in the run directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gs_ray.core.clustering import GradientSpaceClustering
from gs_ray.rundir import SKIPPED


@dataclass
class Stage2Result:
    """The fitted clusterer (without its caches), one label per sample, the validation
    gradients, the gradient layout, what the executor reports (workers, passes, timings) and
    the other consumers of the gradient stream, with their final state."""

    clusterer: GradientSpaceClustering
    labels: np.ndarray  # (n_samples,) cluster, or SKIPPED
    val_grads: np.ndarray  # (n_val, d) float32
    layout: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    consumers: list[Any] = field(default_factory=list)  # the stream's other consumers, fed

    @property
    def k(self) -> int:
        return int(self.clusterer.n_clusters_)

    @property
    def skipped(self) -> np.ndarray:
        """Indices of the samples left out (non-finite gradients)."""
        return np.flatnonzero(self.labels == SKIPPED)
