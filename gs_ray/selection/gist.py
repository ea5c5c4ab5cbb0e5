"""GIST (arXiv 2602.18584): targeted data selection by the target task's gradient subspace.

Pure NumPy, no model and no Ray. Given the LoRA gradients of a small target set T (m, d):

1. ``fit_subspace``: SVD of T; spectral filtering keeps the top k right singular vectors, k fixed
   or the smallest k whose squared singular values reach an energy share (default 0.9).
2. ``TargetSubspace.project``: a pool gradient g becomes its k coordinates V_k^T g plus its norm
   (k + 1 floats are all that is stored per pool sample).
3. ``TargetSubspace.score``: alignment of the unit pool gradient with the target directions,

       score(g) = sum_j w_j (v_j . g / |g|)^2,   w_j = s_j^2 / sum_{l<=k} s_l^2,

   a number in [0, w_1]. Why this one (docs/selection.md): sum_j s_j^2 (v_j . x)^2 = |T_k x|^2 is
   the sum over target samples of the squared first-order influence <t, x> with the spectrally
   filtered target gradients T_k, so the score is "how much, per unit of gradient norm, does this
   sample move the target loss along the directions that carry the target's gradient energy".
   It is invariant to the arbitrary signs of singular vectors, ignores the pool gradient's norm
   (short samples have large gradients, as LESS notes) and leaves out the noise directions that
   spectral filtering drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLOAT_BYTES = 4  # stored projections are float32
LESS_DIM = 8192  # LESS's projection dimension (the storage comparison's reference)


@dataclass
class TargetSubspace:
    """The target's top-k gradient directions (d, k) and their singular values (k,)."""

    basis: np.ndarray  # (d, k) float32, orthonormal columns
    singular_values: np.ndarray  # (k,) descending
    energy: float  # share of the target's squared singular values the k directions hold

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def weights(self) -> np.ndarray:
        """w_j = s_j^2 / sum s^2 over the kept directions."""
        s2 = self.singular_values.astype(np.float64) ** 2
        return s2 / max(s2.sum(), 1e-30)

    def project(self, G: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(coordinates (n, k) float32, norms (n,) float32) of pool gradients G (n, d)."""
        G = np.asarray(G, dtype=np.float32)
        return G @ self.basis, np.linalg.norm(G, axis=1).astype(np.float32)

    def score(self, coords: np.ndarray, norms: np.ndarray) -> np.ndarray:
        """GIST scores (n,) of projected pool gradients (see the module docstring); a zero
        gradient scores 0."""
        unit = coords.astype(np.float64) / np.maximum(norms.astype(np.float64), 1e-30)[:, None]
        return (unit**2) @ self.weights


def fit_subspace(T: np.ndarray, rank: int | None = None, energy: float = 0.9) -> TargetSubspace:
    """The target subspace of target gradients T (m, d): the top ``rank`` right singular vectors,
    or (``rank`` None) the fewest whose squared singular values reach ``energy`` of the total.

    The target gradients are not centred: their mean direction is part of what the task asks
    of the adapter."""
    T = np.asarray(T, dtype=np.float64)
    if T.ndim != 2 or len(T) == 0:
        raise ValueError(f"target gradients must be a non-empty (m, d) matrix, got {T.shape}")
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    _, s, vt = np.linalg.svd(T, full_matrices=False)
    s2 = s**2
    total = s2.sum()
    if total <= 0:
        raise ValueError("the target gradients are all zero")
    live = int((s > s[0] * 1e-6).sum())
    by_energy = int(np.searchsorted(np.cumsum(s2) / total, energy - 1e-12) + 1)
    k = max(1, min(by_energy if rank is None else rank, live))
    return TargetSubspace(
        basis=vt[:k].T.astype(np.float32),
        singular_values=s[:k].astype(np.float32),
        energy=float(s2[:k].sum() / total),
    )


def storage_bytes(n_pool: int, k: int, dim: int) -> dict[str, int | float]:
    """What GIST stores (n_pool * (k + 1) floats and the (dim, k) basis) against a LESS-style
    store of 8,192-dim random projections (n_pool * 8192 floats)."""
    gist = n_pool * (k + 1) * FLOAT_BYTES + dim * k * FLOAT_BYTES
    less = n_pool * LESS_DIM * FLOAT_BYTES
    return {"gist_bytes": gist, "less_8192_bytes": less, "gist_over_less": gist / max(less, 1)}
