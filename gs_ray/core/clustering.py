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
   ``end_epoch()`` closes an epoch and says whether the assignments converged.
3. ``predict(G)`` - the final assignment, argmax_k cos(g, c_k).

Cosine-consistent reading: the method compares gradients by direction only, so every gradient
is scaled to unit length before it enters the SVD, K-means or a cache (per-sample gradient norms
spread over orders of magnitude and would otherwise dominate the means). Zero gradients have no
direction: they are left out of the SVD and of the caches, and ``predict`` gives them cluster 0
(counted in ``n_zero_gradients_``).

A cluster must be worth having (K selection). The minimum cluster size is
``m(n) = max(min_cluster_size, ceil(min_cluster_share * n))`` for n non-zero rows. For every
(subspace, K) candidate, ``n_init`` single K-means runs (seeds random_state, random_state+1, ...)
are scored by one rule: a run is *valid* when it has K non-empty clusters, none under m(n); the
candidate keeps its valid run with the best silhouette, and a candidate with no valid run is
rejected (``rejected``/``reason`` in its ``k_selection_`` row, with the sizes of its least bad run).
Structure has to beat a structureless reference (``null_draws`` > 0, the default; the gap
statistic's idea, docs/k_selection.md). The same SVD, subspace sizes, K-means runs and validity
rule are applied to ``null_draws`` one-cluster data sets drawn like the validation gradients:
each row keeps its cosine with the mean direction (so the spread of angles, heavy tails
included, is the data's), and its remaining direction is drawn from an angular Gaussian with the
second moments of the data's (so the spectrum is the data's), with no groups among the
directions. A candidate's *excess* is its cosine silhouette minus the reference's mean; it is
*clear* when the excess is at least ``null_margin`` reference standard deviations (and the
silhouette at least ``min_silhouette``, an extra floor). Among clear candidates the largest
excess wins, and the winner must stay clear against 3 * ``null_draws`` more draws of its own
reference. No clear candidate: the structure is *weak* and K = 1 (when ``k_range[0] ==
1``); ``summary()["structure"]`` says so, with the reference and the excess per K. With
``null_draws = 0`` the old rule applies: the best projection silhouette, and K = 1 below the
``min_silhouette`` floor. The cosine silhouette is computed on the unit gradients themselves (the
geometry of the online phase), not on the projection: a projection onto one or two components
makes a single blob look split. One cluster is also the answer when no K >= 2 candidate is valid.
Where K = 1 is not allowed (k_range[0] >= 2, or a fixed ``n_clusters``) and no candidate is
valid, the least bad one (largest smallest cluster) is kept and a warning says so; rows that all
point in one direction are then an error (DegenerateGradientsError).

Online phase: the estimator counts, per epoch, the samples each cluster received. A cluster that
received fewer than m(samples in the epoch) is *small*: ``end_epoch`` lists it in
``small_clusters_`` and warns. The rule is keep-and-report: a small cluster keeps its centroid
(re-seeding it would need gradient vectors the external cache does not hold, and would make the two
caches disagree); the report tells the user to lower K or change ``min_cluster_size``.

Convergence (``tol``): during an epoch every sample is also assigned with the centroids the epoch
started with (the previous epoch's final centroids); the epoch's *changed share* is the fraction of
its non-zero samples whose label with the centroids in force differs from that label. The pass has
converged when the changed share is at most ``tol``; ``stop_reason_`` records 'converged' or
'max_epochs'. This needs no sample ids and costs one extra (b, K) similarity per batch. The centroid
shift (1 - cosine between epoch-start and epoch-end centroids) is still recorded in
``shift_history_``, but not used to stop: the EMA over a FIFO cache never stops moving by less
than its own sampling noise, so a shift tolerance is never met.

Input checks (scikit-learn style): every entry point takes a 2-D (n, d) array with at least one
row, d equal to the fitted dimension, and only finite values; otherwise it raises ValueError saying
what was expected (non-finite values name the offending rows, see ``nonfinite_rows``). An empty
batch raises rather than being a no-op: it would otherwise count as an EMA step.

Memory of the initialisation: the right singular vectors are never formed. The SVD comes from the
n x n Gram matrix of the rows (accumulated in float64 over column chunks of the input), whose
eigenvectors give the projections P = U S; the centroids are lifted back as (K, n) coefficients
times the input rows. No (n, d) copy of the input is made, so the peak stays near the input's own
size (benchmarks/clustering_memory.py measures it).

Memory of the online state: the exact cache holds K * alpha * batch_size * d float32 numbers,
plus K * d float64 running sums and K * d float32 centroids (e.g. K=7, alpha=5, |B|=32,
d=65,536: 0.3 GB; for Llama-3.2-1B with r=32 on q/v, d=3.4M: 15 GB). With the external cache the
estimator keeps only the running sums, the centroids and a ledger of K * alpha * batch_size
(batch, row) pairs; the vectors stay where they were computed - see docs/scaling.md.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClusterMixin
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import threadpool_limits

from gs_ray.core.cosine import (
    ROW_EPS,
    cosine_assign,
    normalize_rows,
    row_norms,
    unit_rows,
)

_CHUNK_BYTES = 32 * 2**20  # working-set bound of the chunked passes over an (n, d) input
_MAX_LISTED = 20  # row indices quoted in an error message


def _why(row: dict[str, Any] | None, est: GradientSpaceClustering) -> str:
    """One candidate's numbers in words (for reasons, the verdict and the log)."""
    if row is None:
        return "no valid K >= 2 candidate"
    sil = row["silhouette_cosine"]
    where = f"K={row['k']} ({row['n_components']} components): cosine silhouette {sil:.3f}"
    if row.get("excess") is None:
        return f"{where} vs min_silhouette {est.min_silhouette}"
    return (
        f"{where} vs structureless {row['null_silhouette']:.3f} +- {row['null_std']:.3f}, "
        f"excess {row['excess']:.3f} = {row['z']:.1f} sd (clear at >= {est.null_margin:g} sd"
        f"{f' and >= {est.min_silhouette}' if est.min_silhouette > -1 else ''})"
    )


class NotInitializedError(NotFittedError, RuntimeError):
    """The clusterer has no centroids yet: ``initialize`` or ``fit`` first (scikit-learn's
    NotFittedError, and the RuntimeError it always was)."""


class DegenerateGradientsError(ValueError):
    """The gradients do not contain enough distinct directions to cluster."""


# --------------------------------------------------------------------------- input checks


def nonfinite_rows(G: np.ndarray) -> np.ndarray:
    """Indices (int64, ascending) of the rows of a 2-D array holding a NaN or an Inf.

    Scans in row blocks, so the boolean mask never exceeds a few MB whatever the input size.
    """
    G = np.asarray(G)
    if G.ndim != 2:
        raise ValueError(f"expected a 2-D array (n_samples, n_features), got shape {G.shape}")
    if not np.issubdtype(G.dtype, np.inexact):
        return np.zeros(0, dtype=np.int64)  # integers cannot hold NaN or Inf
    step = max(1, _CHUNK_BYTES // max(1, G.shape[1]))
    bad = [
        start + np.flatnonzero(~np.isfinite(G[start : start + step]).all(axis=1))
        for start in range(0, len(G), step)
    ]
    return np.concatenate(bad).astype(np.int64) if bad else np.zeros(0, dtype=np.int64)


def _listed(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:_MAX_LISTED])
    return f"[{shown}{', ...' if len(rows) > _MAX_LISTED else ''}]"


def check_gradients(
    G: Any, name: str, n_features: int | None = None, finite: bool = True
) -> np.ndarray:
    """``G`` as a 2-D float array (no copy for float32/float64), or a ValueError saying what was
    expected: 2-D (n_samples, n_features), at least one row, ``n_features`` columns when given,
    finite values only (the message names the offending rows). ``finite=False`` leaves that
    scan to a caller that reads it off something it computes anyway (``partial_fit``: the row
    norms, which are NaN or Inf exactly where a row holds one), and calls again if it fails."""
    G = np.asarray(G)
    if G.dtype == object or not (
        np.issubdtype(G.dtype, np.floating) or np.issubdtype(G.dtype, np.integer)
    ):
        raise ValueError(f"{name}: expected a real numeric array, got dtype {G.dtype}")
    if G.ndim != 2:
        hint = " (one gradient: use g.reshape(1, -1))" if G.ndim == 1 else ""
        raise ValueError(
            f"{name}: expected a 2-D array (n_samples, n_features), got a {G.ndim}-D array of "
            f"shape {G.shape}{hint}"
        )
    if G.shape[0] == 0:
        raise ValueError(
            f"{name}: expected at least 1 row, got an empty array of shape {G.shape} "
            "(an empty batch is not an online step)"
        )
    if n_features is not None and G.shape[1] != n_features:
        raise ValueError(
            f"{name}: expected {n_features} features (the dimension the centroids were fitted "
            f"with), got {G.shape[1]}"
        )
    bad = nonfinite_rows(G) if finite else ()
    if len(bad):
        raise ValueError(
            f"{name}: non-finite values (NaN or Inf) in {len(bad)} of {len(G)} rows, row indices "
            f"{_listed(bad)}: a gradient must be finite (drop or recompute those samples)"
        )
    if not np.issubdtype(G.dtype, np.floating):
        G = G.astype(np.float32)
    return G


# --------------------------------------------------------------------------- linear algebra


def silhouette_precomputed(D: np.ndarray, labels: np.ndarray) -> float:
    """scikit-learn's ``silhouette_score(D, labels, metric="precomputed")`` (D: an (n, n)
    distance matrix with a zero diagonal; 2 <= distinct labels < n), the same definition and
    edge cases (a row alone in its cluster scores 0), to rounding: the per-cluster distance
    sums are one (n, n) @ (n, K) product instead of a bincount per row. K selection scores
    thousands of small partitions (every K-means run of every candidate, the structureless
    reference's draws too), where scikit-learn's per-call checks and row loop cost half of it."""
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    n, k = len(codes), int(codes.max()) + 1 if len(codes) else 0
    if not 2 <= k < n:
        raise ValueError(f"the silhouette needs 2 <= distinct labels < rows, got {k} and {n}")
    onehot = np.zeros((n, k), dtype=D.dtype)
    onehot[np.arange(n), codes] = 1.0
    sums = D @ onehot  # (n, K): each row's summed distance to every cluster
    freqs = np.bincount(codes, minlength=k)
    rows = np.arange(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        intra = sums[rows, codes] / (freqs - 1)[codes]
        sums[rows, codes] = np.inf
        inter = (sums / freqs[None, :]).min(axis=1)
        s = (inter - intra) / np.maximum(intra, inter)
    return float(np.mean(np.nan_to_num(s)))


def gram_matrix(X: np.ndarray) -> np.ndarray:
    """X X^T (n, n) in float64, accumulated over column chunks: no float64 copy of X."""
    X = np.asarray(X)
    n, d = X.shape
    step = max(1, _CHUNK_BYTES // (8 * max(1, n)))
    gram = np.zeros((n, n), dtype=np.float64)
    for start in range(0, d, step):
        block = X[:, start : start + step].astype(np.float64)
        gram += block @ block.T
    return gram


def _eigh_desc(gram: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Left singular vectors U (n, rank) and singular values s (rank,) from a Gram matrix,
    largest first (eigenvalues below zero are rounding: clipped)."""
    w, U = np.linalg.eigh(gram)
    order = np.argsort(w)[::-1][:rank]
    return U[:, order], np.sqrt(np.clip(w[order], 0.0, None))


def gram_svd(X: np.ndarray, n_components: int | None = None):
    """Thin SVD X = U diag(s) Vt from the n x n Gram matrix: (U, s, Vt) with the top
    ``n_components`` (default min(n, d)) components, Vt in X's float dtype.

    The right singular vectors are Vt = diag(1/s) U^T X, one (k, n) @ (n, d) product; the
    working memory besides the output is the Gram matrix and one float64 column chunk. For
    wide matrices (d >> n), which is the shape of validation gradients.
    """
    X = np.asarray(X)
    rank = min(X.shape)
    k = rank if n_components is None else min(n_components, rank)
    U, s = _eigh_desc(gram_matrix(X), k)
    inv = np.where(s > ROW_EPS * max(s[0], ROW_EPS), 1.0 / np.where(s > 0, s, 1.0), 0.0)
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float32
    Vt = ((U * inv[None, :]).T.astype(dtype)) @ X
    return U, s, Vt


class GradientSpaceClustering(ClusterMixin, BaseEstimator):
    """Online SVD-initialised clustering of gradients (see module docstring).

    Parameters
    ----------
    n_clusters : fixed K, or None to choose K over ``k_range``.
    k_range : (k_min, k_max) candidate K values, inclusive; k_min = 1 allows a one-cluster answer.
    variance_thresholds : explained-variance thresholds for the SVD subspace.
    alpha : cluster cache size factor, |C_k| = alpha * batch_size (paper: 5-10).
    beta : EMA factor in c_k <- beta * c_k + (1 - beta) * mean(C_k).
    batch_size : |B_t|, samples per online update (used for the cache size and by ``fit``).
    max_epochs : online epochs at most.
    tol : the online pass has converged when at most this share of an epoch's samples changed
        assignment (labels with the centroids in force vs with the epoch's starting centroids).
    n_init : K-means runs per candidate (seeds random_state + i), all scored by the same rule.
    random_state : seed for K-means and for ``fit``'s per-epoch shuffles.
    cache : "samples" - the cluster caches hold the alpha * batch_size most recent unit
        gradients of each cluster here; "external" - the same caches, but only as a ledger of
        (batch, row) entries plus running sums: the vectors stay with whoever computed them
        (the gradient workers), who send per-cluster sums of what enters and of what the ledger
        evicts (``push_ledger`` + ``partial_fit_external``). Both give the same centroids up to
        floating-point rounding; "external" takes the cache memory and most of the per-batch
        work off the centroid host.
    min_cluster_size, min_cluster_share : the smallest cluster worth having,
        m(n) = max(min_cluster_size, ceil(min_cluster_share * n)) of n rows; applied to the
        K-means runs of K selection and to the online epochs (``small_clusters_``).
    min_silhouette : an extra floor: a K >= 2 candidate is structure only with at least this
        cosine silhouette (0.0: the reference governs). With ``null_draws = 0`` it is the whole
        rule (then 0.02 was the old default: one-cluster data scored 0.002 at d = 5,000, but
        anisotropic or heavy-tailed one-cluster data scores 0.1, docs/k_selection.md).
    null_draws : structureless reference data sets per K selection (0: no reference).
    null_margin : a candidate is clear structure when its cosine silhouette exceeds the
        reference's mean by at least this many reference standard deviations.
    """

    def __init__(
        self,
        n_clusters: int | None = None,
        k_range: tuple[int, int] = (1, 8),
        variance_thresholds: tuple[float, ...] = (0.80, 0.85, 0.90, 0.95),
        alpha: int = 5,
        beta: float = 0.9,
        batch_size: int = 32,
        max_epochs: int = 3,
        tol: float = 0.01,
        n_init: int = 10,
        random_state: int = 0,
        cache: str = "samples",
        min_cluster_size: int = 4,
        min_cluster_share: float = 0.01,
        min_silhouette: float = 0.0,
        null_draws: int = 4,
        null_margin: float = 4.0,
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
        self.min_cluster_size = min_cluster_size
        self.min_cluster_share = min_cluster_share
        self.min_silhouette = min_silhouette
        self.null_draws = null_draws
        self.null_margin = null_margin

    def _require_centroids(self, what: str) -> None:
        try:
            check_is_fitted(self, "cluster_centers_")
        except NotFittedError:
            raise NotInitializedError(f"call initialize(G_val) or fit(G) before {what}") from None

    def min_size(self, n: int) -> int:
        """m(n): the smallest cluster worth having among n rows."""
        return max(int(self.min_cluster_size), math.ceil(self.min_cluster_share * n - 1e-9))

    # ------------------------------------------------------------------ step 1: K and init

    def initialize(self, G_val: np.ndarray) -> GradientSpaceClustering:
        """Choose K and the initial centroids from validation gradients (n_val, d)."""
        self._check_params()
        G = check_gradients(G_val, "initialize(G_val)")
        gram = gram_matrix(G)
        norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        keep = norms > ROW_EPS
        n = int(keep.sum())
        if n == 0:
            raise DegenerateGradientsError("all validation gradients are zero")
        inv = 1.0 / norms[keep]
        # cosine Gram of the unit rows (the normalisation happens here, not on an (n, d) copy)
        cos = np.clip(gram[np.ix_(keep, keep)] * inv[:, None] * inv[None, :], -1.0, 1.0)
        del gram
        U, s = _eigh_desc(cos, min(n, G.shape[1]))
        energy = s**2
        ratio = np.cumsum(energy) / energy.sum()
        self.singular_values_ = s
        self.explained_variance_ratio_ = ratio
        self.n_features_in_ = int(G.shape[1])
        m = self.min_size(n)
        self.min_size_ = m
        dist = np.sqrt(np.clip(2.0 - 2.0 * cos, 0.0, None))  # between unit rows
        np.fill_diagonal(dist, 0.0)

        k_min, k_max = self.k_range
        if self.n_clusters is not None:
            candidates = [self.n_clusters] if self.n_clusters >= 2 else []
            if n < self.n_clusters:
                raise DegenerateGradientsError(
                    f"{n} non-zero validation gradients are too few for K={self.n_clusters}: "
                    "use a larger data.n_val or fewer clusters"
                )
        else:
            candidates = list(range(max(k_min, 2), min(k_max, n - 1) + 1))
            if not candidates and k_min > 1:
                raise DegenerateGradientsError(
                    f"{n} non-zero validation gradients are too few to choose among "
                    f"K={k_min}..{k_max}: use a larger data.n_val or fewer clusters"
                )
        rows: list[dict[str, Any]] = []
        fits: dict[tuple[int, int], tuple[dict[str, Any], np.ndarray, np.ndarray]] = {}
        # Many small K-means fits (n rows, k_v columns): one thread each is faster than a
        # thread team, and does not stall when other processes hold the cores.
        with threadpool_limits(limits=1):
            for threshold in self.variance_thresholds:
                k_v = int(min(np.searchsorted(ratio, threshold - 1e-9) + 1, len(s)))
                for K in candidates:
                    if (k_v, K) not in fits:
                        fits[(k_v, K)] = self._score_candidate(U[:, :k_v] * s[:k_v], dist, K, m)
                    rows.append({"threshold": float(threshold), **fits[(k_v, K)][0]})
            Y = U * s  # the unit rows in the coordinates of their span
            one_direction = cos.min() > 1.0 - 1e-6  # any split would be rounding noise
            null = (
                self._null_silhouettes(Y, sorted(fits), m, self.null_draws, self.random_state)
                if self.null_draws and fits and not one_direction
                else {}
            )
            stats = _null_stats(null)
            for row in rows:
                key = (row["n_components"], row["k"])
                row.update(self._excess(row, stats.get(key), len(null.get(key, []))))

        free, allow_one = self.n_clusters is None, self.n_clusters is None and k_min == 1
        if free and not allow_one and one_direction:
            raise DegenerateGradientsError(
                "the validation gradients point in (nearly) one direction: no K in "
                f"{k_min}..{k_max} is meaningful; allow K=1 (clustering.k_min=1) or fix "
                "clustering.n_clusters to force a K"
            )
        # K = 1 forbidden (fixed K, or k_min >= 2): the least bad candidate if none is valid
        with threadpool_limits(limits=1):
            best = self._confirm(rows, null, Y, m, fallback=not allow_one)
        self.k_selection_ = rows
        clear = best is not None and best["clear"]
        self.single_cluster_reason_ = None
        if self.n_clusters == 1:
            self.single_cluster_reason_ = "n_clusters=1 is fixed"
        elif allow_one and (one_direction or best is None):
            self.single_cluster_reason_ = (
                "all rows point in one direction"
                if one_direction
                else f"no K >= 2 candidate has all clusters of at least {m} rows"
            )
        elif allow_one and not clear:
            self.single_cluster_reason_ = f"the gradient structure is weak: {_why(best, self)}"
        if self.single_cluster_reason_ is not None:
            coef = np.full((1, n), 1.0 / n)  # one cluster: the mean unit gradient
            first = (
                rows[0] if rows else {"threshold": self.variance_thresholds[0], "n_components": 1}
            )
            self.n_clusters_ = 1
            self.threshold_ = float(first["threshold"])
            self.n_components_ = int(first["n_components"])
            self.silhouette_ = float("nan")  # undefined for one cluster
            self.init_labels_ = np.zeros(n, dtype=np.int64)
        else:
            _, centers_proj, labels = fits[(best["n_components"], best["k"])]
            k_v = best["n_components"]
            self.n_clusters_ = int(best["k"])
            self.threshold_ = best["threshold"]
            self.n_components_ = k_v
            self.silhouette_ = best["silhouette"]
            self.init_labels_ = labels
            # Lift back: c = c_proj V_k^T with V_k^T = diag(1/s) U_k^T Xn, as (K, n) coefficients.
            coef = (centers_proj / s[:k_v][None, :]) @ U[:, :k_v].T
        self.structure_ = self._structure(rows, best)
        full = np.zeros((len(coef), len(keep)), dtype=np.float64)
        full[:, keep] = coef * inv[None, :]  # coefficients on the raw rows: Xn = diag(1/|g|) G
        self.cluster_centers_ = (full.astype(G.dtype) @ G).astype(np.float32)
        self._reset_online_state(G.shape[1])
        return self

    def _score_candidate(
        self, P: np.ndarray, dist: np.ndarray, K: int, m: int
    ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
        """n_init single K-means runs on P, each scored by the same rule (valid = K non-empty
        clusters of at least m rows; then the best silhouette). Returns the table row, the
        chosen run's centres in P's coordinates and its labels."""
        runs = []
        euclid = euclidean_distances(P)  # the same rows for every run: computed once
        for i in range(self.n_init):
            seed = self.random_state + i
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                km = KMeans(n_clusters=K, n_init=1, random_state=seed).fit(P)
            labels = km.labels_
            sizes = np.bincount(labels, minlength=K)
            distinct = int((sizes > 0).sum())
            ok = 2 <= distinct < len(P)
            sil = silhouette_precomputed(euclid, labels) if ok else float("nan")
            sil_cos = silhouette_precomputed(dist, labels) if ok else float("nan")
            valid = distinct == K and int(sizes.min()) >= m
            runs.append((valid, int(sizes.min()), sil, sil_cos, seed, sizes, km, labels))
        n_valid = sum(r[0] for r in runs)
        # valid runs first, then the largest smallest cluster, then the silhouette, then the seed
        best = max(runs, key=lambda r: (r[0], r[0] or r[1], np.nan_to_num(r[2], nan=-2), -r[4]))
        valid, smallest, sil, sil_cos, seed, sizes, km, labels = best
        row = {
            "n_components": int(P.shape[1]),
            "k": int(K),
            "silhouette": sil,
            "silhouette_cosine": sil_cos,
            "sizes": sorted(sizes.tolist(), reverse=True),
            "seed": int(seed),
            "valid_inits": int(n_valid),
            "rejected": not valid,
            "reason": None
            if valid
            else f"smallest cluster {smallest} < {m} rows in all {self.n_init} K-means runs",
        }
        return row, km.cluster_centers_.astype(np.float64), labels

    def _null_silhouettes(
        self, Y: np.ndarray, keys: list[tuple[int, int]], m: int, draws: int, seed: int
    ) -> dict[tuple[int, int], list[float]]:
        """The structureless reference: for every (n_components, K) candidate, the cosine
        silhouettes that the same selection gives on ``draws`` one-cluster data sets like the
        validation gradients (``_null_stats`` turns them into a mean and a spread).

        ``Y`` (n, r) holds the unit rows in the coordinates of their span (Y Y^T = the cosine
        Gram). Each row is split into its cosine a_i with the mean direction and a unit tangent
        (the rest). A null row keeps a_i and takes a random unit tangent g / |g|, g Gaussian
        with the variances (``_acg_variances``) that give the data's unit tangents' second
        moments: the same spectrum and the same spread of angles around one direction (a
        heavy-tailed cluster keeps its tails), but no groups among the directions.
        Where the rows have more dimensions than there are rows, their tangents are closer to
        orthogonal than random vectors in their n-dimensional span: only the share of a null
        tangent that matches the data's mean squared tangent cosine is drawn in the span, the
        rest is private to its row (it adds to the Gram matrix's diagonal only).
        Every draw goes through the same SVD, subspace size, K-means runs and validity rule as
        the data."""
        rng = np.random.default_rng(seed)
        n = len(Y)
        mean = Y.mean(0)
        norm = float(np.linalg.norm(mean))
        direction = mean / norm if norm > ROW_EPS else np.zeros_like(mean)
        a = np.clip(Y @ direction, -1.0, 1.0)
        tangent = Y - a[:, None] * direction[None, :]
        tn = np.linalg.norm(tangent, axis=1)
        tangent /= np.where(tn > ROW_EPS, tn, 1.0)[:, None]
        _, st, vt = np.linalg.svd(tangent, full_matrices=False)
        target = st**2 / n
        scale = np.sqrt(_acg_variances(target, rng))
        # n draws from a spectrum come back with a wider sample spectrum (Marchenko-Pastur),
        # and the data's spectrum is already such a sample: one pilot draw measures the
        # widening, and the reference is drawn from the spectrum narrowed by it.
        pilot = (rng.standard_normal((n, len(st))) * scale[None, :]) @ vt
        pilot /= np.maximum(np.linalg.norm(pilot, axis=1), ROW_EPS)[:, None]
        widened = np.linalg.svd(pilot, compute_uv=False) ** 2 / n
        narrowed = target * target / np.maximum(widened[: len(target)], ROW_EPS)
        narrowed *= target.sum() / max(narrowed.sum(), ROW_EPS)
        scale = np.sqrt(_acg_variances(narrowed, rng))
        off = ~np.eye(n, dtype=bool)
        spread = float(np.mean((tangent @ tangent.T)[off] ** 2))
        b = np.sqrt(1.0 - a**2)
        shared = None
        sil: dict[tuple[int, int], list[float]] = {key: [] for key in keys}
        for _ in range(draws):
            T = (rng.standard_normal((n, len(st))) * scale[None, :]) @ vt
            T /= np.maximum(np.linalg.norm(T, axis=1), ROW_EPS)[:, None]
            TT = T @ T.T
            if shared is None:  # the share of each tangent that lies in the span
                shared = min(1.0, math.sqrt(spread / max(float(np.mean(TT[off] ** 2)), ROW_EPS)))
            cos0 = np.outer(a, a) + shared * np.outer(b, b) * TT
            np.fill_diagonal(cos0, 1.0)
            cos0 = np.clip(cos0, -1.0, 1.0)
            U0, s0 = _eigh_desc(cos0, Y.shape[1])
            dist0 = np.sqrt(np.clip(2.0 - 2.0 * cos0, 0.0, None))
            np.fill_diagonal(dist0, 0.0)
            for k_v, K in keys:
                row, _, _ = self._score_candidate(U0[:, :k_v] * s0[:k_v], dist0, K, m)
                sil[(k_v, K)].append(row["silhouette_cosine"])
        return sil

    def _confirm(
        self,
        rows: list[dict[str, Any]],
        null: dict[tuple[int, int], list[float]],
        Y: np.ndarray,
        m: int,
        fallback: bool,
    ) -> dict[str, Any] | None:
        """``_choose``, where a clear winner must stay clear against ``3 * null_draws`` more
        draws of its own reference (else the next one is tried). A one-cluster mixture with a
        few rows far closer to its centre than the rest sometimes gives the data a tight
        splinter partition whose silhouette a few draws of the reference happen not to
        reach: the tail of the reference shows with more draws. Each candidate is re-drawn at
        most once; only candidates about to be chosen pay for it."""
        confirmed: set[tuple[int, int]] = set()
        while True:
            best = self._choose(rows, fallback)
            if best is None or not best["clear"] or not null:
                return best
            key = (best["n_components"], best["k"])
            if key in confirmed:
                return best
            confirmed.add(key)
            seed = self.random_state + 7919 * len(confirmed)  # a stream apart from the first
            null[key] = (
                null[key] + self._null_silhouettes(Y, [key], m, 3 * self.null_draws, seed)[key]
            )
            stats = _null_stats(null)
            for row in rows:
                if (row["n_components"], row["k"]) == key:
                    row.update(self._excess(row, stats[key], len(null[key])))

    def _excess(
        self, row: dict[str, Any], null: tuple[float, float] | None, draws: int = 0
    ) -> dict[str, Any]:
        """The table row's new columns: the null silhouette and spread, the excess of the
        cosine silhouette over it (also in spreads, z), and whether the row is clear structure:
        valid, at least ``min_silhouette``, and z >= ``null_margin`` (when there is a null)."""
        sil = row["silhouette_cosine"]
        ok = not row["rejected"] and math.isfinite(sil) and sil >= self.min_silhouette
        if null is None:
            empty = dict.fromkeys(("null_silhouette", "null_std", "excess", "z"))
            return {**empty, "null_draws": 0, "clear": bool(ok)}
        mu, sd = null
        excess = sil - mu
        z = excess / sd
        return {
            "null_silhouette": mu,
            "null_std": sd,
            "excess": excess,
            "z": z,
            "null_draws": int(draws),
            "clear": bool(ok and z >= self.null_margin),
        }

    def _choose(self, rows: list[dict[str, Any]], fallback: bool) -> dict[str, Any] | None:
        """The chosen candidate among the valid rows. With a null (``null_draws`` > 0): the
        rows of clear structure (all valid rows where none is clear) compete by their excess
        over the null, the largest wins (ties to the smaller K, then the smaller subspace).
        The gap statistic's one-spread rule (the smallest K within one reference sd of the
        largest excess) was tried: the reference's sd is large where the clusters are strong
        (0.02-0.035 on tests' ``planted`` data), and it chose K = 2 for 5 planted clusters.
        Without: the best projection silhouette (ties to the smaller K, then the smaller
        subspace). With no valid row: None,
        or with ``fallback`` the least bad run (largest smallest cluster) and a warning."""
        key = lambda r: (np.nan_to_num(r["silhouette"], nan=-2), -r["k"], -r["n_components"])  # noqa: E731
        valid = [r for r in rows if not r["rejected"] and np.isfinite(r["silhouette"])]
        if valid and not self.null_draws:
            return max(valid, key=key)
        if valid:
            pool = [r for r in valid if r["clear"]] or valid
            excess = lambda r: np.nan_to_num(r["excess"], nan=-np.inf)  # noqa: E731
            return max(pool, key=lambda r: (excess(r), -r["k"], -r["n_components"]))
        if not (fallback and rows):
            return None
        least_bad = max(rows, key=lambda r: (r["sizes"][-1], key(r)))
        warnings.warn(
            f"K=1 is not allowed (n_clusters={self.n_clusters}, k_range={self.k_range}) but no "
            f"K-means run gives clusters of at least {self.min_size_} rows: keeping the least "
            f"bad run, K={least_bad['k']} with sizes {least_bad['sizes']}",
            stacklevel=3,
        )
        return least_bad

    def _structure(self, rows: list[dict[str, Any]], best: dict[str, Any] | None) -> dict:
        """The structure verdict (``summary()["structure"]``): per K the chosen candidate, or
        the clear one, or the valid one with the largest excess (its null silhouette, excess,
        z, clear), ``weak`` (no K clearly above
        the structureless reference), the K chosen and why, and a one-line verdict."""
        per_k: dict[int, dict[str, Any]] = {}
        fields = ("k", "n_components", "silhouette_cosine", "null_silhouette", "null_std")
        fields += ("excess", "z", "clear", "rejected")

        def rank(r: dict[str, Any]) -> tuple[bool, bool, bool, float]:
            score = r["excess"] if r["excess"] is not None else r["silhouette_cosine"]
            return (
                r is best,
                not r["rejected"],
                r["clear"],
                float(np.nan_to_num(score, nan=-np.inf)),
            )

        for r in rows:
            if r["k"] not in per_k or rank(r) > rank(per_k[r["k"]]):
                per_k[r["k"]] = r
        weak = not any(r["clear"] for r in rows)
        K = int(self.n_clusters_)
        if self.single_cluster_reason_ is not None:
            reason = self.single_cluster_reason_
        elif self.n_clusters is not None:
            reason = f"n_clusters={self.n_clusters} is fixed ({_why(best, self)})"
        elif weak:
            reason = f"K=1 is not allowed (k_min={self.k_range[0]}); weak: {_why(best, self)}"
        else:
            reason = f"clear structure: {_why(best, self)}"
        rule = "null" if self.null_draws else "floor"
        chosen = None
        if best is not None and K > 1:
            chosen = {f: best[f] for f in ("k", "n_components", "threshold")}
        weak_note = "the gradient structure is weak; " if weak and "weak" not in reason else ""
        verdict = f"K={K}: {weak_note}{reason}"
        return {
            "rule": rule,
            "null_draws": int(self.null_draws),
            "null_margin": float(self.null_margin),
            "min_silhouette": float(self.min_silhouette),
            "per_k": [{f: per_k[k][f] for f in fields} for k in sorted(per_k)],
            "weak": bool(weak),
            "k": K,
            "chosen": chosen,
            "reason": reason,
            "verdict": verdict,
        }

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
        if self.k_range[0] < 1 or self.k_range[1] < max(self.k_range[0], 2):
            raise ValueError(
                f"k_range must satisfy 1 <= k_min <= k_max, k_max >= 2, got {self.k_range}"
            )
        if self.n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")
        if self.min_cluster_size < 1 or not 0 <= self.min_cluster_share < 1:
            raise ValueError(
                "min_cluster_size must be >= 1 and min_cluster_share in [0, 1), got "
                f"{self.min_cluster_size} and {self.min_cluster_share}"
            )
        if self.null_draws < 0 or not self.null_margin >= 0:
            raise ValueError(
                "null_draws must be >= 0 and null_margin >= 0, got "
                f"{self.null_draws} and {self.null_margin}"
            )
        if not 0 <= self.tol <= 1:
            raise ValueError(f"tol is a share of samples, expected in [0, 1], got {self.tol}")

    # ------------------------------------------------------------------ step 2: online calibration

    @property
    def cache_size(self) -> int:
        """|C_k| = alpha * |B_t|."""
        return int(self.alpha * self.batch_size)

    def _reset_online_state(self, dim: int) -> None:
        K, cap = self.n_clusters_, self.cache_size
        self.n_features_in_ = int(dim)
        if self.cache == "samples":
            # Committed now, not page by page as the first online epoch fills it: a first write
            # to fresh memory cost 15x a later one here (0.6 s for 335 MB, K = 8 at d = 65,536),
            # which made the first epoch's batches the centroid host's slowest; and a cache that
            # does not fit fails when K is chosen, not in the middle of the online pass.
            self.cache_ = np.empty((K, cap, dim), dtype=np.float32)
            self.cache_.fill(0.0)
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
        self.changed_share_history_: list[float] = []
        self.cluster_sizes_seen_: list[list[int]] = []
        self.small_clusters_: list[int] = []
        self.converged_ = False
        self.stop_reason_: str | None = None
        self._epoch_start = self.cluster_centers_.copy()
        self._reset_epoch_counts()

    def _reset_epoch_counts(self) -> None:
        self._epoch_counts = np.zeros(self.n_clusters_, dtype=np.int64)
        self._epoch_changed = 0
        self._epoch_changed_known = True

    def _count(self, labels: np.ndarray, keep: np.ndarray, start_labels: np.ndarray | None) -> None:
        """Per-epoch bookkeeping of one batch: samples per cluster, changed assignments."""
        self._epoch_counts += np.bincount(labels[keep], minlength=self.n_clusters_)
        if start_labels is None:
            self._epoch_changed_known = False
        else:
            self._epoch_changed += int(((labels != start_labels) & keep).sum())

    def _push_rows(self, k: int, rows: np.ndarray) -> None:
        """FIFO, a batch's rows of cluster k at once, in their order: each row is written at the
        ring position, evicting the oldest entry when full. The running sum gains the rows that
        enter and loses those they evict, one pass over each (not three per row: at large d that
        was the centroid host's largest per-batch cost), also where the write wraps around the
        ring (two slices). It used to be summed afresh at every wrap, a pass over the whole
        cache of k: 6 ms at d = 65,536, about a tenth of the centroid actor's work per batch.
        In float64, the sum of float32 rows drifts by about 1e-16 of its size per update,
        far below the float32 centroids' precision (test_clustering checks it over many wraps)."""
        cap, m = self.cache_size, len(rows)
        if m == 0:
            return
        pos, count = int(self.cache_next_[k]), int(self.cache_count_[k])
        if m >= cap:  # only the last cap rows stay; everything before is evicted
            rows = rows[m - cap :]
            slots = (pos + m - cap + np.arange(cap)) % cap
            self.cache_[k, slots] = rows
            self._cache_sum[k] = rows.sum(0, dtype=np.float64)
            self.cache_count_[k] = cap
        else:  # at most two slices of the ring: [pos, cap) and, wrapping, [0, ...)
            first = min(m, cap - pos)
            for at, part in ((pos, rows[:first]), (0, rows[first:])):
                if len(part) == 0:
                    continue
                held = min(at + len(part), count) - at  # the slots [at, at + held) hold a row
                if held > 0:
                    self._cache_sum[k] -= self.cache_[k, at : at + held].sum(0, dtype=np.float64)
                self.cache_[k, at : at + len(part)] = part
            self._cache_sum[k] += rows.sum(0, dtype=np.float64)
            self.cache_count_[k] = min(cap, count + m)
        self.cache_next_[k] = (pos + m) % cap

    def cache_mean(self, k: int) -> np.ndarray | None:
        """mean(C_k), or None for an empty cache."""
        if self.cache_count_[k] == 0:
            return None
        return self._cache_sum[k] / self.cache_count_[k]

    def _check_online(self, cache: str) -> None:
        self._require_centroids("partial_fit")
        if self.cache != cache:
            raise ValueError(f"this update needs cache={cache!r}, the estimator has {self.cache!r}")

    def _work_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """(K, d) float64 and float32 scratch arrays for the per-batch update, allocated once.
        Fresh (K, d) temporaries each batch cost the centroid actor page faults: 1,600 per
        batch at K = 16, d = 65,536, and its update took 13 ms there instead of 3."""
        shape = self._cache_sum.shape
        work = getattr(self, "_work", None)
        if work is None or work[0].shape != shape:
            work = (np.empty(shape, np.float64), np.empty(shape, np.float32))
            self._work = work
        return work

    def _ema(self, batch_size: int) -> None:
        """c_k <- beta * c_k + (1 - beta) * mean(C_k) for every cluster with a non-empty cache.

        All clusters at once, in place: beta * c_k in float32, mean(C_k) and the sum in
        float64, rounded to float32 once (per element the same operations, so the same bits, as
        one cluster at a time; a pass over (K, d) each, with no (d,) temporaries per cluster)."""
        live = self.cache_count_ > 0
        if live.any():
            c = self.cluster_centers_
            if live.all():
                w64, w32 = self._work_buffers()
                mean = np.divide(self._cache_sum, self.cache_count_[:, None], out=w64)
                mean *= 1 - self.beta
                mean += np.multiply(c, self.beta, dtype=np.float32, out=w32)
                c[...] = mean
            else:
                ks = np.flatnonzero(live)
                mean = self._cache_sum[ks] / self.cache_count_[ks, None]
                mean *= 1 - self.beta
                mean += np.multiply(c[ks], self.beta, dtype=np.float32)
                c[ks] = mean
        self.n_batches_seen_ += 1
        self.n_samples_seen_ += batch_size

    def partial_fit(self, G_batch: np.ndarray) -> GradientSpaceClustering:
        """One online update with a mini-batch of gradients (b, d); returns self.

        The batch's labels (assigned before the update) are in ``last_labels_``.
        """
        self._check_online("samples")
        name = "partial_fit(G_batch)"
        G = check_gradients(G_batch, name, self.n_features_in_, finite=False)
        Xn, norms = normalize_rows(G)
        if not np.isfinite(norms).all():  # a NaN or Inf anywhere in a row makes its norm one
            check_gradients(G, name, self.n_features_in_)  # raises, naming the rows
        labels = cosine_assign(Xn, self.cluster_centers_)
        nonzero = norms > ROW_EPS
        self._count(labels, nonzero, cosine_assign(Xn, self._epoch_start, self._epoch_start_norms))
        self.n_zero_gradients_ += int((~nonzero).sum())
        for k in np.unique(labels[nonzero]):
            self._push_rows(int(k), Xn[nonzero & (labels == k)])
        self._ema(len(Xn))
        self.last_labels_ = labels
        return self

    # ------------------------------------------------------------------ external cache

    @property
    def _epoch_start_norms(self) -> np.ndarray:
        """Norms of the epoch's starting centroids, computed once per epoch (not per batch)."""
        known = getattr(self, "_start_norms", None)
        if known is None or known[0] is not self._epoch_start:
            known = (self._epoch_start, row_norms(self._epoch_start))
            self._start_norms = known
        return known[1]

    @property
    def epoch_start_centers(self) -> np.ndarray:
        """The centroids the current epoch started with (for ``push_ledger``'s start_labels)."""
        return self._epoch_start

    def push_ledger(
        self,
        step: int,
        labels: np.ndarray,
        keep: np.ndarray,
        start_labels: np.ndarray | None = None,
    ) -> dict[int, list[tuple[int, int]]]:
        """External cache, first half of an update: enter batch ``step``'s kept rows into their
        clusters' FIFO ledgers; return the entries that fall out as {step: [(row, k), ...]}.

        ``start_labels``: the same rows assigned with ``epoch_start_centers`` (by the worker);
        without them the epoch's changed share is unknown and it cannot converge by ``tol``.
        """
        self._check_online("external")
        labels = np.asarray(labels)
        keep = np.asarray(keep, dtype=bool)
        if labels.ndim != 1 or labels.shape != keep.shape or len(labels) == 0:
            raise ValueError(
                "push_ledger: expected 1-D labels and keep of the same non-zero length, got "
                f"shapes {labels.shape} and {keep.shape}"
            )
        if labels.min() < 0 or labels.max() >= self.n_clusters_:
            raise ValueError(f"push_ledger: labels must be in [0, {self.n_clusters_})")
        if start_labels is not None:
            start_labels = np.asarray(start_labels)
            if start_labels.shape != labels.shape:
                raise ValueError(
                    f"push_ledger: start_labels shape {start_labels.shape} != {labels.shape}"
                )
        self._count(labels, keep, start_labels)
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
        evicted: np.ndarray | Sequence[np.ndarray] | None,
        batch_size: int,
        n_zero: int = 0,
    ) -> GradientSpaceClustering:
        """External cache, second half: per-cluster sums (K, d) of the unit gradients that
        entered (``cluster_sums`` of the batch) and of those ``push_ledger`` evicted: one
        array, or a sequence of parts (one per worker that held some), or None (none were)."""
        self._check_online("external")
        shape = (self.n_clusters_, self.n_features_in_)
        if evicted is None or isinstance(evicted, np.ndarray):
            parts = [] if evicted is None else [evicted]
        else:
            parts = list(evicted)
        given = {"added": added}
        for i, part in enumerate(parts):
            given["evicted" if len(parts) == 1 else f"evicted[{i}]"] = part
        for name, arr in given.items():
            if np.shape(arr) != shape:
                raise ValueError(
                    f"partial_fit_external: expected {name} of shape {shape} (K, d), got "
                    f"{np.shape(arr)}"
                )
        if batch_size < 1:
            raise ValueError(
                f"partial_fit_external: expected batch_size >= 1, got {batch_size} "
                "(an empty batch is not an online step)"
            )
        if not parts:
            delta = np.asarray(added, dtype=np.float64)
        else:  # into the scratch buffer: no (K, d) temporaries per batch
            delta = np.subtract(added, parts[0], dtype=np.float64, out=self._work_buffers()[0])
            for part in parts[1:]:
                delta -= part
        # One pass instead of a scan of each input: a NaN or Inf anywhere makes the total
        # non-finite (and finite sums of unit rows cannot overflow), so only then look for it.
        if not np.isfinite(delta.sum()):
            for name, arr in given.items():
                bad = nonfinite_rows(np.asarray(arr))
                if len(bad):
                    raise ValueError(
                        f"partial_fit_external: {name} has non-finite sums in rows (clusters) "
                        f"{_listed(bad)}: a gradient of that batch was NaN or Inf"
                    )
        self._cache_sum += delta
        self.cache_count_ = np.array([len(ledger) for ledger in self.ledger_], dtype=np.int64)
        self.n_zero_gradients_ += n_zero
        self._ema(batch_size)
        return self

    def oldest_live_step(self) -> int | None:
        """The oldest batch step still present in some cache (external cache)."""
        heads = [ledger[0][0] for ledger in self.ledger_ if ledger]
        return min(heads) if heads else None

    def end_epoch(self) -> bool:
        """Close an online epoch: record the changed share, the centroid shift and the cluster
        sizes; report small clusters; True when converged (changed share <= tol)."""
        a, b = self._epoch_start, self.cluster_centers_
        cos = (a * b).sum(1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), ROW_EPS
        )
        self.shift_history_.append(float(np.max(1.0 - cos)))
        seen = int(self._epoch_counts.sum())
        known = self._epoch_changed_known and seen > 0
        share = self._epoch_changed / seen if known else float("nan")
        self.changed_share_history_.append(float(share))
        self.cluster_sizes_seen_.append(self._epoch_counts.tolist())
        m = self.min_size(seen)
        self.small_clusters_ = [int(k) for k in np.flatnonzero(self._epoch_counts < m)]
        if self.small_clusters_:
            warnings.warn(
                f"online epoch {self.epoch_ + 1}: clusters {self.small_clusters_} received fewer "
                f"than {m} of {seen} samples (sizes {self._epoch_counts.tolist()}); they are kept "
                "and reported (small_clusters_): consider a smaller K or min_cluster_size",
                stacklevel=2,
            )
        self.epoch_ += 1
        self._epoch_start = self.cluster_centers_.copy()
        self._reset_epoch_counts()
        self.converged_ = bool(known and share <= self.tol)
        if self.converged_:
            self.stop_reason_ = "converged"
        elif self.epoch_ >= self.max_epochs:
            self.stop_reason_ = "max_epochs"
        else:
            self.stop_reason_ = None
        return self.converged_

    # ------------------------------------------------------------------ step 3: assignment

    def predict(self, G: np.ndarray) -> np.ndarray:
        """Final assignment: argmax_k cos(g, c_k); zero gradients go to cluster 0."""
        self._require_centroids("predict")
        G = check_gradients(G, "predict(G)", self.cluster_centers_.shape[1])
        Xn, _ = normalize_rows(G)
        return cosine_assign(Xn, self.cluster_centers_)

    def fit(self, G: np.ndarray, G_val: np.ndarray | None = None, init_size: int = 256):
        """All three steps on an in-memory array: init on G_val (or a random subset of G),
        online epochs over shuffled mini-batches, then ``labels_ = predict(G)``."""
        G = check_gradients(G, "fit(G)")
        rng = np.random.default_rng(self.random_state)
        if G_val is None:
            G_val = G[rng.choice(len(G), size=min(init_size, len(G)), replace=False)]
        self.initialize(G_val)
        if self.n_features_in_ != G.shape[1]:
            raise ValueError(f"fit: G has {G.shape[1]} features, G_val {self.n_features_in_}")
        for _ in range(self.max_epochs):
            order = rng.permutation(len(G))
            for start in range(0, len(G), self.batch_size):
                self.partial_fit(G[order[start : start + self.batch_size]])
            if self.end_epoch():
                break
        self.labels_ = self.predict(G)
        return self

    # ------------------------------------------------------------------ reporting

    def summary(self) -> dict[str, Any]:
        """Everything worth reporting about the fit, as plain JSON-able values (NaN -> None)."""
        self._require_centroids("summary")
        out = {
            "k": self.n_clusters_,
            "threshold": self.threshold_,
            "n_components": self.n_components_,
            "silhouette": self.silhouette_,
            "single_cluster_reason": getattr(self, "single_cluster_reason_", None),
            "min_cluster_size": getattr(self, "min_size_", None),
            "k_selection": getattr(self, "k_selection_", []),
            "structure": getattr(self, "structure_", None),
            "explained_variance_ratio": getattr(self, "explained_variance_ratio_", None),
            "singular_values": getattr(self, "singular_values_", None),
            "gradient_dim": self.cluster_centers_.shape[1],
            "cache": self.cache,
            "epochs": self.epoch_,
            "converged": self.converged_,
            "stop_reason": self.stop_reason_,
            "tol": self.tol,
            "changed_share": self.changed_share_history_,
            "centroid_shift": self.shift_history_,
            "cluster_sizes_seen": self.cluster_sizes_seen_,
            "small_clusters": self.small_clusters_,
            "n_batches_seen": self.n_batches_seen_,
            "n_samples_seen": self.n_samples_seen_,
            "n_zero_gradients": self.n_zero_gradients_,
        }
        return _jsonable(out)

    _CACHES = ("cache_", "cache_next_", "ledger_", "_cache_sum", "_work")

    def without_caches(self) -> GradientSpaceClustering:
        """A deep copy without the cluster caches (what the driver needs: centroids, K table,
        history; small to pickle). It predicts, but cannot continue the online phase."""
        new = copy.copy(self)
        new.__dict__ = copy.deepcopy(
            {k: v for k, v in self.__dict__.items() if k not in self._CACHES}
        )
        return new

    # ------------------------------------------------------------------ checkpoints

    _STATE = (
        "n_clusters_",
        "threshold_",
        "n_components_",
        "silhouette_",
        "cluster_centers_",
        "cache_",
        "cache_count_",
        "cache_next_",
        "ledger_",
        "_cache_sum",
        "n_batches_seen_",
        "n_samples_seen_",
        "n_zero_gradients_",
        "epoch_",
        "shift_history_",
        "converged_",
        "_epoch_start",
        "k_selection_",
        "explained_variance_ratio_",
        "singular_values_",
        "n_features_in_",
        "min_size_",
        "single_cluster_reason_",
        "changed_share_history_",
        "cluster_sizes_seen_",
        "small_clusters_",
        "stop_reason_",
        "_epoch_counts",
        "_epoch_changed",
        "_epoch_changed_known",
        "structure_",
    )

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Everything learned so far, for checkpoints: copied, or (``copy=False``, to be
        written out before the next update) the live objects, e.g. the cache itself."""
        take = _copy if copy else (lambda v: v)
        return {k: take(getattr(self, k)) for k in self._STATE if hasattr(self, k)}

    def load_state_dict(self, state: dict[str, Any]) -> GradientSpaceClustering:
        """Restore what ``state_dict`` returned."""
        for k, v in state.items():
            setattr(self, k, _copy(v))
        if "_epoch_counts" not in state and "n_clusters_" in state:  # a checkpoint from before
            self._reset_epoch_counts()  # issue 10: this epoch's bookkeeping starts afresh
            self._epoch_changed_known = False
            self.n_features_in_ = int(self.cluster_centers_.shape[1])
            for name, value in (
                ("changed_share_history_", []),
                ("cluster_sizes_seen_", []),
                ("small_clusters_", []),
                ("stop_reason_", None),
            ):
                setattr(self, name, value)
        return self


def _null_stats(null: dict[tuple[int, int], list[float]]) -> dict[tuple[int, int], tuple]:
    """(mean, spread) of each candidate's reference silhouettes. The spread is the candidate's
    own standard deviation, but never below the pooled one of its subspace (a few draws give
    a noisy estimate)."""
    with warnings.catch_warnings():  # a draw whose K-means collapsed gives NaN: left out
        warnings.simplefilter("ignore", RuntimeWarning)
        var = {key: float(np.nanvar(v, ddof=1 if len(v) > 1 else 0)) for key, v in null.items()}
        pooled = {
            k_v: math.sqrt(np.nanmean([v for (kv, _), v in var.items() if kv == k_v]))
            for k_v, _ in null
        }
        mean = {key: float(np.nanmean(v)) for key, v in null.items()}
    spread = {key: float(np.nanmax([np.sqrt(var[key]), pooled[key[0]], ROW_EPS])) for key in null}
    return {key: (mean[key], spread[key]) for key in null}


def _acg_variances(target: np.ndarray, rng: np.random.Generator, iters: int = 30) -> np.ndarray:
    """Variances lam (in the eigenbasis) of a Gaussian g whose direction g / |g| has second
    moments E[u_j^2] = ``target`` (the angular central Gaussian fitted by its moments).

    Normalising a Gaussian flattens its spectrum (a row long in a strong direction is shrunk
    most), so a null drawn with the target itself as variances would be more isotropic than the
    data and its silhouette too low. Fixed point lam <- lam * target / E_lam[u^2], with E by
    Monte Carlo on fixed draws (common random numbers: the iteration is deterministic); it
    converges in about ten steps."""
    target = np.clip(np.asarray(target, dtype=np.float64), 0.0, None)
    total = target.sum()
    if total <= ROW_EPS:
        return target
    target = target / total
    Z2 = rng.standard_normal((max(4096, 4 * len(target)), len(target))) ** 2
    lam = target.copy()
    for _ in range(iters):
        w = Z2 * lam[None, :]
        moments = (w / np.maximum(w.sum(1, keepdims=True), ROW_EPS)).mean(0)
        lam = lam * target / np.maximum(moments, ROW_EPS)
        lam /= lam.sum()
    return lam * total


def _copy(v: Any) -> Any:
    return copy.deepcopy(v)


def _jsonable(v: Any) -> Any:
    """NumPy values and containers as plain Python; NaN and Inf as None."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer, int)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return float(v) if math.isfinite(v) else None
    return v


def within_cluster_variance(G: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Theorem 2's quantity: the variance of the unit gradients inside each cluster (mean squared
    distance to the cluster's mean) against the variance of the whole set (float64). A
    partition by gradient direction should leave each cluster's variance well under the whole
    set's. Rows labelled < 0 (left out) count in the total only."""
    X = unit_rows(np.asarray(G, dtype=np.float64))
    labels = np.asarray(labels)

    def var(rows: np.ndarray) -> float:
        return float(((rows - rows.mean(0)) ** 2).sum(1).mean()) if len(rows) else 0.0

    total = var(X)
    clusters = [
        {"cluster": int(c), "n": int((labels == c).sum()), "variance": var(X[labels == c])}
        for c in sorted(set(labels.tolist()))
        if c >= 0
    ]
    n = sum(c["n"] for c in clusters)
    pooled = sum(c["n"] * c["variance"] for c in clusters) / max(1, n)
    return {
        "total": total,
        "within": pooled,
        "ratio": pooled / total if total else None,
        "clusters": clusters,
    }
