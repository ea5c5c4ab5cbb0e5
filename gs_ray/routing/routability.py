"""Partitions a router can follow: merge the clusters that a prompt-only router confuses.

The paper's Stage II clusters by the gradient of the whole sample, answer included. When a corpus
holds a short-answer task (a label, yes/no, a number), the gradient is dominated by the answer
and the clusters split that task by its answer: a router, which sees only the prompt, cannot
predict such a split, and every misrouted query pays the cost of a wrong expert (about 6 nats on
the data mix; docs/evaluation.md). This module measures, by cross-validation on the training
prompts, how well a router of the run's kind can follow a partition, and merges the clusters it
confuses until its agreement reaches a target or one cluster is left.

The rule, greedy and deterministic:

1. Out-of-fold router probabilities ``p(k | x)`` for every training prompt (``folds``-fold
   cross-validation, each fold's router trained like the run's: TF-IDF + logistic regression, or
   frozen-encoder features + the linear head).
2. While the agreement (out-of-fold argmax = cluster) is below ``target`` and K > 1: merge the
   pair of clusters with the most confusions between them (rows of one routed to the other, both
   ways). The merged cluster's probability is the sum of its members' (a router of the merged
   partition routes to either member). Ties go to the pair whose gradient centroids are closest
   (merging them loses the least specialisation), then to the smaller indices.
3. The merged partition is cross-validated again (a router trained on the merged labels, not the
   summed probabilities): if that agreement is still below the target, steps 2-3 repeat.

Cross-validation on the training rows overstates what new prompts show: those rows built the
centroids they are assigned to, a new prompt's gradient did not (on the data mix, 0.96
cross-validated against 0.89-0.94 on the test prompts; docs/evaluation.md). So where the run holds
rows out of the centroids (the calibration rows: ``Stage2Plan.build``'s ``held_out``), a router
fitted on every training row must also reach the target on them, and their confusions count in
step 2 beside the out-of-fold ones. A shortfall there is judged only with a router fitted on
the merged labels (step 3), never on summed probabilities, which underrate a merged partition
on rows the router did not see; it then calls for one merge, and step 3 again.

Every merge is recorded with its reason (confusions, the clusters' sizes, the centroid cosine).
Pure (scikit-learn / torch), no Ray: the pipeline's ``routability`` stage runs it in a Ray task.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from gs_ray.config import RouterConfig
from gs_ray.core.cosine import unit_rows

log = logging.getLogger(__name__)

Basis = Literal["cross-validated", "held-out"]


def fold_indices(n: int, folds: int, seed: int) -> list[np.ndarray]:
    """Seeded, shuffled folds of ``range(n)`` (at most ``n`` of them), as sorted index arrays."""
    folds = max(2, min(folds, n))
    perm = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(perm, folds)]


def cv_probabilities(
    texts: Sequence[str],
    labels: np.ndarray,
    k: int,
    cfg: RouterConfig,
    folds: int = 5,
    seed: int = 0,
    features: np.ndarray | None = None,
) -> np.ndarray:
    """Out-of-fold ``p(k | x)`` of a router of ``cfg.kind`` trained on the other folds, (n, k).

    ``features``: the frozen encoder's prompt features for ``cfg.kind == "encoder"`` (computed
    once by the caller; TF-IDF features are fitted inside each fold, as the run's router fits its
    vocabulary on its own training rows)."""
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if n != len(texts):
        raise ValueError(f"{len(texts)} texts and {n} labels")
    if cfg.kind == "encoder" and features is None:
        raise ValueError("router.kind encoder: pass the prompts' encoder features")
    out = np.zeros((n, k), dtype=np.float64)
    for hold in fold_indices(n, folds, seed):
        train = np.setdiff1d(np.arange(n), hold)
        out[hold] = _fold_proba(texts, labels, k, cfg, train, hold, features, seed)
    return out


def _fold_proba(texts, labels, k, cfg, train, hold, features, seed) -> np.ndarray:
    """One fold: a router trained on ``train`` rows, its probabilities on ``hold`` rows."""
    out = np.zeros((len(hold), k))
    present = np.unique(labels[train])
    if len(present) == 1:  # a fold with one cluster routes everything to it
        out[:, present[0]] = 1.0
        return out
    if cfg.kind == "encoder":
        import torch

        from gs_ray.routing.router import _fit_head

        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        torch.manual_seed(seed)
        head, _ = _fit_head(x[train], torch.from_numpy(labels[train]), k, cfg)
        with torch.no_grad():
            logits = head(x[hold])
            # Clusters absent from the fold's training rows get no probability.
            logits[:, np.setdiff1d(np.arange(k), present)] = -np.inf
            return torch.softmax(logits, dim=1).double().numpy()
    from sklearn.linear_model import LogisticRegression

    from gs_ray.routing.router import TfidfRouter

    vec = TfidfRouter._vectorizer(cfg)
    X = vec.fit_transform([texts[i] for i in train])
    head = LogisticRegression(C=cfg.tfidf_c, max_iter=2000).fit(X, labels[train])
    out[:, np.asarray(head.classes_, dtype=np.int64)] = head.predict_proba(
        vec.transform([texts[i] for i in hold])
    )
    return out


@dataclass
class MergeStep:
    """One merge: clusters ``a`` and ``b`` (in the numbering before it) became one, and why."""

    a: int
    b: int
    confusions: int  # rows of a routed to b plus rows of b routed to a (out of sample)
    sizes: tuple[int, int]
    centroid_cosine: float | None
    agreement_before: float
    agreement_after: float
    held_agreement_before: float | None = None  # on the held-out rows, where they are used
    basis: Basis = "cross-validated"  # the agreement below the target that called for it

    def to_dict(self) -> dict[str, Any]:
        cv = self.basis == "cross-validated"
        short = self.agreement_before if cv else self.held_agreement_before
        return {
            "merged": [self.a, self.b],
            "confusions": self.confusions,
            "sizes": list(self.sizes),
            "centroid_cosine": self.centroid_cosine,
            "agreement_before": self.agreement_before,
            "agreement_after": self.agreement_after,
            "held_agreement_before": self.held_agreement_before,
            "basis": self.basis,
            "why": (
                f"the router confused clusters {self.a} and {self.b} on {self.confusions} of "
                f"{sum(self.sizes)} rows ({self.basis} agreement {short:.3f} < target)"
            ),
        }


@dataclass
class RoutabilityResult:
    """The merged partition: ``mapping[old] = new`` cluster, and the record of how it came."""

    mapping: np.ndarray
    k_before: int
    k_after: int
    target: float
    agreement_before: float  # cross-validated agreement with Stage II's partition
    agreement_after: float  # ... with the merged partition (a router trained on it)
    steps: list[MergeStep] = field(default_factory=list)
    cv_rounds: int = 1
    n_held: int = 0  # held-out rows whose agreement is also checked (0: none)
    held_agreement_before: float | None = None  # a router fitted on every training row
    held_agreement_after: float | None = None

    def labels(self, labels: np.ndarray) -> np.ndarray:
        """Stage II labels mapped to the merged partition (negative codes are kept)."""
        labels = np.asarray(labels, dtype=np.int64)
        out = labels.copy()
        ok = labels >= 0
        out[ok] = self.mapping[labels[ok]]
        return out

    def to_dict(self) -> dict[str, Any]:
        met = _meets(self.agreement_after, self.held_agreement_after, self.target)
        return {
            "mapping": self.mapping.tolist(),
            "k_before": self.k_before,
            "k_after": self.k_after,
            "target": self.target,
            "agreement_before": self.agreement_before,
            "agreement_after": self.agreement_after,
            "n_held": self.n_held,
            "held_agreement_before": self.held_agreement_before,
            "held_agreement_after": self.held_agreement_after,
            "met": bool(met or self.k_after == 1),
            "cv_rounds": self.cv_rounds,
            "steps": [s.to_dict() for s in self.steps],
        }

    def summary(self) -> str:
        """One console line."""
        return summary_line(self.to_dict())


def summary_line(d: dict[str, Any]) -> str:
    """One console line for a routability record (``RoutabilityResult.to_dict``)."""
    held = ""
    if d.get("n_held"):
        held = f"; on {d['n_held']} held-out rows {d['held_agreement_before']:.3f}" + (
            "" if not d["steps"] else f" -> {d['held_agreement_after']:.3f}"
        )
    if not d["steps"]:
        return (
            f"routability: K={d['k_before']} kept (cross-validated router agreement "
            f"{d['agreement_before']:.3f}{held}, target {d['target']})"
        )
    return (
        f"routability: K {d['k_before']} -> {d['k_after']} ({len(d['steps'])} merges); "
        f"cross-validated router agreement {d['agreement_before']:.3f} -> "
        f"{d['agreement_after']:.3f}{held} (target {d['target']})"
    )


def _meets(agreement: float, held_agreement: float | None, target: float) -> bool:
    """The target is met: cross-validated, and on the held-out rows where they are used."""
    return agreement >= target and (held_agreement is None or held_agreement >= target)


def _agreement(proba: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(proba.argmax(1) == labels)) if len(labels) else 1.0


def _confusions(proba: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(k, k) counts of rows of cluster a routed to b (argmax of ``proba``)."""
    k = proba.shape[1]
    conf = np.zeros((k, k), dtype=np.int64)
    np.add.at(conf, (labels, proba.argmax(1)), 1)
    return conf


def _merge_once(conf: np.ndarray, cos: np.ndarray | None) -> tuple[int, int, int]:
    """The pair to merge: most confusions (both ways), then the closest centroids, then the
    lowest indices."""
    k = conf.shape[0]
    sym = conf + conf.T
    best = None
    for a in range(k):
        for b in range(a + 1, k):
            key = (int(sym[a, b]), float(cos[a, b]) if cos is not None else 0.0, -a, -b)
            if best is None or key > best[0]:
                best = (key, a, b)
    assert best is not None
    return best[1], best[2], best[0][0]


def min_held_rows(target: float) -> int:
    """Held-out rows needed before their agreement is checked: 1 / (1 - target), the fewest on
    which a single disagreement still meets the target (20 for 0.95)."""
    return int(np.ceil(1.0 / max(1e-9, 1.0 - target))) if target < 1.0 else 1


def _merged(x: np.ndarray, a: int, b: int) -> np.ndarray:
    """Labels after b joined a (clusters above b move down by one)."""
    x = np.where(x == b, a, x)
    return np.where(x > b, x - 1, x)


def merge_for_routability(
    texts: Sequence[str],
    labels: np.ndarray,
    k: int,
    cfg: RouterConfig,
    target: float,
    folds: int = 5,
    seed: int = 0,
    centroids: np.ndarray | None = None,
    features: np.ndarray | None = None,
    max_rounds: int = 4,
    held_texts: Sequence[str] = (),
    held_labels: np.ndarray | None = None,
    held_features: np.ndarray | None = None,
) -> RoutabilityResult:
    """Merge the clusters that a router cannot tell apart (module docstring).

    ``labels``: the training rows' clusters in ``[0, k)``; ``centroids``: Stage II's (k, d)
    centroids, for ties (optional). ``held_texts``/``held_labels``: rows that took no part in
    the centroids (the calibration rows), whose clusters are what a new prompt's would be; where
    there are at least ``min_held_rows(target)`` of them, a router fitted on every training row
    must also reach the target on them (cross-validation on the rows the partition was built
    on overstates what new prompts show), and their confusions count in the choice of a merge.
    Returns the mapping from Stage II's clusters to the merged ones; merged clusters are
    numbered by their smallest original cluster, in order."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k})")
    held = np.asarray(held_labels if held_labels is not None else [], dtype=np.int64)
    if len(held) != len(held_texts):
        raise ValueError(f"{len(held_texts)} held-out texts and {len(held)} labels")
    if len(held) and (held.min() < 0 or held.max() >= k):
        raise ValueError(f"held-out labels must lie in [0, {k})")
    use_held = len(held) >= min_held_rows(target)
    if use_held and cfg.kind == "encoder" and held_features is None:
        raise ValueError("router.kind encoder: pass the held-out prompts' encoder features")
    all_texts = list(texts) + list(held_texts)
    all_features = (
        np.concatenate([features, held_features]) if use_held and features is not None else features
    )
    n = len(labels)
    fit_ix, held_ix = np.arange(n), np.arange(n, n + len(held))

    def evidence(current, held_cur, kc):
        """Out-of-fold probabilities of the training rows; the held-out rows' from a router
        fitted on every training row (None where they are not used)."""
        proba = cv_probabilities(texts, current, kc, cfg, folds, seed, features)
        if not use_held:
            return proba, None
        both = np.concatenate([current, held_cur])
        return proba, _fold_proba(all_texts, both, kc, cfg, fit_ix, held_ix, all_features, seed)

    mapping = np.arange(k)  # original cluster -> current cluster
    cent = None
    if centroids is not None:
        cent = np.asarray(centroids, dtype=np.float64)
        cent = unit_rows(cent)
    steps: list[MergeStep] = []
    current, held_cur = labels.copy(), held.copy()
    kc = k
    proba, hproba = evidence(current, held_cur, kc) if kc > 1 else (None, None)
    first = _agreement(proba, current) if proba is not None else 1.0
    held_first = _agreement(hproba, held_cur) if hproba is not None else None
    agreement, held_agreement, rounds = first, held_first, 1

    while kc > 1 and not _meets(agreement, held_agreement, target):
        # Merge on the summed out-of-fold probabilities until the cross-validated target is met;
        # or, where it is met and the held-out rows fall short (routers fitted on the merged
        # labels, not summed probabilities: those underrate a merged partition), merge once ...
        held_short = held_agreement is not None and held_agreement < target
        merged_this_round = False
        while kc > 1:
            before = _agreement(proba, current)
            held_before = _agreement(hproba, held_cur) if hproba is not None else None
            if before >= target and (merged_this_round or not held_short):
                break
            merged_this_round = True
            sizes = np.bincount(current, minlength=kc)
            cos = cent @ cent.T if cent is not None else None
            conf = _confusions(proba, current)
            if hproba is not None:
                conf = conf + _confusions(hproba, held_cur)
            a, b, n_conf = _merge_once(conf, cos)
            if cent is not None:  # the merged centroid: the size-weighted mean direction
                merged = cent[a] * max(sizes[a], 1) + cent[b] * max(sizes[b], 1)
                cent[a] = unit_rows(merged)
                cent = np.delete(cent, b, axis=0)
            # b joins a; clusters above b move down by one.
            mapping = _merged(mapping, a, b)
            current, held_cur = _merged(current, a, b), _merged(held_cur, a, b)
            proba[:, a] += proba[:, b]
            proba = np.delete(proba, b, axis=1)
            if hproba is not None:
                hproba[:, a] += hproba[:, b]
                hproba = np.delete(hproba, b, axis=1)
            kc -= 1
            steps.append(
                MergeStep(
                    a,
                    b,
                    n_conf,
                    (int(sizes[a]), int(sizes[b])),
                    float(cos[a, b]) if cos is not None else None,
                    before,
                    _agreement(proba, current),
                    held_before,
                    "cross-validated" if before < target else "held-out",
                )
            )
        # ... then check again with routers trained on the merged labels.
        if kc > 1:
            proba, hproba = evidence(current, held_cur, kc)
            agreement = _agreement(proba, current)
            held_agreement = _agreement(hproba, held_cur) if hproba is not None else None
            rounds += 1
        else:
            agreement = 1.0
            held_agreement = 1.0 if use_held else None
        if rounds >= max_rounds:
            break
    return RoutabilityResult(
        mapping=mapping,
        k_before=k,
        k_after=kc,
        target=target,
        agreement_before=first,
        agreement_after=agreement,
        steps=steps,
        cv_rounds=rounds,
        n_held=len(held) if use_held else 0,
        held_agreement_before=held_first,
        held_agreement_after=held_agreement,
    )
