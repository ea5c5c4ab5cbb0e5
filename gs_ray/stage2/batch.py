"""A batch of per-sample gradients as it travels (``GradientBatch``), and the non-finite policy
applied where it is computed (``check_finite``). NumPy only: the centroid actor, the transports and
the row store use these without importing torch (``gs_ray.stage2.computer`` computes the rows).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class NonFiniteGradientError(ValueError):
    """A per-sample gradient holds NaN or Inf (``stage2.nonfinite: fail``)."""

    def __init__(self, ids: Sequence[str]):
        self.ids = list(ids)
        shown = ", ".join(self.ids[:10]) + (" ..." if len(self.ids) > 10 else "")
        super().__init__(
            f"non-finite (NaN/Inf) gradient for {len(self.ids)} sample(s): {shown}. Check these "
            "samples (empty or extreme responses) and the model's dtype, or set "
            "stage2.nonfinite: skip to leave them out of clustering."
        )


@dataclass
class GradientBatch:
    """A batch's gradients; rows of ``skipped`` samples are zero and must not be used."""

    G: np.ndarray  # (b, d) float32
    skipped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (b,) bool
    ids: list[str] = field(default_factory=list)  # the samples' ids, in row order (if known)

    def __post_init__(self) -> None:
        if self.skipped.shape != (len(self.G),):
            self.skipped = np.zeros(len(self.G), dtype=bool)

    @property
    def nbytes(self) -> int:
        return int(self.G.nbytes)

    def kept(self) -> np.ndarray:
        """The rows that take part in clustering."""
        return self.G[~self.skipped] if self.skipped.any() else self.G


def check_finite(G: np.ndarray, ids: Sequence[str], policy: str) -> GradientBatch:
    """Apply the non-finite policy to a batch of gradients whose rows belong to ``ids``."""
    bad = ~np.isfinite(G).all(axis=1)
    if not bad.any():
        return GradientBatch(G, ids=list(ids))
    bad_ids = [str(ids[i]) for i in np.flatnonzero(bad)]
    if policy != "skip":
        raise NonFiniteGradientError(bad_ids)
    log.warning("skipping %d sample(s) with non-finite gradients: %s", len(bad_ids), bad_ids[:10])
    G = G.copy()
    G[bad] = 0.0
    return GradientBatch(G, bad, list(ids))
