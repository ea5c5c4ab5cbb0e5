"""Pure pieces of the comparison with the baselines (``gs-ray eval``): answers that can be checked,
per-domain tables, spreads over seeds, and the baselines' partitions.

Checkable answers (``answer_key``), tried in order on the reference response:

* ``#### N`` (GSM8K) - the number after the marks;
* ``The answer is N`` (the demo's arithmetic) - that number;
* a short label (at most ``MAX_LABEL_WORDS`` words, no digit: FinancialPhraseBank's
  positive / negative / neutral) - the words, lower-cased;
* a last sentence with a dollar amount (the demo's finance answers) - the last such amount.

Anything else (code, stories, derivations) is not checked: it has no single right answer. A
generated text is read with the same rule as its reference, so "The answer is 16." and
"#### 16" are both right for 16, and a label must be the generation's first words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal

import numpy as np

from gs_ray.core.cosine import unit_rows

MAX_LABEL_WORDS = 3
KeyKind = Literal["final_number", "answer_is", "label", "amount"]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
_FINAL = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"[Tt]he answer is:?\s*(" + _NUMBER + ")")
_AMOUNT = re.compile(r"-?\$\d[\d,]*(?:\.\d+)?")
_WORD = re.compile(r"[A-Za-z']+")


def _number(text: str) -> str:
    """A number as a canonical string: no $ or thousands commas, no trailing zeros."""
    value = float(text.replace("$", "").replace(",", ""))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def answer_key(reference: str) -> tuple[KeyKind, str] | None:
    """How a reference response can be checked and its canonical answer, or None."""
    m = _FINAL.search(reference)
    if m:
        return "final_number", _number(m.group(1))
    m = _ANSWER_IS.findall(reference)
    if m:
        return "answer_is", _number(m[-1])
    text = reference.strip()
    if text and not any(ch.isdigit() for ch in text):
        words = _WORD.findall(text.lower())
        if 0 < len(words) <= MAX_LABEL_WORDS:
            return "label", " ".join(words)
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    if sentences:
        amounts = _AMOUNT.findall(sentences[-1])
        if amounts:
            return "amount", _number(amounts[-1])
    return None


def read_answer(kind: KeyKind, generated: str, n_words: int = 1) -> str | None:
    """The answer a generated text gives, read the way its reference is (``kind``); a label is
    the generation's first ``n_words`` words."""
    if kind == "final_number":
        m = _FINAL.search(generated)
        return _number(m.group(1)) if m else None
    if kind == "answer_is":
        m = _ANSWER_IS.findall(generated)
        return _number(m[0]) if m else None
    if kind == "label":
        words = _WORD.findall(generated.lower())[:n_words]
        return " ".join(words) if words else None
    amounts = _AMOUNT.findall(generated)
    return _number(amounts[-1]) if amounts else None


def is_correct(reference: str, generated: str) -> bool | None:
    """Whether a generated answer matches the reference's; None where it cannot be checked."""
    key = answer_key(reference)
    if key is None:
        return None
    kind, want = key
    return read_answer(kind, generated, len(want.split())) == want


def by_domain(values: np.ndarray, domains: Sequence[str | None]) -> dict[str, float]:
    """Mean of ``values`` per domain (samples without a domain under "unlabelled")."""
    values = np.asarray(values, dtype=np.float64)
    names = np.array([d if d is not None else "unlabelled" for d in domains], dtype=object)
    return {str(d): float(values[names == d].mean()) for d in sorted(set(names))}


def spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation over seeds (None when fewer than two values)."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


def random_partition(labels: np.ndarray, seed: int) -> np.ndarray:
    """A random partition with exactly the cluster sizes of ``labels``: the labels shuffled
    over the same samples (entries < 0, samples outside every cluster, stay where they are)."""
    labels = np.asarray(labels)
    out = labels.copy()
    inside = np.flatnonzero(labels >= 0)
    out[inside] = labels[inside][np.random.default_rng(seed).permutation(len(inside))]
    return out


# --------------------------------------------------------------------------- the paper's analyses


def domain_counts(labels: np.ndarray, domains: Sequence[str | None]) -> dict[str, dict[str, int]]:
    """Cluster -> {domain: samples} (paper Fig. 5), for the samples with a cluster."""
    out: dict[str, dict[str, int]] = {}
    for c, d in zip(np.asarray(labels).tolist(), domains):
        if c >= 0:
            row = out.setdefault(str(c), {})
            key = d if d is not None else "unlabelled"
            row[key] = row.get(key, 0) + 1
    return {c: dict(sorted(v.items())) for c, v in sorted(out.items(), key=lambda kv: int(kv[0]))}


def top_terms(texts: Sequence[str], labels: np.ndarray, n_terms: int = 8) -> dict[str, list[str]]:
    """Cluster -> its top TF-IDF terms (paper Table 2): the terms with the highest mean TF-IDF
    weight over the cluster's texts (English stop words and numbers left out)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    labels = np.asarray(labels)
    vec = TfidfVectorizer(
        stop_words="english",
        token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z_]+\b",
        max_features=20000,
        sublinear_tf=True,
    )
    X = vec.fit_transform(texts)
    vocab = np.array(vec.get_feature_names_out())
    out = {}
    for c in sorted(set(labels.tolist())):
        if c < 0:
            continue
        mean = np.asarray(X[labels == c].mean(axis=0)).ravel()
        out[str(c)] = vocab[np.argsort(-mean, kind="stable")[:n_terms]].tolist()
    return out


# --------------------------------------------------------------------------- routers compared


def unit_centroids(X: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(k, d): each cluster's mean unit vector (rows of ``X`` with ``labels`` == c), unit-norm
    again; a cluster without rows gets a zero centroid (never chosen over a real one)."""
    X = unit_rows(np.asarray(X, dtype=np.float64))
    labels = np.asarray(labels)
    C = np.zeros((k, X.shape[1]))
    for c in range(k):
        if (labels == c).any():
            m = X[labels == c].mean(0)
            C[c] = unit_rows(m)
    return C


def nearest_centroid(X: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """argmax_c cos(x, centroid_c) for each row (the embedding- and gradient-similarity
    routers of the paper's Table 3)."""
    X = unit_rows(np.asarray(X, dtype=np.float64))
    return (X @ np.asarray(centroids).T).argmax(1).astype(np.int64)


class KeywordRouter:
    """The paper's keyword-similarity router: each cluster's metadata is its top TF-IDF terms
    (``top_terms`` over its training prompts); a prompt goes to the cluster whose terms it
    shares most (ties: the larger cluster, then the lower index)."""

    def __init__(self, texts: Sequence[str], labels: np.ndarray, n_terms: int = 20):
        labels = np.asarray(labels)
        terms = top_terms(texts, labels, n_terms)
        self.k = int(labels.max()) + 1
        self.terms = [set(terms.get(str(c), [])) for c in range(self.k)]
        self.sizes = np.bincount(labels[labels >= 0], minlength=self.k)

    def predict(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for text in texts:
            words = set(_WORD.findall(text.lower()))
            overlap = [len(words & t) for t in self.terms]
            out.append(max(range(self.k), key=lambda c: (overlap[c], self.sizes[c], -c)))
        return np.array(out, dtype=np.int64)


def agreement(pred: np.ndarray, labels: np.ndarray) -> float:
    """Share of rows where a router's choice equals the gradient assignment."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    return float((pred == labels).mean()) if len(labels) else float("nan")


# --------------------------------------------------------------------------- Fig. 4 and Fig. 6


def correlations(x: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    """Pearson and Spearman correlation of two paired series (None where one is constant)."""
    from scipy.stats import pearsonr, spearmanr

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "spearman": None, "n": int(len(x))}
    return {
        "pearson": float(pearsonr(x, y)[0]),
        "spearman": float(spearmanr(x, y)[0]),
        "n": int(len(x)),
    }


def cosine_silhouette(X: np.ndarray, labels: np.ndarray) -> float | None:
    """The cosine silhouette of a partition (scikit-learn's, on the rows' Gram matrix, so that
    d can be millions), None for fewer than two clusters."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    if len(set(labels.tolist())) < 2 or len(set(labels.tolist())) >= len(labels):
        return None
    X = np.asarray(X, dtype=np.float32)
    gram = (X @ X.T).astype(np.float64)  # n x n: no normalised copy of the (n, d) rows
    norms = np.sqrt(np.maximum(np.diag(gram), 1e-24))
    D = np.clip(1.0 - gram / np.outer(norms, norms), 0.0, 2.0)
    np.fill_diagonal(D, 0.0)
    return float(silhouette_score(D, labels, metric="precomputed"))
