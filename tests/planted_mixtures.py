"""Seeded planted mixtures for the K-selection rule (tests and docs/clustering_k.md).

Rows look like per-sample gradients: a direction per cluster, isotropic noise, and norms spread
over orders of magnitude (the clusterer only sees directions). Every generator returns
``(X float32 (n, d), y int64 (n,))``; y is the planted cluster (0 for one-cluster data).
"""

from __future__ import annotations

import numpy as np


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """k orthonormal directions in R^d (rows)."""
    Q, _ = np.linalg.qr(rng.standard_normal((d, k)))
    return Q.T


def _shares(k: int, ratio: float) -> np.ndarray:
    """Unequal cluster shares: geometric, largest / smallest = ratio."""
    w = ratio ** (-np.arange(k) / max(1, k - 1))
    return w / w.sum()


def _sizes(n: int, k: int, ratio: float) -> np.ndarray:
    sizes = np.floor(_shares(k, ratio) * n).astype(int)
    sizes[0] += n - sizes.sum()
    return sizes


def _norms(rng: np.random.Generator, n: int, decades: float) -> np.ndarray:
    return 10.0 ** rng.uniform(-decades, 0.0, n)


def mixture(
    seed: int = 0,
    n: int = 512,
    d: int = 256,
    k: int = 5,
    cos: float = 0.0,
    noise: float = 1.0,
    size_ratio: float = 4.0,
    decades: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """K planted clusters: centre directions mu_k = sqrt(cos) c + sqrt(1 - cos) u_k (c, u_k
    orthonormal), so every pair of centres has cosine ``cos`` (0: orthogonal, 0.5: overlapping);
    row = norm * (mu_k + noise * z / sqrt(d)), z standard normal: ``noise`` is the noise norm
    relative to the centre's (1). Sizes geometric, largest/smallest = ``size_ratio``."""
    rng = np.random.default_rng(seed)
    Q = _orthonormal(rng, d, k + 1)
    mu = np.sqrt(cos) * Q[0] + np.sqrt(1.0 - cos) * Q[1:]
    y = np.repeat(np.arange(k), _sizes(n, k, size_ratio))
    Z = rng.standard_normal((n, d)) / np.sqrt(d)
    X = _norms(rng, n, decades)[:, None] * (mu[y] + noise * Z)
    return X.astype(np.float32), y.astype(np.int64)


def one_cluster(
    seed: int = 0,
    n: int = 512,
    d: int = 256,
    kind: str = "gaussian",
    noise: float = 1.0,
    decades: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """A single cluster around one direction: ``gaussian`` (isotropic noise), ``anisotropic``
    (noise covariance with eigenvalues decaying as 1/j over a random basis: a few strong
    directions, as in real gradients), ``heavy`` (isotropic noise scaled per row by a Student t
    factor with 2 degrees of freedom: many near the centre, some far out)."""
    rng = np.random.default_rng(seed)
    mu = _orthonormal(rng, d, 1)[0]
    Z = rng.standard_normal((n, d))
    if kind == "anisotropic":
        r = min(d, 64)
        lam = 1.0 / np.arange(1, r + 1)
        basis = _orthonormal(rng, d, r)
        Z = (Z[:, :r] * np.sqrt(lam / lam.sum() * d)) @ basis  # same total noise energy
    elif kind == "heavy":
        Z = Z * (1.0 / np.sqrt(rng.chisquare(2, n) / 2))[:, None]
    elif kind != "gaussian":
        raise ValueError(f"kind: gaussian | anisotropic | heavy, got {kind!r}")
    X = _norms(rng, n, decades)[:, None] * (mu[None, :] + noise * Z / np.sqrt(d))
    return X.astype(np.float32), np.zeros(n, dtype=np.int64)


def structureless(seed: int = 0, n: int = 512, d: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """No structure at all: isotropic Gaussian rows (directions uniform on the sphere)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)) * _norms(rng, n, 1.0)[:, None]
    return X.astype(np.float32), np.zeros(n, dtype=np.int64)


def make(case: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A case as a dict: {"gen": "mixture" | "one_cluster" | "structureless", **kwargs}."""
    kwargs = {k: v for k, v in case.items() if k != "gen"}
    gen = {"mixture": mixture, "one_cluster": one_cluster, "structureless": structureless}
    return gen[case["gen"]](seed=seed, **kwargs)
