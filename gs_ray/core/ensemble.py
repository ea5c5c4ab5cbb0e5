"""Combining K experts at inference: weights from gradient similarity (ELREA) and the mixture's
loss. Pure NumPy.

ELREA (Li et al., 2024) weighs each expert by how close a query's gradient lies to that expert's
cluster: ``w = softmax(cos(g, c_k) / T)`` over the cluster centroids ``c_k``. The ensemble's
next-token distribution is the weighted mixture of the experts' distributions, so its loss on a
token is ``-log sum_k w_k p_k(token)``; a sample's loss is the mean over its response tokens
(the same reduction as every other loss in gs-ray).
"""

from __future__ import annotations

import numpy as np

from gs_ray.core.cosine import unit_rows


def gradient_similarity_probs(
    grads: np.ndarray, centroids: np.ndarray, temperature: float = 0.1
) -> np.ndarray:
    """Softmax over clusters of the cosine similarity of each gradient to each centroid,
    divided by ``temperature``: ``(n, d), (K, d) -> (n, K)``, rows summing to 1."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    grads = np.atleast_2d(np.asarray(grads, dtype=np.float64))
    centroids = np.atleast_2d(np.asarray(centroids, dtype=np.float64))
    if grads.shape[1] != centroids.shape[1]:
        raise ValueError(f"gradients {grads.shape} and centroids {centroids.shape} differ in d")
    logits = unit_rows(grads) @ unit_rows(centroids).T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def mixture_nll(token_nll: np.ndarray, weights: np.ndarray) -> float:
    """Mean over tokens of ``-log sum_k w_k exp(-nll[k, t])``: the loss of the weighted mixture
    of K experts' next-token distributions on one sample. ``token_nll``: (K, T) per-token
    negative log-likelihoods of the sample's response tokens under each expert; ``weights``:
    (K,), non-negative, summing to 1."""
    token_nll = np.asarray(token_nll, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    if token_nll.ndim != 2 or token_nll.shape[0] != len(w):
        raise ValueError(f"token_nll {token_nll.shape} does not match {len(w)} weights")
    if token_nll.shape[1] == 0:
        return 0.0
    with np.errstate(divide="ignore"):
        log_w = np.log(w)[:, None]
    # log-sum-exp over experts, stable for large losses
    a = log_w - token_nll
    top = a.max(axis=0)
    return float(-(top + np.log(np.exp(a - top).sum(axis=0))).mean())
