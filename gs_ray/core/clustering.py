"""The GradientSpace clusterer (paper Section 5.3): pure NumPy + scikit-learn, no Ray, no model.

An estimator in the scikit-learn style, on plain (n, d) arrays of per-sample gradients:

1. ``initialize(G_val)`` - K and initial centroids. SVD of the validation gradients; for each
   variance threshold the fewest components k_v whose explained variance reaches it; K-means
   (scikit-learn) on the projection G V_k for each candidate K; silhouette (scikit-learn). The best
   silhouette picks K and the subspace; its K-means centroids, lifted back with V_k, are the
   initial centroids. The full table is kept in ``k_selection_``.
2. ``partial_fit(G_batch)`` - one online step on a mini-batch B_t: assign each gradient to
   argmax_k cos(g, c_k), push it into the FIFO cluster cache C_k (|C_k| = alpha * batch_size), then
   c_k <- beta * c_k + (1 - beta) * mean(C_k) for every cluster whose cache is not empty.
   ``end_epoch()`` measures the centroid shift of the epoch and says whether it converged.
3. ``predict(G)`` - the final assignment, argmax_k cos(g, c_k).

Cosine-consistent reading: the method compares gradients by direction only, so every gradient
is scaled to unit length before it enters the SVD, K-means or a cache (per-sample gradient norms
spread over orders of magnitude and would otherwise dominate the means). Zero gradients have no
direction: they are left out of the SVD and of the caches, and ``predict`` gives them cluster 0
(counted in ``n_zero_gradients_``).

Memory of the online state: the exact cache holds K * alpha * batch_size * d float32 numbers,
plus K * d float64 running sums and K * d float32 centroids (e.g. K=7, alpha=5, |B|=32,
d=65,536: 0.3 GB; for Llama-3.2-1B with r=32 on q/v, d=3.4M: 15 GB). With the external cache the
estimator keeps only the running sums, the centroids and a ledger of K * alpha * batch_size
(batch, row) pairs; the vectors stay where they were computed - see docs/scaling.md.
"""

from __future__ import annotations

import copy
import warnings
from collections import deque
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import silhouette_score

_EPS = 1e-12


class DegenerateGradientsError(ValueError):
    """The gradients do not contain enough distinct directions to cluster."""


def normalize_rows(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit-length rows (float32) and the original norms; zero rows stay zero."""
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1)
    safe = np.where(norms > _EPS, norms, 1.0)
    return X / safe[:, None], norms


def cosine_assign(Xn: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """argmax_k cos(x, c_k) for unit rows Xn; ties go to the lowest k."""
    cn = np.linalg.norm(centers, axis=1)
    sims = (Xn @ centers.T) / np.where(cn > _EPS, cn, 1.0)[None, :]
    return np.argmax(sims, axis=1).astype(np.int64)


class GradientSpaceClustering:
    """Online SVD-initialised clustering of gradients (see module docstring).

    Parameters
    ----------
    n_clusters : fixed K, or None to choose K by silhouette over ``k_range``.
    k_range : (k_min, k_max) candidate K values, inclusive.
    variance_thresholds : explained-variance thresholds for the SVD subspace.
    alpha : cluster cache size factor, |C_k| = alpha * batch_size (paper: 5-10).
    beta : EMA factor in c_k <- beta * c_k + (1 - beta) * mean(C_k).
    batch_size : |B_t|, samples per online update (used for the cache size and by ``fit``).
    max_epochs, tol : online epochs stop when the largest centroid shift (1 - cosine between the
        centroids at the start and at the end of an epoch) is below ``tol``, or after max_epochs.
    n_init : K-means restarts per candidate.
    random_state : seed for K-means and for ``fit``'s per-epoch shuffles.
    cache : "samples" - the cluster caches hold the alpha * batch_size most recent unit
        gradients of each cluster here; "external" - the same caches, but only as a ledger of
        (batch, row) entries plus running sums: the vectors stay with whoever computed them
        (the gradient workers), who send per-cluster sums of what enters and of what the ledger
        evicts (``push_ledger`` + ``partial_fit_external``). Both give the same centroids up to
        floating-point rounding; "external" takes the cache memory and most of the per-batch
        work off the centroid host.
    """

    def __init__(
        self,
        n_clusters: int | None = None,
        k_range: tuple[int, int] = (2, 8),
        variance_thresholds: tuple[float, ...] = (0.80, 0.85, 0.90, 0.95),
        alpha: int = 5,
        beta: float = 0.9,
        batch_size: int = 32,
        max_epochs: int = 3,
        tol: float = 1e-3,
        n_init: int = 10,
        random_state: int = 0,
        cache: str = "samples",
    ):
        self.n_clusters = n_clusters
        self.k_range = k_range
        self.variance_thresholds = variance_thresholds
        self.alpha = alpha
        self.beta = beta
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.tol = tol
        self.n_init = n_init
        self.random_state = random_state
        self.cache = cache

    # ------------------------------------------------------------------ step 1: K and init

    def initialize(self, G_val: np.ndarray) -> GradientSpaceClustering:
        """Choose K and the initial centroids from validation gradients (n_val, d)."""
        self._check_params()
        Xn, norms = normalize_rows(G_val)
        Xn = Xn[norms > _EPS]
        n = len(Xn)
        k_min, k_max = self.k_range
        if self.n_clusters is not None:
            candidates = [self.n_clusters]
        else:
            candidates = list(range(k_min, min(k_max, n - 1) + 1))
        if n < 3 or not candidates or n <= min(candidates):
            raise DegenerateGradientsError(
                f"{n} non-zero validation gradients are too few to choose among K={candidates or k_min}: "
                "use a larger data.n_val or fewer clusters"
            )
        _, s, Vt = np.linalg.svd(Xn.astype(np.float64), full_matrices=False)
        energy = s**2
        total = energy.sum()
        if total <= _EPS:
            raise DegenerateGradientsError("all validation gradients are zero")
        ratio = np.cumsum(energy) / total
        self.singular_values_ = s
        self.explained_variance_ratio_ = ratio
        rows: list[dict[str, Any]] = []
        fits: dict[tuple[int, int], tuple[float, np.ndarray, np.ndarray]] = {}
        for threshold in self.variance_thresholds:
            k_v = int(min(np.searchsorted(ratio, threshold - 1e-9) + 1, len(s)))
            P = Xn @ Vt[:k_v].T.astype(np.float32)
            for K in candidates:
                if (k_v, K) not in fits:
                    fits[(k_v, K)] = self._kmeans_silhouette(P, K)
                score = fits[(k_v, K)][0]
                rows.append(
                    {
                        "threshold": float(threshold),
                        "n_components": k_v,
                        "k": K,
                        "silhouette": score,
                    }
                )
        self.k_selection_ = rows
        valid = [r for r in rows if np.isfinite(r["silhouette"])]
        if not valid:
            if self.n_clusters is None:
                raise DegenerateGradientsError(
                    "no candidate K gave two or more distinct clusters: the validation gradients "
                    "point in (nearly) one direction; fix clustering.n_clusters to force a K"
                )
            valid = rows[:1]  # K is fixed by the user: keep the first subspace's K-means
        # Best silhouette; ties go to the smaller K, then the smaller subspace.
        best = max(
            valid,
            key=lambda r: (np.nan_to_num(r["silhouette"], nan=-2), -r["k"], -r["n_components"]),
        )
        self.n_clusters_ = best["k"]
        self.threshold_ = best["threshold"]
        self.n_components_ = best["n_components"]
        self.silhouette_ = best["silhouette"]
        _, centers_proj, init_labels = fits[(best["n_components"], best["k"])]
        self.init_labels_ = init_labels
        # Lift back: V_k c is the projection of the members' mean direction onto the subspace.
        self.cluster_centers_ = (centers_proj @ Vt[: best["n_components"]]).astype(np.float32)
        self._reset_online_state(Xn.shape[1])
        return self

    def _kmeans_silhouette(self, P: np.ndarray, K: int) -> tuple[float, np.ndarray, np.ndarray]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=K, n_init=self.n_init, random_state=self.random_state).fit(P)
        labels = km.labels_
        distinct = len(np.unique(labels))
        score = float(silhouette_score(P, labels)) if 2 <= distinct < len(P) else float("nan")
        return score, km.cluster_centers_.astype(np.float64), labels

    def _check_params(self) -> None:
        if self.n_clusters is not None and self.n_clusters < 1:
            raise ValueError(f"n_clusters must be >= 1, got {self.n_clusters}")
        if not 0 <= self.beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {self.beta}")
        if self.alpha < 1 or self.batch_size < 1:
            raise ValueError("alpha and batch_size must be >= 1")
        if not all(0 < t <= 1 for t in self.variance_thresholds):
            raise ValueError(f"variance thresholds must be in (0, 1]: {self.variance_thresholds}")
        if self.cache not in ("samples", "external"):
            raise ValueError(f"cache must be 'samples' or 'external', got {self.cache!r}")
        if self.k_range[0] < 2 or self.k_range[1] < self.k_range[0]:
            raise ValueError(f"k_range must satisfy 2 <= k_min <= k_max, got {self.k_range}")

    # ------------------------------------------------------------------ step 2: online calibration

    @property
    def cache_size(self) -> int:
        """|C_k| = alpha * |B_t|."""
        return int(self.alpha * self.batch_size)

    def _reset_online_state(self, dim: int) -> None:
        K, cap = self.n_clusters_, self.cache_size
        if self.cache == "samples":
            self.cache_ = np.zeros((K, cap, dim), dtype=np.float32)
            self.cache_next_ = np.zeros(K, dtype=np.int64)  # ring position of the next write
        else:  # external: the FIFO of (batch step, row) entries per cluster
            self.ledger_: list[deque] = [deque() for _ in range(K)]
        self.cache_count_ = np.zeros(K, dtype=np.int64)
        self._cache_sum = np.zeros((K, dim), dtype=np.float64)
        self.n_batches_seen_ = 0
        self.n_samples_seen_ = 0
        self.n_zero_gradients_ = 0
        self.epoch_ = 0
        self.shift_history_: list[float] = []
        self.converged_ = False
        self._epoch_start = self.cluster_centers_.copy()

    def _push(self, k: int, x: np.ndarray) -> None:
        """FIFO: write x at the ring position, evicting the oldest entry when full."""
        pos = self.cache_next_[k]
        if self.cache_count_[k] == self.cache_size:
            self._cache_sum[k] -= self.cache_[k, pos]
        else:
            self.cache_count_[k] += 1
        self.cache_[k, pos] = x
        self._cache_sum[k] += x
        self.cache_next_[k] = (pos + 1) % self.cache_size
        if self.cache_next_[k] == 0:  # wrapped: refresh the running sum exactly
            self._cache_sum[k] = self.cache_[k, : self.cache_count_[k]].sum(0, dtype=np.float64)

    def cache_mean(self, k: int) -> np.ndarray | None:
        """mean(C_k), or None for an empty cache."""
        if self.cache_count_[k] == 0:
            return None
        return self._cache_sum[k] / self.cache_count_[k]

    def _check_online(self, cache: str) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("call initialize(G_val) before partial_fit")
        if self.cache != cache:
            raise ValueError(f"this update needs cache={cache!r}, the estimator has {self.cache!r}")

    def _ema(self, batch_size: int) -> None:
        """c_k <- beta * c_k + (1 - beta) * mean(C_k) for every cluster with a non-empty cache."""
        for k in range(self.n_clusters_):
            mean = self.cache_mean(k)
            if mean is not None:
                self.cluster_centers_[k] = (
                    self.beta * self.cluster_centers_[k] + (1 - self.beta) * mean
                ).astype(np.float32)
        self.n_batches_seen_ += 1
        self.n_samples_seen_ += batch_size

    def partial_fit(self, G_batch: np.ndarray) -> GradientSpaceClustering:
        """One online update with a mini-batch of gradients (b, d); returns self.

        The batch's labels (assigned before the update) are in ``last_labels_``.
        """
        self._check_online("samples")
        Xn, norms = normalize_rows(G_batch)
        labels = cosine_assign(Xn, self.cluster_centers_)
        nonzero = norms > _EPS
        self.n_zero_gradients_ += int((~nonzero).sum())
        for x, k, ok in zip(Xn, labels, nonzero):
            if ok:
                self._push(int(k), x)
        self._ema(len(Xn))
        self.last_labels_ = labels
        return self

    # ------------------------------------------------------------------ external cache

    def push_ledger(
        self, step: int, labels: np.ndarray, keep: np.ndarray
    ) -> dict[int, list[tuple[int, int]]]:
        """External cache, first half of an update: enter batch ``step``'s kept rows into their
        clusters' FIFO ledgers; return the entries that fall out as {step: [(row, k), ...]}."""
        self._check_online("external")
        for row in np.flatnonzero(keep):
            self.ledger_[int(labels[row])].append((step, int(row)))
        evicted: dict[int, list[tuple[int, int]]] = {}
        for k, ledger in enumerate(self.ledger_):
            while len(ledger) > self.cache_size:
                old_step, row = ledger.popleft()
                evicted.setdefault(old_step, []).append((row, k))
        return evicted

    def partial_fit_external(
        self,
        added: np.ndarray,
        evicted: np.ndarray,
        batch_size: int,
        n_zero: int = 0,
    ) -> GradientSpaceClustering:
        """External cache, second half: per-cluster sums (K, d) of the unit gradients that
        entered (``cluster_sums`` of the batch) and of those ``push_ledger`` evicted."""
        self._check_online("external")
        self._cache_sum += np.asarray(added, dtype=np.float64) - evicted
        self.cache_count_ = np.array([len(ledger) for ledger in self.ledger_], dtype=np.int64)
        self.n_zero_gradients_ += n_zero
        self._ema(batch_size)
        return self

    def oldest_live_step(self) -> int | None:
        """The oldest batch step still present in some cache (external cache)."""
        heads = [ledger[0][0] for ledger in self.ledger_ if ledger]
        return min(heads) if heads else None

    def end_epoch(self) -> bool:
        """Close an online epoch: record the centroid shift; True when converged."""
        a, b = self._epoch_start, self.cluster_centers_
        cos = (a * b).sum(1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), _EPS
        )
        shift = float(np.max(1.0 - cos))
        self.shift_history_.append(shift)
        self.epoch_ += 1
        self._epoch_start = self.cluster_centers_.copy()
        self.converged_ = shift < self.tol
        return self.converged_

    # ------------------------------------------------------------------ step 3: assignment

    def predict(self, G: np.ndarray) -> np.ndarray:
        """Final assignment: argmax_k cos(g, c_k); zero gradients go to cluster 0."""
        Xn, _ = normalize_rows(G)
        return cosine_assign(Xn, self.cluster_centers_)

    def fit(self, G: np.ndarray, G_val: np.ndarray | None = None, init_size: int = 256):
        """All three steps on an in-memory array: init on G_val (or a random subset of G),
        online epochs over shuffled mini-batches, then ``labels_ = predict(G)``."""
        G = np.asarray(G, dtype=np.float32)
        rng = np.random.default_rng(self.random_state)
        if G_val is None:
            G_val = G[rng.choice(len(G), size=min(init_size, len(G)), replace=False)]
        self.initialize(G_val)
        for _ in range(self.max_epochs):
            order = rng.permutation(len(G))
            for start in range(0, len(G), self.batch_size):
                self.partial_fit(G[order[start : start + self.batch_size]])
            if self.end_epoch():
                break
        self.labels_ = self.predict(G)
        return self

    # ------------------------------------------------------------------ checkpoints

    _STATE = (
        "n_clusters_", "threshold_", "n_components_", "silhouette_", "cluster_centers_",
        "cache_", "cache_count_", "cache_next_", "ledger_", "_cache_sum", "n_batches_seen_",
        "n_samples_seen_", "n_zero_gradients_", "epoch_", "shift_history_", "converged_",
        "_epoch_start", "k_selection_", "explained_variance_ratio_", "singular_values_",
    )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Everything learned so far (arrays copied), for checkpoints."""
        return {k: _copy(getattr(self, k)) for k in self._STATE if hasattr(self, k)}

    def load_state_dict(self, state: dict[str, Any]) -> GradientSpaceClustering:
        """Restore what ``state_dict`` returned."""
        for k, v in state.items():
            setattr(self, k, _copy(v))
        return self


def _copy(v: Any) -> Any:
    return copy.deepcopy(v)


def cluster_sums(
    Xn: np.ndarray, labels: np.ndarray, n_clusters: int, keep: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (K, d) float64 and counts (K,) of unit gradients (rows where keep)."""
    keep = np.ones(len(Xn), dtype=bool) if keep is None else keep
    onehot = np.zeros((n_clusters, len(Xn)), dtype=np.float64)
    onehot[labels[keep], np.flatnonzero(keep)] = 1.0
    return onehot @ Xn.astype(np.float64), onehot.sum(1).astype(np.int64)


def within_cluster_variance(G: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Theorem 2 check: mean squared distance to the mean, globally and per cluster.

    Computed on unit-length gradients (the geometry the clustering uses).
    """
    Xn, _ = normalize_rows(G)
    glob = float(((Xn - Xn.mean(0)) ** 2).sum(1).mean())
    per = {}
    for k in np.unique(labels):
        Z = Xn[labels == k]
        per[int(k)] = float(((Z - Z.mean(0)) ** 2).sum(1).mean())
    return {"global": glob, "per_cluster": per}
