"""The GradientSpace clusterer on plain arrays: planted clusters, hand-computed cache/EMA cases,
degenerate inputs. No Ray, no model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from gs_ray.core.clustering import DegenerateGradientsError, GradientSpaceClustering, normalize_rows


def planted(seed: int = 0, d: int = 20_000, sizes=(400, 250, 150, 120, 80), noise: float = 0.8):
    """Gradients shaped like real ones: a shared mean direction, 5 cluster directions with
    unequal sizes, one pair of opposite (conflicting) directions, norms spread over an order of
    magnitude, isotropic noise with as much energy as the signal's order."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal(d)
    common /= np.linalg.norm(common)
    dirs = []
    for _ in sizes:
        u = rng.standard_normal(d)
        dirs.append(0.5 * common + np.sqrt(0.75) * u / np.linalg.norm(u))
    dirs[1] = -dirs[0]  # conflicting gradients: must not share a cluster
    X, y = [], []
    for k, n in enumerate(sizes):
        scale = np.exp(rng.uniform(np.log(0.1), np.log(1.0), n))
        noise_part = rng.standard_normal((n, d)) / np.sqrt(d)
        X.append(scale[:, None] * (dirs[k][None, :] + noise * noise_part))
        y += [k] * n
    return np.vstack(X).astype(np.float32), np.array(y)


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
    raw = adjusted_rand_score(y, KMeans(5, n_init=10, random_state=0).fit(X).labels_)
    assert raw < 0.6  # the norm spread confuses Euclidean K-means
    assert ours >= raw + 0.3


def test_k_selection_table_matches_sklearn(data):
    """Every table row is reproducible with scikit-learn directly on the SVD projection."""
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
    for row in est.k_selection_[::3]:
        k_v = row["n_components"]
        assert ratio[k_v - 1] >= row["threshold"] - 1e-9
        assert k_v == 1 or ratio[k_v - 2] < row["threshold"]
        P = Xn @ Vt[:k_v].T.astype(np.float32)
        labels = KMeans(row["k"], n_init=4, random_state=3).fit(P).labels_
        assert silhouette_score(P, labels) == pytest.approx(row["silhouette"], abs=1e-4)
    best = max(est.k_selection_, key=lambda r: r["silhouette"])
    assert est.n_clusters_ == best["k"] and est.silhouette_ == best["silhouette"]
    assert est.cluster_centers_.shape == (est.n_clusters_, X.shape[1])


def _hand_est(centers, alpha=1, batch_size=2, beta=0.5):
    est = GradientSpaceClustering(alpha=alpha, batch_size=batch_size, beta=beta, n_clusters=2)
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
    rng = np.random.default_rng(0)
    est = _hand_est([[1] + [0] * 7, [0, 1] + [0] * 6], alpha=3, batch_size=2)
    for _ in range(50):
        est.partial_fit(rng.standard_normal((2, 8)).astype(np.float32))
    for k in range(2):
        n = est.cache_count_[k]
        if n:
            exact = est.cache_[k, :n].astype(np.float64).mean(0)
            np.testing.assert_allclose(est.cache_mean(k), exact, atol=1e-6)


def test_end_epoch_reports_shift_and_convergence():
    est = _hand_est([[1, 0], [0, 1]], beta=0.0)
    est.tol = 1e-3
    est.partial_fit(np.array([[1, 1], [0, 1]], np.float32))
    assert est.end_epoch() is False
    assert est.shift_history_[0] == pytest.approx(1 - np.cos(np.pi / 4), rel=1e-5)
    est.partial_fit(np.array([[1, 1], [0, 1]], np.float32))
    assert est.end_epoch() is True  # caches unchanged in direction: no shift


def test_all_equal_gradients_give_a_clear_error():
    X = np.tile(np.arange(1, 51, dtype=np.float32), (40, 1))
    with pytest.raises(DegenerateGradientsError, match="one direction"):
        GradientSpaceClustering().initialize(X)


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
        GradientSpaceClustering(k_range=(1, 3)).initialize(X)


def test_partial_fit_before_initialize_is_an_error():
    with pytest.raises(RuntimeError, match="initialize"):
        GradientSpaceClustering().partial_fit(np.ones((2, 3), np.float32))


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
    from gs_ray.core.clustering import cluster_sums, cosine_assign

    Xn, norms = normalize_rows(batch)
    keep = norms > 0
    labels = cosine_assign(Xn, est.cluster_centers_)  # worker: assign against its copy
    memo[step] = Xn
    added, _ = cluster_sums(Xn, labels, est.n_clusters_, keep)
    evicted = np.zeros_like(added)
    for old_step, entries in est.push_ledger(step, labels, keep).items():
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
    np.testing.assert_allclose(a.cluster_centers_, b.cluster_centers_, atol=1e-6)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))
    assert b.oldest_live_step() > 0
    state = b.state_dict()
    assert "ledger_" in state and "cache_" not in state
