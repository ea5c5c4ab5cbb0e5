"""The GradientSpace clusterer on plain arrays: planted clusters, hand-computed cache/EMA cases,
degenerate inputs. No Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from gs_ray.core.clustering import (
    DegenerateGradientsError,
    GradientSpaceClustering,
    gram_svd,
    nonfinite_rows,
    silhouette_precomputed,
)
from gs_ray.core.cosine import cluster_sums, cosine_assign, normalize_rows


def planted(
    seed: int = 0,
    d: int = 20_000,
    sizes=(400, 250, 150, 120, 80),
    noise: float = 0.8,
    decades: float = 1.0,
    outliers: int = 0,
):
    """Gradients shaped like real ones: a shared mean direction (cosine 0.5 with every cluster
    direction), cluster directions with unequal sizes, one pair of opposite (conflicting)
    directions, norms spread over ``decades`` orders of magnitude, isotropic noise with
    ``noise`` times the signal's norm; ``outliers`` extra rows of pure noise (label -1)."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    common /= np.linalg.norm(common)
    dirs = []
    for _ in sizes:
        u = rng.standard_normal(d)
        dirs.append(0.5 * common + np.sqrt(0.75) * u / np.linalg.norm(u))
    if len(dirs) > 1:
        dirs[1] = -dirs[0]  # conflicting gradients: must not share a cluster
    X, y = [], []
    for k, n in enumerate(sizes):
        scale = 10.0 ** rng.uniform(-decades, 0.0, n)
        noise_part = rng.standard_normal((n, d)) / np.sqrt(d)
        X.append(scale[:, None] * (dirs[k][None, :] + noise * noise_part))
        y += [k] * n
    X.append(0.05 * rng.standard_normal((outliers, d)))
    y += [-1] * outliers
    return np.vstack(X).astype(np.float32), np.array(y)


@pytest.fixture(autouse=True)
def one_thread():
    """BLAS/OpenMP thread teams stall when other processes hold the cores (CI, shared
    machines); these arrays are small enough for one thread."""
    with threadpool_limits(1):
        yield


@pytest.fixture(scope="module")
def data():
    return planted()


@pytest.mark.parametrize("order_seed", [0, 1, 2])
def test_planted_clusters_recovered_in_any_order(data, order_seed):
    X, y = data
    perm = np.random.default_rng(100 + order_seed).permutation(len(X))
    est = GradientSpaceClustering(random_state=0).fit(X[perm])
    assert abs(est.n_clusters_ - 5) <= 1
    assert adjusted_rand_score(y[perm], est.labels_) >= 0.95
    # The conflicting pair (clusters 0 and 1) ends up in different clusters.
    lab = np.empty_like(est.labels_)
    lab[perm] = est.labels_
    majority0 = np.bincount(lab[y == 0]).argmax()
    majority1 = np.bincount(lab[y == 1]).argmax()
    assert majority0 != majority1
    assert np.isfinite(est.cluster_centers_).all()


def test_clearly_better_than_kmeans_on_raw_vectors(data):
    X, y = data
    ours = adjusted_rand_score(y, GradientSpaceClustering(random_state=0).fit(X).labels_)
    with threadpool_limits(1):  # OpenMP teams stall on a shared, loaded machine
        raw = adjusted_rand_score(y, KMeans(5, n_init=4, random_state=0).fit(X).labels_)
    assert raw < 0.6  # the norm spread confuses Euclidean K-means
    assert ours >= raw + 0.3


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_silhouette_precomputed_equals_sklearn(metric):
    """The K selection's silhouette against scikit-learn's, on partitions with a one-row
    cluster, duplicate rows (zero distances) and many clusters; too few labels are refused."""
    from sklearn.metrics import pairwise_distances, silhouette_score

    rng = np.random.default_rng(3)
    X = rng.standard_normal((60, 7))
    X[5] = X[4]  # a zero distance off the diagonal
    D = pairwise_distances(X, metric=metric)
    np.fill_diagonal(D, 0.0)
    for labels in (
        rng.integers(0, 2, 60),
        rng.integers(0, 9, 60),
        np.r_[np.zeros(59, dtype=int), 1],  # a cluster of one row
        np.r_[np.arange(30), np.arange(30)] + 7,  # pairs, labels not starting at 0
    ):
        want = silhouette_score(D, labels, metric="precomputed")
        assert silhouette_precomputed(D, labels) == pytest.approx(want, rel=1e-12, abs=1e-14)
    for labels in (np.zeros(60, dtype=int), np.arange(60)):
        with pytest.raises(ValueError, match="distinct labels"):
            silhouette_precomputed(D, labels)


def test_k_selection_table_matches_sklearn(data):
    """Every table row is reproducible with scikit-learn directly on the (direct) SVD projection:
    the run the row keeps (its seed) has the row's silhouettes and sizes."""
    from sklearn.metrics import silhouette_score

    X, _ = data
    Xval = X[np.random.default_rng(0).choice(len(X), 200, replace=False)]
    est = GradientSpaceClustering(k_range=(2, 6), n_init=4, random_state=3).initialize(Xval)
    thresholds = {r["threshold"] for r in est.k_selection_}
    assert thresholds == {0.80, 0.85, 0.90, 0.95}
    assert len(est.k_selection_) == 4 * 5
    Xn, _ = normalize_rows(Xval)
    _, s, Vt = np.linalg.svd(Xn.astype(np.float64), full_matrices=False)
    ratio = np.cumsum(s**2) / np.sum(s**2)
    np.testing.assert_allclose(est.singular_values_, s, rtol=1e-6, atol=1e-6)
    cos_dist = np.sqrt(np.clip(2 - 2 * (Xn @ Xn.T).astype(np.float64), 0, None))
    np.fill_diagonal(cos_dist, 0)
    for row in est.k_selection_[::3]:
        k_v = row["n_components"]
        assert ratio[k_v - 1] >= row["threshold"] - 1e-9
        assert k_v == 1 or ratio[k_v - 2] < row["threshold"]
        assert 3 <= row["seed"] < 3 + 4
        P = Xn.astype(np.float64) @ Vt[:k_v].T
        labels = KMeans(row["k"], n_init=1, random_state=row["seed"]).fit(P).labels_
        assert silhouette_score(P, labels) == pytest.approx(row["silhouette"], abs=1e-4)
        assert silhouette_score(cos_dist, labels, metric="precomputed") == pytest.approx(
            row["silhouette_cosine"], abs=1e-4
        )
        assert sorted(np.bincount(labels).tolist(), reverse=True) == row["sizes"]
    # The rule, from the table alone: the clear row with the largest excess over the
    # structureless reference (before issue 23 section 4: the largest projection silhouette;
    # here both give the planted K).
    chosen = max((r for r in est.k_selection_ if r["clear"]), key=lambda r: r["excess"])
    assert est.n_clusters_ == chosen["k"] == 5 and est.silhouette_ == chosen["silhouette"]
    assert est.n_components_ == chosen["n_components"]
    valid = [r for r in est.k_selection_ if not r["rejected"]]
    assert est.n_clusters_ == max(valid, key=lambda r: r["silhouette"])["k"]
    assert est.cluster_centers_.shape == (est.n_clusters_, X.shape[1])
    # The centroids were lifted from the chosen subspace: they lie in span(V_k).
    V = Vt[: est.n_components_]
    C = est.cluster_centers_.astype(np.float64)
    assert np.abs(C - (C @ V.T) @ V).max() < 1e-4 * np.abs(C).max()


def _hand_est(centers, alpha=1, batch_size=2, beta=0.5):
    est = GradientSpaceClustering(
        alpha=alpha, batch_size=batch_size, beta=beta, n_clusters=2, min_cluster_size=1
    )
    est.n_clusters_ = len(centers)
    est.cluster_centers_ = np.array(centers, dtype=np.float32)
    est._reset_online_state(len(centers[0]))
    return est


def test_fifo_cache_evicts_oldest_and_ema_matches_hand_computation():
    # Two clusters along e0 and e1 in 3-D; cache size alpha * batch = 2.
    est = _hand_est([[1, 0, 0], [0, 1, 0]])
    e0, e1, e2 = np.eye(3, dtype=np.float32)
    a = np.array([1, 0.2, 0], np.float32)  # -> cluster 0
    b = np.array([2, 0, 0.4], np.float32)  # -> cluster 0 (norm does not matter)
    c = np.array([3, 0, -0.6], np.float32)  # -> cluster 0, evicts a
    an, bn, cn = (v / np.linalg.norm(v) for v in (a, b, c))

    est.partial_fit(np.stack([a, b]))
    assert est.last_labels_.tolist() == [0, 0]
    assert est.cache_count_.tolist() == [2, 0]
    expected0 = 0.5 * e0 + 0.5 * (an + bn) / 2
    np.testing.assert_allclose(est.cluster_centers_[0], expected0, rtol=1e-6)
    np.testing.assert_allclose(est.cluster_centers_[1], e1)  # empty cache: unchanged

    est.partial_fit(np.stack([c, 5 * e1]))
    assert est.last_labels_.tolist() == [0, 1]
    # FIFO: a was evicted, the cache holds b and c.
    cached = {tuple(np.round(v, 6)) for v in est.cache_[0]}
    assert cached == {tuple(np.round(bn, 6)), tuple(np.round(cn, 6))}
    expected0 = 0.5 * expected0 + 0.5 * (bn + cn) / 2
    np.testing.assert_allclose(est.cluster_centers_[0], expected0, rtol=1e-6)
    np.testing.assert_allclose(est.cluster_centers_[1], 0.5 * e1 + 0.5 * e1, rtol=1e-6)
    assert est.n_batches_seen_ == 2 and est.n_samples_seen_ == 4


def test_running_sum_stays_exact_over_many_wraps():
    """The running sums are updated, never summed afresh: over 3,000 batches (about 2,000
    wraps of each ring, uneven batches that wrap mid-write) they stay the cached rows' sums."""
    rng = np.random.default_rng(0)
    est = _hand_est([[1] + [0] * 7, [0, 1] + [0] * 6], alpha=3, batch_size=2)
    for t in range(3000):
        est.partial_fit(rng.standard_normal((1 + t % 4, 8)).astype(np.float32))
    for k in range(2):
        n = est.cache_count_[k]
        assert n == est.cache_size
        exact = est.cache_[k, :n].astype(np.float64).sum(0)
        np.testing.assert_allclose(est._cache_sum[k], exact, rtol=0, atol=1e-12)


def _plain_online_update(centers, batches, cap, beta):
    """The online update written plainly: one FIFO list per cluster, its mean recomputed from
    the rows, the EMA one cluster at a time (the reference for the host's fast path)."""
    C = np.array(centers, dtype=np.float32)
    fifos: list[list[np.ndarray]] = [[] for _ in C]
    labels = []
    for G in batches:
        norms = np.linalg.norm(G, axis=1)
        Xn = G / np.where(norms > 1e-12, norms, 1.0)[:, None]
        cn = np.linalg.norm(C, axis=1)
        lab = np.argmax((Xn @ C.T) / np.where(cn > 1e-12, cn, 1.0), axis=1)
        for x, k, n in zip(Xn, lab, norms):
            if n > 1e-12:
                fifos[k] = (fifos[k] + [x])[-cap:]
        for k, rows in enumerate(fifos):
            if rows:
                mean = np.asarray(rows, np.float64).mean(0)
                C[k] = (beta * C[k].astype(np.float64) + (1 - beta) * mean).astype(np.float32)
        labels.append(lab)
    return C, np.concatenate(labels)


@pytest.mark.parametrize("k", [1, 3, 7])
def test_online_update_equals_the_plain_fifo_and_ema(k):
    # Uneven batches (some larger than a cache: everything before the last cap rows is
    # evicted at once), zero rows, many wraps of every ring, K = 1 to 7.
    rng = np.random.default_rng(k)
    d, alpha, batch_size = 24, 2, 4
    means = rng.standard_normal((k, d))
    centers = (means + 0.3 * rng.standard_normal((k, d))).astype(np.float32)
    batches = []
    for t in range(120):
        m = [1, 4, 9, 3][t % 4]
        G = means[rng.integers(0, k, m)] + 0.8 * rng.standard_normal((m, d))
        if t % 11 == 5:
            G[0] = 0.0
        batches.append(G.astype(np.float32))
    est = _hand_est(centers.tolist(), alpha=alpha, batch_size=batch_size)
    labels = []
    for G in batches:
        est.partial_fit(G)
        labels.append(est.last_labels_)
    ref_centers, ref_labels = _plain_online_update(centers, batches, alpha * batch_size, est.beta)
    np.testing.assert_array_equal(np.concatenate(labels), ref_labels)
    np.testing.assert_allclose(est.cluster_centers_, ref_centers, rtol=1e-5, atol=1e-6)
    for c in range(k):  # the running sums are the cached rows' sums
        n = est.cache_count_[c]
        np.testing.assert_allclose(
            est._cache_sum[c], est.cache_[c, :n].astype(np.float64).sum(0), atol=1e-9
        )


def test_end_epoch_convergence_is_the_share_of_changed_assignments():
    # beta = 0: the centroids jump to the cache means, so the hand computation is exact.
    est = _hand_est([[1, 0], [0, 1]], beta=0.0)
    est.tol = 0.2
    est.partial_fit(np.array([[1, 0.2], [0.1, 1]], np.float32))  # labels 0, 1: no change
    # centroids now the cache means; a row at 40 degrees: label 0 before and after
    est.partial_fit(np.array([[1, 0.8], [1, 0.1]], np.float32))
    # cluster 0 moved towards (1, 0.45); (0.8, 1) flips from 1 (start) to 0 (in force)
    est.partial_fit(np.array([[0.8, 1], [0, 1]], np.float32))
    start = np.array([[1, 0], [0, 1]], np.float32)
    assert cosine_assign(normalize_rows(np.array([[0.8, 1]], np.float32))[0], start)[0] == 1
    assert est.last_labels_.tolist() == [0, 1]
    assert est.end_epoch() is True  # 1 of 6 changed <= 0.2
    assert est.changed_share_history_ == [pytest.approx(1 / 6)]
    assert est.stop_reason_ == "converged"
    assert est.shift_history_[0] > 0  # the centroids moved, but the partition held
    est.tol = 0.1
    est.partial_fit(np.array([[1, 0], [0, 1]], np.float32))
    assert est.end_epoch() is True and est.changed_share_history_[-1] == 0.0


def test_stop_reason_max_epochs_when_assignments_keep_changing():
    X, _ = planted(seed=1, d=400, sizes=(80, 80, 80), noise=10.0)
    est = GradientSpaceClustering(n_clusters=3, tol=0.0, max_epochs=2, batch_size=16).fit(X)
    assert est.epoch_ == 2 and not est.converged_ and est.stop_reason_ == "max_epochs"
    assert est.changed_share_history_[-1] > 0


def test_all_equal_gradients_give_one_cluster_or_a_clear_error():
    # K = 1 is allowed by default (k_range[0] == 1): identical gradients are one cluster.
    X = np.tile(np.arange(1, 51, dtype=np.float32), (40, 1))
    est = GradientSpaceClustering().initialize(X)
    assert est.n_clusters_ == 1 and est.single_cluster_reason_
    np.testing.assert_allclose(est.cluster_centers_[0], X[0] / np.linalg.norm(X[0]), rtol=1e-5)
    with pytest.raises(DegenerateGradientsError, match="one direction"):
        GradientSpaceClustering(k_range=(2, 8)).initialize(X)


def test_all_equal_gradients_with_fixed_k_give_finite_centroids():
    X = np.tile(np.arange(1, 51, dtype=np.float32), (40, 1))
    est = GradientSpaceClustering(n_clusters=3).fit(X, G_val=X)
    assert np.isfinite(est.cluster_centers_).all()
    assert est.labels_.shape == (40,)


def test_zero_gradients_error_and_fallback():
    with pytest.raises(DegenerateGradientsError):
        GradientSpaceClustering().initialize(np.zeros((30, 10), np.float32))
    X, _ = planted(d=500, sizes=(60, 60, 60))
    est = GradientSpaceClustering(k_range=(2, 4)).fit(X)
    with_zeros = np.vstack([X[:5], np.zeros((3, X.shape[1]), np.float32)])
    est.partial_fit(with_zeros)
    assert est.n_zero_gradients_ == 3
    assert np.isfinite(est.cluster_centers_).all()
    assert est.predict(np.zeros((2, X.shape[1]), np.float32)).tolist() == [0, 0]


def test_fewer_samples_than_k_is_an_error():
    X, _ = planted(d=300, sizes=(2, 2))
    with pytest.raises(DegenerateGradientsError, match="too few"):
        GradientSpaceClustering(n_clusters=6).initialize(X)


def test_bad_hyperparameters_are_rejected():
    X, _ = planted(d=300, sizes=(20, 20))
    with pytest.raises(ValueError, match="beta"):
        GradientSpaceClustering(beta=1.0).initialize(X)
    with pytest.raises(ValueError, match="k_range"):
        GradientSpaceClustering(k_range=(0, 3)).initialize(X)
    with pytest.raises(ValueError, match="min_cluster_size"):
        GradientSpaceClustering(min_cluster_size=0).initialize(X)
    with pytest.raises(ValueError, match="tol"):
        GradientSpaceClustering(tol=2.0).initialize(X)


def test_partial_fit_before_initialize_is_an_error():
    from sklearn.exceptions import NotFittedError

    for call in ("partial_fit", "predict"):
        with pytest.raises(RuntimeError, match="initialize"):
            getattr(GradientSpaceClustering(), call)(np.ones((2, 3), np.float32))
        with pytest.raises(NotFittedError, match=f"before {call}"):  # scikit-learn's kind too
            getattr(GradientSpaceClustering(), call)(np.ones((2, 3), np.float32))


def test_the_clusterer_follows_scikit_learn_conventions():
    """get_params / set_params / clone (a fresh, unfitted copy with the same settings),
    check_is_fitted, and fit_predict equal to fit(...).labels_."""
    from sklearn.base import clone
    from sklearn.utils.validation import check_is_fitted

    X, _ = planted(seed=3, d=300, sizes=(60, 60), noise=1.0)
    est = GradientSpaceClustering(n_clusters=2, batch_size=16, max_epochs=2, alpha=3)
    params = est.get_params()
    assert params["n_clusters"] == 2 and params["alpha"] == 3 and params["cache"] == "samples"
    labels = est.fit_predict(X)
    check_is_fitted(est, "cluster_centers_")
    twin = clone(est)
    assert twin.get_params() == params and not hasattr(twin, "cluster_centers_")
    np.testing.assert_array_equal(twin.fit(X).labels_, labels)  # same settings, same answer
    assert twin.set_params(beta=0.5).beta == 0.5


def test_state_dict_round_trip_continues_identically(data):
    X, _ = data
    X = X[:, :2000]
    a = GradientSpaceClustering(random_state=0, batch_size=16).initialize(X[:200])
    for i in range(0, 320, 16):
        a.partial_fit(X[i : i + 16])
    b = GradientSpaceClustering(random_state=0, batch_size=16).load_state_dict(a.state_dict())
    for i in range(320, 640, 16):
        a.partial_fit(X[i : i + 16])
        b.partial_fit(X[i : i + 16])
    np.testing.assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def _external_step(est, memo, step, batch):
    """What a worker and the centroid host do together for one batch (external cache)."""
    Xn, norms = normalize_rows(batch)
    keep = norms > 0
    labels = cosine_assign(Xn, est.cluster_centers_)  # worker: assign against its copy
    start = cosine_assign(Xn, est.epoch_start_centers)
    memo[step] = Xn
    added, _ = cluster_sums(Xn, labels, est.n_clusters_, keep)
    evicted = np.zeros_like(added)
    for old_step, entries in est.push_ledger(step, labels, keep, start).items():
        for row, k in entries:  # the owner of old_step sums what leaves
            evicted[k] += memo[old_step][row]
    est.partial_fit_external(added, evicted, len(batch), int((~keep).sum()))
    return labels


def test_external_ledger_hand_computed_eviction():
    est = GradientSpaceClustering(alpha=1, batch_size=2, n_clusters=2, cache="external")
    est.n_clusters_ = 2
    est.cluster_centers_ = np.eye(2, dtype=np.float32)
    est._reset_online_state(2)
    labels = np.array([0, 0])
    assert est.push_ledger(0, labels, np.array([True, True])) == {}
    assert est.push_ledger(1, np.array([0, 1]), np.array([True, False])) == {0: [(0, 0)]}
    assert [list(q) for q in est.ledger_] == [[(0, 1), (1, 0)], []]
    assert est.oldest_live_step() == 0
    with pytest.raises(ValueError, match="samples"):
        est.partial_fit(np.ones((2, 2), np.float32))


def test_external_cache_equals_the_in_memory_cache(data):
    """Vectors kept outside (worker side) give the same centroids and labels as the paper's
    in-memory cache, batch after batch."""
    X, _ = data
    X = X[:, :4000]
    kwargs = dict(random_state=0, batch_size=32, alpha=2)
    a = GradientSpaceClustering(**kwargs).initialize(X[:200])
    b = GradientSpaceClustering(cache="external", **kwargs).initialize(X[:200])
    memo = {}
    order = np.random.default_rng(0).permutation(len(X))
    for step, start in enumerate(range(0, 2 * len(X), 32)):  # two epochs: many evictions
        batch = X[order[np.arange(start, start + 32) % len(X)]]
        a.partial_fit(batch)
        labels = _external_step(b, memo, step, batch)
        np.testing.assert_array_equal(a.last_labels_, labels)
        np.testing.assert_array_equal(a.cache_count_, b.cache_count_)
        if step % 30 == 29:  # epochs end at the same batches on both
            assert a.end_epoch() == b.end_epoch()
    assert a.changed_share_history_ == b.changed_share_history_
    assert a.cluster_sizes_seen_ == b.cluster_sizes_seen_ and a.small_clusters_ == b.small_clusters_
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    assert b.oldest_live_step() > 0
    state = b.state_dict()
    assert "ledger_" in state and "cache_" not in state


# --------------------------------------------------------------------------- issue 10

# Planted mixtures (d = 2,000): name -> (planted kwargs, true K, accepted K, min ARI). Thresholds
# from measurement over seeds 0-2 (see the report of issue 10): every case gave the true K and
# ARI 1.0, except where a tiny cluster had 5 rows in the 256-row validation sample: there the
# silhouette preferred merging it (K one less than planted, ARI 0.98-0.99).
MIXTURES = {
    "five_two_decades": (dict(sizes=(400, 250, 150, 120, 80), decades=2.0), {5}, 0.95),
    "eight_with_30_rows": (dict(sizes=(300, 200, 150, 100, 80, 60, 40, 30)), {7, 8}, 0.95),
    "tiny_true_clusters": (dict(sizes=(400, 300, 200, 30, 30)), {4, 5}, 0.95),
    "noisy_six": (dict(sizes=(300, 200, 150, 100, 80, 60), noise=1.2), {6}, 0.95),
    "five_plus_outliers": (dict(sizes=(400, 250, 150, 120, 80), outliers=6), {5}, 0.95),
    "one_cluster": (dict(sizes=(600,), noise=0.8), {1}, 1.0),
    "one_cluster_low_noise": (dict(sizes=(600,), noise=0.2), {1}, 1.0),
}


# Where the structureless reference (null_draws > 0) is worse than the old fixed floor: small true
# clusters beside large ones (docs/k_selection.md, "Where it is worse than the old rule"). Strict:
# a fix makes these pass, and then the marks must go.
SMALL_CLUSTERS_MISSED = pytest.mark.xfail(
    strict=True, reason="the reference rule misses 3% clusters in a 256-row validation sample"
)
KNOWN_MISSES = {("tiny_true_clusters", 0), ("tiny_true_clusters", 1), ("five_plus_outliers", 0)}


@pytest.mark.parametrize(
    ("name", "seed"),
    [
        pytest.param(name, seed, marks=[SMALL_CLUSTERS_MISSED] * ((name, seed) in KNOWN_MISSES))
        for name in MIXTURES
        for seed in (0, 1)
    ],
)
def test_planted_mixtures_k_ari_and_no_small_cluster(name, seed):
    kwargs, ks, min_ari = MIXTURES[name]
    X, y = planted(seed=seed, d=2000, **kwargs)
    est = GradientSpaceClustering(random_state=seed, n_init=5).fit(X)
    real = y >= 0
    assert est.n_clusters_ in ks
    assert adjusted_rand_score(y[real], est.labels_[real]) >= min_ari
    # No reported cluster under the minimum: the chosen K selection run, and the online epochs.
    if est.n_clusters_ > 1:
        chosen = [
            r
            for r in est.k_selection_
            if r["k"] == est.n_clusters_ and r["n_components"] == est.n_components_
        ]
        assert chosen and min(chosen[0]["sizes"]) >= est.min_size_
    assert est.small_clusters_ == []
    assert min(np.bincount(est.labels_, minlength=est.n_clusters_)) >= est.min_size(len(X))
    # Clean data converges early, by the documented rule.
    assert est.converged_ and est.stop_reason_ == "converged" and est.epoch_ < est.max_epochs


def test_agrees_with_kmeans_on_unit_rows_given_the_true_k():
    """Reference: scikit-learn K-means on the unit rows with the planted K."""
    X, y = planted(seed=3, d=2000, sizes=(300, 200, 150, 100, 60))
    ours = GradientSpaceClustering(random_state=0, n_init=5).fit(X).labels_
    with threadpool_limits(1):
        ref = KMeans(5, n_init=4, random_state=0).fit(normalize_rows(X)[0]).labels_
    assert adjusted_rand_score(ref, ours) >= 0.95 and adjusted_rand_score(y, ref) >= 0.95


def test_splinter_candidates_are_rejected_and_reported():
    X, y = planted(seed=0, d=2000, sizes=(500,), noise=0.3, outliers=12)
    est = GradientSpaceClustering(k_range=(1, 6), n_init=3, min_cluster_size=15).initialize(X)
    # the 12 pure-noise rows can only make clusters below 15 rows: all those runs are rejected,
    # and without a valid K >= 2 the answer is one cluster
    assert est.min_size_ == 15
    assert any(r["rejected"] for r in est.k_selection_)
    for row in est.k_selection_:
        if row["rejected"]:
            assert min(row["sizes"]) < 15 and "smallest cluster" in row["reason"]
            assert row["valid_inits"] == 0
        else:
            assert min(row["sizes"]) >= 15
    assert est.n_clusters_ == 1
    # The old rule (best silhouette, no minimum) takes a splinter of outliers as a cluster.
    loose = GradientSpaceClustering(
        k_range=(2, 6), n_init=3, min_cluster_size=1, min_cluster_share=0.0
    ).initialize(X)
    chosen = [
        r
        for r in loose.k_selection_
        if r["k"] == loose.n_clusters_ and r["n_components"] == loose.n_components_
    ]
    assert min(chosen[0]["sizes"]) < 15
    # scored by the same rule: the minimum size also binds a fixed K's runs
    with pytest.warns(UserWarning, match="least bad"):
        GradientSpaceClustering(n_clusters=2, min_cluster_size=400, n_init=2).initialize(X)


def test_one_cluster_answer_and_its_threshold():
    X, _ = planted(seed=2, d=1000, sizes=(300,), noise=0.5)
    est = GradientSpaceClustering(n_init=2).initialize(X)
    assert est.n_clusters_ == 1 and "weak" in est.single_cluster_reason_ and est.structure_["weak"]
    assert np.isnan(est.silhouette_)
    best = max((r for r in est.k_selection_ if not r["rejected"]), key=lambda r: r["silhouette"])
    assert best["silhouette_cosine"] < 0.01  # one-cluster data: no structure in cosine terms
    # The projection silhouette alone would have split it (why the rule is in cosine terms).
    assert best["silhouette"] > 0.3 or best["n_components"] > 1
    # Without the reference and with no floor, a split would be accepted.
    forced = GradientSpaceClustering(n_init=2, null_draws=0, min_silhouette=-1.0).initialize(X)
    assert forced.n_clusters_ >= 2


def test_small_cluster_in_the_online_phase_is_kept_and_reported():
    est = _hand_est([[1, 0, 0], [0, 1, 0], [0, 0, 1]], alpha=2, batch_size=4)
    rng = np.random.default_rng(0)
    for _ in range(5):  # nothing ever points along e2
        est.partial_fit(np.abs(rng.standard_normal((4, 3))).astype(np.float32) * [1, 1, 0.01])
    with pytest.warns(UserWarning, match=r"clusters \[2\]"):
        est.end_epoch()
    assert est.small_clusters_ == [2]
    assert est.cluster_sizes_seen_[0][2] == 0 and sum(est.cluster_sizes_seen_[0]) == 20
    np.testing.assert_array_equal(est.cluster_centers_[2], [0, 0, 1])  # kept as it was


def _fitted(d=50):
    X, _ = planted(seed=0, d=d, sizes=(40, 40))
    return GradientSpaceClustering(n_clusters=2, n_init=2).initialize(X), X


def test_nonfinite_rows_helper():
    G = np.ones((6, 4), np.float32)
    G[1, 2], G[4, 0], G[4, 1] = np.nan, np.inf, -np.inf
    assert nonfinite_rows(G).tolist() == [1, 4]
    assert nonfinite_rows(np.ones((3, 2), np.int64)).tolist() == []


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_input_is_rejected_everywhere_naming_the_rows(bad):
    est, X = _fitted()
    B = X[:8].copy()
    B[[2, 5], 3] = bad
    with pytest.raises(ValueError, match=r"non-finite.*2 of 8 rows.*\[2, 5\]"):
        GradientSpaceClustering().initialize(B)
    with pytest.raises(ValueError, match=r"\[2, 5\]"):
        GradientSpaceClustering().fit(np.vstack([B, X]))
    before = est.cluster_centers_.copy()
    with pytest.raises(ValueError, match=r"partial_fit.*\[2, 5\]"):
        est.partial_fit(B)
    np.testing.assert_array_equal(est.cluster_centers_, before)  # nothing applied
    assert est.n_batches_seen_ == 0
    with pytest.raises(ValueError, match=r"predict.*\[2, 5\]"):
        est.predict(B)
    ext = GradientSpaceClustering(n_clusters=2, n_init=2, cache="external").initialize(X)
    sums = np.zeros((2, X.shape[1]))
    sums[1, 0] = bad
    with pytest.raises(ValueError, match=r"added .*clusters\) \[1\]"):
        ext.partial_fit_external(sums, np.zeros_like(sums), 8)


@pytest.mark.parametrize(
    "G, match",
    [
        (np.ones(50, np.float32), r"2-D array .*1-D array of shape \(50,\).*reshape"),
        (np.ones((2, 3, 50), np.float32), r"2-D array .*3-D array of shape \(2, 3, 50\)"),
        (np.ones((4, 49), np.float32), r"expected 50 features .*got 49"),
        (np.ones((0, 50), np.float32), r"at least 1 row.*empty"),
        (np.array([["a"] * 50]), r"real numeric array"),
    ],
)
def test_bad_shapes_are_rejected_saying_what_was_expected(G, match):
    est, _ = _fitted()
    for call in (est.partial_fit, est.predict):
        with pytest.raises(ValueError, match=match):
            call(G)
    assert est.n_batches_seen_ == 0  # in particular, an empty batch is not an EMA step
    if G.ndim != 2 or len(G) == 0 or G.dtype.kind == "U":
        for call in (GradientSpaceClustering().initialize, GradientSpaceClustering().fit):
            with pytest.raises(ValueError, match=match):
                call(G)
    ext = GradientSpaceClustering(n_clusters=2, n_init=2, cache="external")
    ext.initialize(_fitted()[1])
    with pytest.raises(ValueError, match=r"added of shape \(2, 50\)"):
        ext.partial_fit_external(np.zeros((2, 49)), np.zeros((2, 49)), 4)
    with pytest.raises(ValueError, match="empty batch"):
        ext.partial_fit_external(np.zeros((2, 50)), np.zeros((2, 50)), 0)


def test_gram_svd_equals_direct_svd_subspace():
    from scipy.linalg import subspace_angles

    rng = np.random.default_rng(0)
    X = (rng.standard_normal((40, 7)) @ rng.standard_normal((7, 3000))).astype(np.float32)
    X += 0.01 * rng.standard_normal(X.shape).astype(np.float32)
    U, s, Vt = gram_svd(X, n_components=7)
    _, s_ref, Vt_ref = np.linalg.svd(X.astype(np.float64), full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:7], rtol=1e-6)
    for k in (1, 3, 7):
        angles = subspace_angles(Vt[:k].T.astype(np.float64), Vt_ref[:k].T)
        assert np.max(angles) < 1e-4
    np.testing.assert_allclose(np.linalg.norm(Vt, axis=1), 1.0, atol=1e-5)
    U_ref = np.linalg.svd(X.astype(np.float64), full_matrices=False)[0]
    low_rank = (U_ref[:, :7] * s_ref[:7]) @ Vt_ref[:7]
    np.testing.assert_allclose((U * s) @ Vt, low_rank, atol=1e-4 * np.abs(X).max())


def test_summary_is_json_and_without_caches_pickles_small():
    import json
    import pickle

    X, _ = planted(seed=0, d=500, sizes=(60, 60, 60))
    est = GradientSpaceClustering(n_init=2, batch_size=16).fit(X)
    summary = json.loads(json.dumps(est.summary(), allow_nan=False))
    assert summary["k"] == est.n_clusters_ and summary["stop_reason"] == est.stop_reason_
    assert summary["k_selection"] and "sizes" in summary["k_selection"][0]
    assert summary["cluster_sizes_seen"] and summary["changed_share"]
    light = est.without_caches()
    assert not hasattr(light, "cache_") and not hasattr(light, "_cache_sum")
    assert hasattr(est, "cache_")  # the original keeps its caches
    again = pickle.loads(pickle.dumps(light))
    np.testing.assert_array_equal(again.predict(X), est.labels_)
    assert len(pickle.dumps(light)) < len(pickle.dumps(est)) / 5
    assert again.summary() == est.summary()


# --------------------------------------------------------------------------- issue 23, section 4

# K selection against a structureless reference (``null_draws``): planted mixtures from
# tests/planted_mixtures.py, small d and n so each fit takes a second or two. The rule was
# developed on d = 64..256, n = 200..256 (docs/k_selection.md has the full grid over d = 64 and
# 1,024 and the old rule's numbers); the holdout cases below use other sizes, dimensions and
# size ratios.
FAST = dict(n_init=3)
K_CASES = {  # name -> (generator case, planted K, minimum ARI; None: K = 1 and weak)
    "separated_k5": (dict(gen="mixture", n=200, d=96, k=5, cos=0.0, noise=1.0), 5, 0.99),
    "overlapping_k5": (dict(gen="mixture", n=220, d=128, k=5, cos=0.5, noise=1.25), 5, 0.9),
    "one_gaussian": (dict(gen="one_cluster", n=200, d=96, kind="gaussian"), 1, None),
    "one_anisotropic": (dict(gen="one_cluster", n=200, d=96, kind="anisotropic"), 1, None),
    "one_heavy_tailed": (dict(gen="one_cluster", n=200, d=96, kind="heavy"), 1, None),
    "structureless": (dict(gen="structureless", n=200, d=96), 1, None),
    # holdout: sizes, dimensions and shares not used while developing the rule
    "holdout_k4_d700": (
        dict(gen="mixture", n=300, d=700, k=4, cos=0.3, noise=1.4, size_ratio=6.0),
        4,
        0.95,
    ),
    "holdout_k3_d40": (dict(gen="mixture", n=150, d=40, k=3, cos=0.5, noise=1.0), 3, 0.95),
    "holdout_heavy_d600": (dict(gen="one_cluster", n=260, d=600, kind="heavy", noise=2.0), 1, None),
    "holdout_structureless_wide": (dict(gen="structureless", n=150, d=1500), 1, None),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(K_CASES))
def test_k_selection_against_the_structureless_reference(name, seed):
    from planted_mixtures import make

    case, k_true, min_ari = K_CASES[name]
    X, y = make(case, seed=10 + seed)
    est = GradientSpaceClustering(random_state=seed, **FAST).initialize(X)
    structure = est.summary()["structure"]
    assert est.n_clusters_ == k_true, structure["verdict"]
    assert structure["k"] == k_true and structure["rule"] == "null"
    if min_ari is None:  # no structure: one cluster, and said to be weak
        assert structure["weak"] and "weak" in structure["verdict"]
        assert "weak" in est.single_cluster_reason_ and structure["chosen"] is None
    else:
        assert not structure["weak"] and est.single_cluster_reason_ is None
        assert adjusted_rand_score(y, est.init_labels_) >= min_ari
        chosen = structure["chosen"]
        row = next(r for r in structure["per_k"] if r["k"] == k_true)
        assert chosen["k"] == k_true and row["clear"]
        assert row["z"] >= est.null_margin and row["excess"] > 0


def test_the_old_fixed_floor_splits_one_cluster_data():
    """Why the reference: a one-cluster mixture whose K-means split scores a cosine silhouette
    far above the old fixed floor (0.02) is still one cluster, because structureless data with
    the same spectrum and spread of angles scores as much."""
    from planted_mixtures import one_cluster

    for kind in ("anisotropic", "heavy"):
        X, _ = one_cluster(seed=10, n=200, d=96, kind=kind)
        old = GradientSpaceClustering(null_draws=0, min_silhouette=0.02, **FAST).initialize(X)
        assert old.n_clusters_ >= 2 and old.structure_["rule"] == "floor"
        new = GradientSpaceClustering(**FAST).initialize(X)
        assert new.n_clusters_ == 1 and new.structure_["weak"]
        best = max(new.structure_["per_k"], key=lambda r: r["silhouette_cosine"])
        assert best["silhouette_cosine"] > 0.05  # well above the old floor ...
        assert best["z"] < new.null_margin  # ... but not above the reference


def test_structure_columns_match_sklearn_and_their_definitions():
    """The table's silhouettes are scikit-learn's on the kept run (reproduced from its seed);
    excess, z and clear follow from them and the null columns; structure.per_k holds each K's
    row with the largest excess."""
    from planted_mixtures import mixture
    from sklearn.metrics import silhouette_score

    X, _ = mixture(seed=3, n=160, d=64, k=3, cos=0.2, noise=1.0)
    est = GradientSpaceClustering(k_range=(1, 5), **FAST).initialize(X)
    Xn = normalize_rows(X)[0].astype(np.float64)
    _, s, Vt = np.linalg.svd(Xn, full_matrices=False)
    chord = np.sqrt(np.clip(2 - 2 * Xn @ Xn.T, 0, None))
    np.fill_diagonal(chord, 0)
    for row in est.k_selection_:
        P = Xn @ Vt[: row["n_components"]].T
        labels = KMeans(row["k"], n_init=1, random_state=row["seed"]).fit(P).labels_
        assert silhouette_score(chord, labels, metric="precomputed") == pytest.approx(
            row["silhouette_cosine"], abs=1e-4
        )
        assert row["excess"] == pytest.approx(row["silhouette_cosine"] - row["null_silhouette"])
        assert row["z"] == pytest.approx(row["excess"] / row["null_std"])
        assert row["clear"] == (not row["rejected"] and row["z"] >= est.null_margin)
    for entry in est.structure_["per_k"]:  # the chosen row, else the clear, else largest excess
        same_k = [r for r in est.k_selection_ if r["k"] == entry["k"] and not r["rejected"]]
        if entry["k"] != est.n_clusters_:
            pool = [r for r in same_k if r["clear"]] or same_k
            assert entry["excess"] == max(r["excess"] for r in pool)
    assert est.n_clusters_ == 3 and est.structure_["chosen"]["k"] == 3


def test_structureless_null_matches_its_own_data():
    """On structureless data (the reference's own model) the data's cosine silhouettes sit
    inside the reference's spread: no excess, and no large deficit either (drawing from the
    data's sample spectrum without the narrowing step put the reference 2-5 sd above)."""
    from planted_mixtures import structureless

    X, _ = structureless(seed=4, n=180, d=150)
    est = GradientSpaceClustering(**FAST).initialize(X)
    z = np.array([r["z"] for r in est.k_selection_ if not r["rejected"]])
    assert z.max() < est.null_margin and np.median(np.abs(z)) < 2.0


def test_acg_variances_give_the_target_second_moments():
    """Independent Monte Carlo check of the fitted angular-Gaussian variances: normalised
    Gaussian draws with them reproduce the target second moments (the target itself, used as
    variances, does not: normalising flattens a spectrum)."""
    from gs_ray.core.clustering import _acg_variances

    target = 1.0 / np.arange(1, 41)
    target /= target.sum()
    lam = _acg_variances(target, np.random.default_rng(0))
    rng = np.random.default_rng(1)

    def moments(var):
        g = rng.standard_normal((40_000, len(var))) * np.sqrt(var)
        return ((g / np.linalg.norm(g, axis=1, keepdims=True)) ** 2).mean(0)

    np.testing.assert_allclose(moments(lam)[:5], target[:5], rtol=0.03)
    assert moments(target)[0] < 0.9 * target[0]


def test_structure_in_summary_json_and_checkpoint():
    import json

    from planted_mixtures import structureless

    X, _ = structureless(seed=5, n=120, d=64)
    est = GradientSpaceClustering(k_range=(2, 4), **FAST).initialize(X)
    summary = json.loads(json.dumps(est.summary(), allow_nan=False))
    structure = summary["structure"]
    assert structure["weak"] and est.n_clusters_ >= 2  # K = 1 not allowed: kept, said weak
    assert "K=1 is not allowed" in structure["reason"]
    assert [r["k"] for r in structure["per_k"]] == [2, 3, 4]
    assert {"null_silhouette", "excess", "z", "clear"} <= set(summary["k_selection"][0])
    again = GradientSpaceClustering().load_state_dict(est.state_dict())
    assert again.structure_ == est.structure_
    with pytest.raises(ValueError, match="null_draws"):
        GradientSpaceClustering(null_draws=-1).initialize(X)


def test_batched_fifo_equals_a_row_by_row_fifo():
    """The cache takes a batch's rows of a cluster at once (``_push_rows``); against a plain
    FIFO (a deque, one row at a time): the same rows in the same order, the same count and the
    same mean, through many wraps, batches larger than the cache and empty ones."""
    from collections import deque

    rng = np.random.default_rng(3)
    est = _hand_est([[1] + [0] * 5, [0, 1] + [0] * 4], alpha=2, batch_size=3)  # cache size 6
    ref = [deque(maxlen=est.cache_size) for _ in range(2)]
    for m in [0, 1, 5, 2, 6, 9, 3, 4, 13, 1, 1, 1, 7, 0, 2, 5] * 3:
        rows = rng.standard_normal((m, 6)).astype(np.float32)
        est._push_rows(1, rows)
        ref[1].extend(rows)
        n = est.cache_count_[1]
        assert n == len(ref[1])
        # ring order: the oldest row sits at the next write position once full
        start = est.cache_next_[1] if n == est.cache_size else 0
        ring = np.roll(est.cache_[1, :n], -start, axis=0) if n else est.cache_[1, :0]
        np.testing.assert_array_equal(ring, np.array(list(ref[1])).reshape(-1, 6))
        if n:
            want = np.array(list(ref[1]), dtype=np.float64).mean(0)
            np.testing.assert_allclose(est.cache_mean(1), want, atol=1e-9)
    assert est.cache_count_[0] == 0 and est.cache_mean(0) is None
