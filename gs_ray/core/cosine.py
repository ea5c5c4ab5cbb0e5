"""The cosine geometry of gradient rows: unit rows, norms, cosine assignment to centres and
per-cluster sums. NumPy only (no scikit-learn): the gradient workers (stage2/transports.py,
stage2/collective.py) import these and nothing else of ``core/clustering.py``, whose estimator
needs scikit-learn (about 1.3 s of import in every worker process)."""

from __future__ import annotations

import numpy as np

ROW_EPS = 1e-12  # a row shorter than this is a zero row


def unit_rows(X: np.ndarray, eps: float = ROW_EPS) -> np.ndarray:
    """Rows scaled to unit length, in their own dtype (rows shorter than ``eps`` are divided by
    ``eps``: a zero row stays zero). The one unit-row normalisation outside the clusterer's
    float32 ``normalize_rows``."""
    X = np.asarray(X)
    return X / np.maximum(np.linalg.norm(X, axis=-1, keepdims=True), eps)


def row_norms(X: np.ndarray) -> np.ndarray:
    """``np.linalg.norm(X, axis=1)`` of a real 2-D array, the same bits, one temporary fewer
    (the centroid host computes it for every batch and for the centroids after every update)."""
    return np.sqrt(np.add.reduce(X * X, axis=1))


def normalize_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length rows (float32) and the original norms; zero rows stay zero."""
    X = np.asarray(X, dtype=np.float32)
    norms = row_norms(X)
    safe = np.where(norms > ROW_EPS, norms, 1.0)
    return X / safe[:, None], norms


def cosine_assign(
    Xn: np.ndarray, centers: np.ndarray, center_norms: np.ndarray | None = None
) -> np.ndarray:
    """argmax_k cos(x, c_k) for unit rows Xn; ties go to the lowest k. ``center_norms``:
    ``np.linalg.norm(centers, axis=1)`` when the caller already has it (a pass over (K, d))."""
    cn = row_norms(centers) if center_norms is None else center_norms
    sims = (Xn @ centers.T) / np.where(cn > ROW_EPS, cn, 1.0)[None, :]
    return np.argmax(sims, axis=1).astype(np.int64)


def cluster_sums(
    Xn: np.ndarray, labels: np.ndarray, n_clusters: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (K, d) float64 and counts (K,) of unit gradients (rows where keep)."""
    keep = np.ones(len(Xn), dtype=bool) if keep is None else keep
    onehot = np.zeros((n_clusters, len(Xn)), dtype=np.float64)
    onehot[labels[keep], np.flatnonzero(keep)] = 1.0
    return onehot @ Xn.astype(np.float64), onehot.sum(1).astype(np.int64)
