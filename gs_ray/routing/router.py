"""The router (paper section 5.4.2): a frozen text encoder and a linear head over the K experts.

For a prompt x the router computes ``p(k | x) = softmax(W h(x) + b)``, where ``h`` is a frozen
encoder's sentence feature, and sends x to the expert ``argmax_k p(k | x)``. Only ``W, b`` are
trained, with cross-entropy on the cluster assignments of Stage II
(``L = -sum_i log p(k_i | x_i)``). The router sees prompts only (``Sample.prompt``): at inference
time there is no response.

Both routers are scikit-learn style estimators: the constructor takes hyperparameters only,
``fit(texts, labels)`` returns the router itself, and ``router.metrics`` describes the fitted
head. Pieces, each usable on its own:

* ``FrozenEncoder``, ``encode_cached`` - the frozen encoder and its feature cache
  (``routing/encoder.py``).
* ``stratified_split`` - a seeded stratified hold-out; ``Router.fit_features`` trains the head
  on precomputed features with full-batch AdamW on the rest.
* ``Router`` (``kind: encoder``) and ``TfidfRouter`` (``kind: tfidf``) - fit, predict, save,
  load, latency; ``make_router(cfg, k, seed).fit(texts, labels)`` fits the kind ``cfg`` names,
  ``Router.from_head`` / ``TfidfRouter.from_parts`` wrap already-fitted parts. In the run
  directory (``router/``) a saved router is two lines::

      from gs_ray.routing.router import load_router
      expert = load_router("runs/my-run/router").predict(["How do I reset my password?"])[0]
"""

from __future__ import annotations

import json
import logging
import time
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gs_ray.config import RouterConfig, RouterKind
from gs_ray.io import write_json
from gs_ray.routing.encoder import BUNDLED_ENCODER, FrozenEncoder, encode_cached, load_encoder

log = logging.getLogger(__name__)

ROUTER_FORMAT = "gs_ray.routing.router/1"
ROUTER_JSON = "router.json"
HEAD_FILE = "head.safetensors"
TFIDF_FILE = "tfidf.npz"


# --------------------------------------------------------------------------- training


def stratified_split(
    labels: np.ndarray, holdout_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (train, holdout) indices with about ``holdout_fraction`` of each label
    held out (rounded per label).

    Small clusters: every label keeps at least one sample in training, so a cluster of one is
    trained on and never measured, and a cluster of two is held out from only when
    ``holdout_fraction >= 0.25`` rounds its share up to one. Such clusters get no (or a one-sample)
    per-cluster holdout accuracy. Indices are sorted.
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, hold = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_hold = min(int(np.floor(holdout_fraction * len(idx) + 0.5)), len(idx) - 1)
        hold.append(idx[:n_hold])
        train.append(idx[n_hold:])
    empty = np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(train or [empty])), np.sort(np.concatenate(hold or [empty]))


def _fit_head(
    x: torch.Tensor, y: torch.Tensor, n_clusters: int, cfg: RouterConfig
) -> tuple[nn.Linear, float]:
    """Full-batch AdamW on the cross-entropy. The head starts at zero (uniform p(k|x)): the
    problem is convex, so no random initialisation is needed and the result is deterministic.
    No weight decay: on the demo corpus the holdout accuracy is already 0.99 without it."""
    head = nn.Linear(x.shape[1], n_clusters)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(cfg.epochs):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(head(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(nn.functional.cross_entropy(head(x), y))
    return head.requires_grad_(False).eval(), final


def _accuracy(pred: np.ndarray, y: np.ndarray) -> float | None:
    return float(np.mean(pred == y)) if len(y) else None


def _metrics(
    head: nn.Linear,
    feats: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    hold_idx: np.ndarray,
    n_clusters: int,
) -> dict[str, Any]:
    with torch.no_grad():
        pred = head(torch.from_numpy(feats)).argmax(1).numpy()
    return _pred_metrics(pred, labels, train_idx, hold_idx, n_clusters)


def _pred_metrics(
    pred: np.ndarray,
    labels: np.ndarray,
    train_idx: np.ndarray,
    hold_idx: np.ndarray,
    n_clusters: int,
) -> dict[str, Any]:
    """Holdout, train and per-cluster accuracy of a router's choices ``pred`` (every sample)."""
    y_hold = labels[hold_idx]
    per_cluster = [
        _accuracy(pred[hold_idx][y_hold == k], y_hold[y_hold == k]) for k in range(n_clusters)
    ]
    counts = np.bincount(y_hold, minlength=n_clusters)
    return {
        "holdout_accuracy": _accuracy(pred[hold_idx], y_hold),
        "train_accuracy": _accuracy(pred[train_idx], labels[train_idx]),
        "chance_accuracy": float(counts.max() / len(y_hold)) if len(y_hold) else None,
        "per_cluster_holdout_accuracy": per_cluster,
        "cluster_sizes": np.bincount(labels, minlength=n_clusters).tolist(),
        "n_train": len(train_idx),
        "n_holdout": len(hold_idx),
    }


def _loss(head: nn.Linear, feats: np.ndarray, y: np.ndarray) -> float | None:
    if len(y) == 0:
        return None
    with torch.no_grad():
        return float(
            nn.functional.cross_entropy(head(torch.from_numpy(feats)), torch.from_numpy(y))
        )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _n_clusters(n_clusters: int | None, y: np.ndarray) -> int:
    """K as given, else one more than the largest label."""
    return int(y.max()) + 1 if n_clusters is None else int(n_clusters)


def _check_fitted(router: Router | TfidfRouter, fitted: bool) -> None:
    from sklearn.exceptions import NotFittedError

    if not fitted:
        name = type(router).__name__
        raise NotFittedError(
            f"this {name} is not fitted yet: call fit(texts, labels) first, or use "
            f"{name}.load for a saved router"
        )


# --------------------------------------------------------------------------- the router


class Router:
    """Encoder + linear head: ``predict(prompts)`` gives the expert index of each prompt.

    Hyperparameters: ``cfg`` (encoder, max_length, epochs, lr, holdout_fraction; default
    ``RouterConfig(kind="encoder")``), ``n_clusters`` (K; None: one more than the largest label),
    ``seed`` (the hold-out split), ``cache_path`` (the feature cache ``fit`` encodes through) and
    ``device`` (where the encoder runs to predict, and to fit without a cache; None:
    ``load_encoder``'s choice).

    The encoder is loaded on first use (``load_encoder``), so loading a saved router is cheap and
    a router fitted in the same process as its features shares the already-loaded encoder.
    """

    def __init__(
        self,
        cfg: RouterConfig | None = None,
        n_clusters: int | None = None,
        seed: int = 0,
        cache_path: str | Path | None = None,
        device: str | None = None,
    ):
        self.cfg = cfg if cfg is not None else RouterConfig(kind="encoder")
        self._n_clusters, self.seed, self.cache_path = n_clusters, seed, cache_path
        self.device = device
        self.head: nn.Linear | None = None
        self.metrics: dict[str, Any] = {}
        self._encoder: FrozenEncoder | None = None

    @classmethod
    def from_head(
        cls,
        head: nn.Linear,
        encoder: str = BUNDLED_ENCODER,
        max_length: int = 128,
        metrics: dict[str, Any] | None = None,
        device: str | None = None,
    ) -> Router:
        """A fitted router from a trained head and the encoder (name, max_length) its features
        came from."""
        cfg = RouterConfig(kind="encoder", encoder=encoder, max_length=max_length)
        return cls(cfg, int(head.out_features), device=device)._set_head(head, metrics)

    def _set_head(self, head: nn.Linear, metrics: dict[str, Any] | None) -> Router:
        self.head = head.requires_grad_(False).eval()
        self.metrics = dict(metrics or {})
        self._encoder = None  # loaded (and the head moved to its device) on first use
        return self

    def fit(self, X: Sequence[str], y: Sequence[int] | np.ndarray) -> Router:
        """Encode the prompts ``X`` (through the feature cache when ``cache_path`` is set) and
        ``fit_features`` on them and their cluster labels ``y``. Returns ``self``."""
        texts = list(X)
        if self.cache_path is not None:
            feats = encode_cached(texts, self.cfg.encoder, self.cache_path, self.cfg.max_length)
        else:
            feats = load_encoder(self.cfg.encoder, self.cfg.max_length, self.device).encode(texts)
        return self.fit_features(feats, y)

    def fit_features(self, F: np.ndarray, y: Sequence[int] | np.ndarray) -> Router:
        """Train the linear head on encoder features ``F`` of the prompts and their cluster
        labels ``y``. Returns ``self``.

        ``F`` must come from ``cfg.encoder`` with ``cfg.max_length`` (e.g. ``encode_cached``):
        the router uses them to encode new prompts. ``cfg.holdout_fraction`` of each cluster is
        held out (``stratified_split``) and the head is trained on the rest only, so
        ``metrics`` describes the fitted head: ``holdout_accuracy``, ``train_accuracy``,
        ``chance_accuracy`` (majority-cluster share of the holdout),
        ``per_cluster_holdout_accuracy`` (None where a cluster has no holdout sample),
        ``cluster_sizes``, ``n_train``, ``n_holdout``, ``final_train_loss``, ``holdout_loss``,
        ``epochs``, ``lr``, ``seed``.
        """
        cfg, seed = self.cfg, self.seed
        feats = np.ascontiguousarray(F, dtype=np.float32)
        y = np.asarray(y, dtype=np.int64)
        if feats.ndim != 2 or len(feats) != len(y):
            raise ValueError(f"features {feats.shape} and labels ({len(y)},) do not match")
        if len(y) == 0:
            raise ValueError("no samples to train the router on")
        n_clusters = _n_clusters(self._n_clusters, y)
        if y.min() < 0 or y.max() >= n_clusters:
            raise ValueError(f"labels must lie in [0, {n_clusters}), got [{y.min()}, {y.max()}]")
        train_idx, hold_idx = stratified_split(y, cfg.holdout_fraction, seed)
        x_train = torch.from_numpy(feats[train_idx])
        head, final_loss = _fit_head(x_train, torch.from_numpy(y[train_idx]), n_clusters, cfg)
        metrics = _metrics(head, feats, y, train_idx, hold_idx, n_clusters)
        metrics["final_train_loss"] = final_loss
        metrics["holdout_loss"] = _loss(head, feats[hold_idx], y[hold_idx])
        metrics.update(epochs=cfg.epochs, lr=cfg.lr, seed=seed)
        log.info(
            "router: holdout accuracy %s (chance %s), train accuracy %.3f, %d train / %d holdout",
            _fmt(metrics["holdout_accuracy"]),
            _fmt(metrics["chance_accuracy"]),
            metrics["train_accuracy"],
            metrics["n_train"],
            metrics["n_holdout"],
        )
        return self._set_head(head, metrics)

    @property
    def encoder_name(self) -> str:
        """The encoder the head's features come from (``cfg.encoder``)."""
        return self.cfg.encoder

    @property
    def max_length(self) -> int:
        """The encoder's max tokens (``cfg.max_length``)."""
        return self.cfg.max_length

    @property
    def n_clusters(self) -> int | None:
        """K, the number of experts: the fitted head's outputs (unfitted: the constructor's)."""
        return self._n_clusters if self.head is None else int(self.head.out_features)

    @property
    def feature_dim(self) -> int:
        """Encoder feature dimension the head expects."""
        return int(self._fitted_head().in_features)

    def _fitted_head(self) -> nn.Linear:
        _check_fitted(self, self.head is not None)
        assert self.head is not None
        return self.head

    @property
    def encoder(self) -> FrozenEncoder:
        """The frozen encoder, loaded on first use and checked against the head's input size."""
        if self._encoder is None:
            enc = load_encoder(self.encoder_name, self.max_length, self.device)
            if enc.dim != self.feature_dim:
                raise ValueError(
                    f"encoder '{self.encoder_name}' gives {enc.dim}-dim features, "
                    f"the router head expects {self.feature_dim}"
                )
            self._encoder = enc
            self._fitted_head().to(enc.device)
        return self._encoder

    def quantize(self, keep_float: str | None = None) -> Router:
        """Swap in a copy of the encoder with its linear layers quantised to int8 (torch dynamic
        quantisation, CPU): on this project's 2-core CPU at batch 1 it routes about 2.5x faster
        (MiniLM, 1 thread, quiet-ish machine: 13.8 -> 5.2 ms p50); see benchmarks/README.md for
        its agreement with the gradient clusters. ``keep_float``: a regular expression; linear
        layers whose module name it matches stay float (MiniLM's FFN outputs,
        ``layer.N.output.dense``, carry the activations int8 rounds worst). Dynamic quantisation
        scales activations per tensor, so an int8 route can depend on the other prompts of its
        batch.
        The shared float encoder (``load_encoder``) is left as it is. Returns ``self``."""
        import copy
        import re
        import warnings

        enc = copy.copy(self.encoder)
        model = copy.deepcopy(self.encoder.model).cpu()
        spec = {
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not (keep_float and re.search(keep_float, name))
        }
        with warnings.catch_warnings():  # torch.ao.quantization's deprecation notice
            warnings.simplefilter("ignore")
            enc.model = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
        enc.device = torch.device("cpu")
        self._encoder = enc
        self._fitted_head().cpu()
        return self

    def proba_from_features(self, features: np.ndarray) -> np.ndarray:
        """p(k | x) for precomputed encoder features, ``(n, K)`` float32."""
        head = self._fitted_head()
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        with torch.no_grad():
            x = x.to(head.weight.device)
            return torch.softmax(head(x), dim=-1).cpu().numpy()

    def predict_proba(self, texts: str | Sequence[str]) -> np.ndarray:
        """p(k | x) for each prompt, ``(n, K)``; a single string counts as one prompt."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        self._fitted_head()
        return self.proba_from_features(self.encoder.encode(texts))

    def predict(self, texts: str | Sequence[str]) -> np.ndarray:
        """The expert ``argmax_k p(k | x)`` for each prompt, int64 ``(n,)``."""
        return self.predict_proba(texts).argmax(axis=1).astype(np.int64)

    def predict_from_features(self, features: np.ndarray) -> np.ndarray:
        """``predict`` for precomputed encoder features."""
        return self.proba_from_features(features).argmax(axis=1).astype(np.int64)

    def route_latency_ms(self, texts: Sequence[str], warmup: int = 3) -> float:
        """Mean wall time in ms to route one prompt (batch size 1: tokenise, encode, head,
        argmax), after ``warmup`` untimed calls; the number the paper reports (3.9 ms)."""
        texts = list(texts)
        if not texts:
            raise ValueError("route_latency_ms needs at least one text")
        for i in range(warmup):
            self.predict(texts[i % len(texts)])
        times = []
        for text in texts:
            start = time.perf_counter()
            self.predict(text)  # .cpu() inside synchronises a GPU
            times.append(time.perf_counter() - start)
        return 1000.0 * float(np.mean(times))

    def save(self, folder: str | Path) -> Path:
        """Write ``router.json`` (format, encoder as configured, max_length, n_clusters,
        feature_dim, head file name, metrics) and ``head.safetensors`` (``weight``, ``bias``)."""
        from safetensors.torch import save_file

        head = self._fitted_head()
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(tensors, str(folder / HEAD_FILE))
        write_json(
            folder / ROUTER_JSON,
            {
                "format": ROUTER_FORMAT,
                "encoder": self.encoder_name,
                "max_length": self.max_length,
                "n_clusters": self.n_clusters,
                "feature_dim": self.feature_dim,
                "head": HEAD_FILE,
                "metrics": self.metrics,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> Router | TfidfRouter:
        """A router saved by ``save``; the encoder loads on the first prediction. A TF-IDF
        router's folder gives a ``TfidfRouter`` (the same interface), so older code that calls
        ``Router.load`` keeps working."""
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / ROUTER_JSON).read_text())
        if meta.get("format") != ROUTER_FORMAT:
            raise ValueError(f"{folder / ROUTER_JSON}: not a {ROUTER_FORMAT} router")
        if meta.get("kind") == TfidfRouter.kind:
            return TfidfRouter.load(folder, meta)
        head = nn.Linear(int(meta["feature_dim"]), int(meta["n_clusters"]))
        head.load_state_dict(load_file(str(folder / meta.get("head", HEAD_FILE))))
        return cls.from_head(
            head, meta["encoder"], int(meta["max_length"]), meta.get("metrics"), device
        )


class TfidfRouter:
    """Character n-gram TF-IDF features and a multinomial logistic-regression head
    (``router.kind: tfidf``): the same interface as ``Router``, no neural encoder, well under a
    millisecond per prompt on a CPU. Measured against the encoder router on three runs
    (benchmarks/README.md): the same agreement with the gradient clusters or better."""

    kind = "tfidf"

    def __init__(
        self, cfg: RouterConfig | None = None, n_clusters: int | None = None, seed: int = 0
    ):
        """``cfg``: the ``tfidf_*`` settings and ``holdout_fraction`` (default
        ``RouterConfig(kind="tfidf")``); ``n_clusters``: K (None: one more than the largest
        label); ``seed``: the hold-out split."""
        self.cfg = cfg if cfg is not None else RouterConfig(kind="tfidf")
        self._n_clusters, self.seed = n_clusters, seed
        self.vectorizer: Any = None
        self.head: Any = None
        self.metrics: dict[str, Any] = {}

    @classmethod
    def from_parts(cls, vectorizer, head, metrics: dict[str, Any] | None = None) -> TfidfRouter:
        """A fitted router from a fitted ``TfidfVectorizer`` and classifier head (``coef_``,
        ``classes_``, ``predict_proba``); ``metrics["n_clusters"]`` sets K when present."""
        router = cls()
        router.vectorizer, router.head = vectorizer, head
        router.metrics = dict(metrics or {})
        return router

    @property
    def n_clusters(self) -> int | None:
        """K, the number of experts (unfitted: the constructor's)."""
        if self.head is None:
            return self._n_clusters
        return int(self.metrics.get("n_clusters") or len(self.head.coef_))

    @staticmethod
    def _vectorizer(cfg: RouterConfig):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            analyzer="char_wb",
            ngram_range=tuple(cfg.tfidf_ngrams),
            sublinear_tf=True,
            max_features=cfg.tfidf_max_features,
            dtype=np.float32,
        )

    def fit(self, X: Sequence[str], y: Sequence[int] | np.ndarray) -> TfidfRouter:
        """Fit on the prompts ``X`` and their cluster labels ``y``; ``cfg.holdout_fraction`` of
        each cluster is held out (``stratified_split``) and measured, as for the encoder router
        (``metrics``, plus ``kind``, ``n_clusters``, ``n_features``). Returns ``self``."""
        from sklearn.linear_model import LogisticRegression

        cfg, seed, texts = self.cfg, self.seed, list(X)
        y = np.asarray(y, dtype=np.int64)
        if len(y) == 0 or len(y) != len(texts):
            raise ValueError(
                f"{len(texts)} texts and {len(y)} labels: nothing to fit or a mismatch"
            )
        n_clusters = _n_clusters(self._n_clusters, y)
        train_idx, hold_idx = stratified_split(y, cfg.holdout_fraction, seed)
        vec = self._vectorizer(cfg)
        X_train = vec.fit_transform([texts[i] for i in train_idx])
        if len(set(y[train_idx].tolist())) < 2:
            head = _ConstantHead(int(y[train_idx][0]) if len(train_idx) else 0, n_clusters)
        else:
            head = LogisticRegression(C=cfg.tfidf_c, max_iter=2000).fit(X_train, y[train_idx])
        self.vectorizer, self.head, self.metrics = vec, head, {"n_clusters": n_clusters}
        pred = self.predict(texts)
        metrics = _pred_metrics(pred, y, train_idx, hold_idx, n_clusters)
        metrics.update(
            kind=self.kind, n_clusters=n_clusters, n_features=len(vec.vocabulary_), seed=seed
        )
        self.metrics = metrics
        log.info(
            "router (tfidf): holdout accuracy %s (chance %s), %d features",
            _fmt(metrics["holdout_accuracy"]),
            _fmt(metrics["chance_accuracy"]),
            metrics["n_features"],
        )
        return self

    def predict_proba(self, texts: str | Sequence[str]) -> np.ndarray:
        """p(k | x) for each prompt, ``(n, K)`` (clusters without training samples: 0)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        _check_fitted(self, self.head is not None)
        p = self.head.predict_proba(self.vectorizer.transform(texts))
        out = np.zeros((len(texts), self.n_clusters), dtype=np.float32)
        out[:, np.asarray(self.head.classes_, dtype=np.int64)] = p
        return out

    def predict(self, texts: str | Sequence[str]) -> np.ndarray:
        return self.predict_proba(texts).argmax(axis=1).astype(np.int64)

    route_latency_ms = Router.route_latency_ms

    def quantize(self, keep_float: str | None = None) -> TfidfRouter:
        """Nothing to quantise (no neural encoder)."""
        return self

    def save(self, folder: str | Path) -> Path:
        """``router.json`` (format, kind, vectorizer settings, metrics) and ``tfidf.npz``
        (vocabulary, idf, coefficients, intercepts, classes): plain arrays, no pickle."""
        _check_fitted(self, self.head is not None)
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        vocab = sorted(self.vectorizer.vocabulary_, key=self.vectorizer.vocabulary_.get)
        np.savez(
            folder / TFIDF_FILE,
            vocabulary=np.array(vocab, dtype=object).astype(str),
            idf=self.vectorizer.idf_,
            coef=self.head.coef_,
            intercept=self.head.intercept_,
            classes=np.asarray(self.head.classes_),
        )
        write_json(
            folder / ROUTER_JSON,
            {
                "format": ROUTER_FORMAT,
                "kind": self.kind,
                "n_clusters": self.n_clusters,
                "ngram_range": list(self.vectorizer.ngram_range),
                "max_features": self.vectorizer.max_features,
                "metrics": self.metrics,
            },
        )
        return folder

    @classmethod
    def load(cls, folder: str | Path, meta: dict[str, Any]) -> TfidfRouter:
        from sklearn.linear_model import LogisticRegression

        z = np.load(Path(folder) / TFIDF_FILE, allow_pickle=False)
        cfg = RouterConfig(
            kind="tfidf",
            tfidf_ngrams=list(meta["ngram_range"]),
            tfidf_max_features=int(meta["max_features"]),
        )
        vec = cls._vectorizer(cfg)
        vec.vocabulary_ = {str(t): i for i, t in enumerate(z["vocabulary"])}
        vec.idf_ = z["idf"]
        head = LogisticRegression()
        head.coef_, head.intercept_, head.classes_ = z["coef"], z["intercept"], z["classes"]
        if len(head.classes_) == 1:
            head = _ConstantHead(int(head.classes_[0]), int(meta["n_clusters"]))
        router = cls.from_parts(
            vec, head, {**meta.get("metrics", {}), "n_clusters": meta["n_clusters"]}
        )
        router.cfg = cfg  # the vectorizer's settings
        return router


class _ConstantHead:
    """A head for a router trained on a single cluster: always that cluster."""

    def __init__(self, label: int, n_clusters: int):
        self.classes_ = np.array([label])
        self.coef_ = np.zeros((1, 0))
        self.intercept_ = np.zeros(1)

    def predict_proba(self, X) -> np.ndarray:
        return np.ones((X.shape[0], 1))


ROUTERS: dict[str, type] = {"encoder": Router, TfidfRouter.kind: TfidfRouter}
assert set(ROUTERS) == set(typing.get_args(RouterKind)), "config.RouterKind and ROUTERS differ"


def load_router(folder: str | Path, device: str | None = None) -> Router | TfidfRouter:
    """A router saved by ``save``, of whichever kind it is."""
    return Router.load(folder, device)


def make_router(
    cfg: RouterConfig,
    n_clusters: int | None = None,
    seed: int = 0,
    cache_path: str | Path | None = None,
) -> Router | TfidfRouter:
    """The unfitted router of kind ``cfg.kind`` (``ROUTERS``); ``cache_path``: the encoder
    router's feature cache (a TF-IDF router has none). Fit it with ``.fit(texts, labels)``."""
    cls = ROUTERS[cfg.kind]
    if cls is Router:
        return Router(cfg, n_clusters, seed, cache_path=cache_path)
    return cls(cfg, n_clusters, seed)
