"""The baselines GIST is compared with, as pure functions: LESS-style scores and random scores.

* LESS (Xia et al. 2024, as ELREA and the GIST paper run it): every gradient is randomly
  projected to 8,192 dimensions (``core.gradients.RandomProjection``); a pool sample scores the
  cosine between its projected gradient and the mean of the target's unit projected gradients.
* Random: a seeded uniform score per sample id, independent of batch order and of the gradients.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from gs_ray.core.cosine import unit_rows
from gs_ray.core.gradients import RandomProjection


def less_projector(dim: int, k: int, seed: int) -> RandomProjection:
    """The seeded projection both the target and the pool go through (small row chunks: the
    (d, k) matrix is never held whole, 2,048 rows at a time)."""
    return RandomProjection(dim, k, seed=seed, chunk=2048)


def project(projector: RandomProjection, G: np.ndarray) -> np.ndarray:
    """(n, k) float32 projections of gradient rows G (n, d)."""
    return projector(torch.from_numpy(np.ascontiguousarray(G, dtype=np.float32))).numpy()


def less_direction(target_projected: np.ndarray) -> np.ndarray:
    """The mean of the target's unit projected gradients (k,), unit length."""
    mean = unit_rows(np.asarray(target_projected, dtype=np.float64)).mean(axis=0)
    return unit_rows(mean)


def less_scores(pool_projected: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Cosine of each projected pool gradient to the target direction (n,)."""
    return unit_rows(np.asarray(pool_projected, dtype=np.float64)) @ direction


def random_scores(ids: list[str], seed: int) -> np.ndarray:
    """A uniform [0, 1) score per id, a function of (seed, id) only."""
    return np.array([np.random.default_rng([seed, zlib.crc32(i.encode())]).random() for i in ids])
