"""The paper's analyses that need models, for ``gs-ray eval`` (the pure parts: ``compare.py``).

* ``gradients``: one pass over the training samples (response loss) and every query (its prompt
  alone: what a query has at inference) with the warm-up adapter. It feeds ELREA (K-means on the
  projected training gradients, query weights from the projected prompt gradients), Theorem 2's
  variances, the gradient-similarity router and the K ablation (GradientSpace's own estimator,
  K fixed, on the full-dimensional training gradients; the test rows' gradient assignment is
  its ``predict`` of their response gradients).
* ``router_table``: the paper's Table 3. Keyword similarity (each cluster's top TF-IDF terms),
  embedding similarity (cosine to each cluster's mean MiniLM embedding), gradient similarity
  (cosine of the prompt's LoRA gradient to each cluster's mean; ELREA's mechanism) and the
  trained router: agreement with the gradient assignment on the test rows, and latency per
  prompt at batch 1.
* ``sts_similarity``: the paper's Fig. 4. For STS benchmark sentence pairs, the cosine of the two
  sentences' LoRA gradients (language-modelling loss of each sentence, warm-up adapter) against
  the cosine of their encoder embeddings, and each against the human score.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np

from gs_ray.config import Config
from gs_ray.data.loading import prompt_pair
from gs_ray.evaluation.compare import (
    KeywordRouter,
    agreement,
    correlations,
    cosine_silhouette,
    nearest_centroid,
    unit_centroids,
)
from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources, use_assigned_cpus

log = logging.getLogger(__name__)

CHUNK = 64  # samples per engine call in the analysis passes (bounds the full-dim memory)


@dataclasses.dataclass
class Gradients:
    """What the analysis pass returns (projected rows unless said otherwise)."""

    train: np.ndarray  # (n_train, k_proj): training samples, response loss
    queries: np.ndarray  # (n_train + n_test, k_proj): prompts alone, train rows first
    query_ms: float  # one query's gradient at batch 1, milliseconds (projection not timed)
    ablation: dict[int, dict[str, Any]]  # K -> train/test labels, silhouette (full dimension)
    run_silhouette: float | None  # the run's partition, same full-dimensional training rows


class AnalysisPass:
    """The analysis pass's model, in one Ray actor (see the module docstring): the driver feeds
    it chunks and shows progress; the full-dimensional rows the K ablation needs stay here."""

    def __init__(self, base_path, cfg, adapter, pad_id):
        from gs_ray.stage2.computer import GradientComputer

        use_assigned_cpus()
        self.cfg, self.pad_id = cfg, pad_id
        self.computer = GradientComputer(base_path, cfg, adapter, pad_id)
        self.project = self.computer.project or (lambda g: g)
        self.proj: dict[str, list[np.ndarray]] = {}
        self.full: dict[str, list[np.ndarray]] = {}

    def add(self, part: str, pairs, keep_full: bool) -> int:
        """Gradients of ``pairs``: projected rows kept under ``part``, full rows if asked."""
        from gs_ray.core.gradients import compute_bucketed

        G = compute_bucketed(self.computer.engine, pairs, self.pad_id, self.computer.micro)
        self.proj.setdefault(part, []).append(self.project(G).numpy())
        if keep_full:
            self.full.setdefault(part, []).append(G.numpy())
        return len(pairs)

    def query_ms(self, pairs) -> float:
        """One query's gradient at batch 1, milliseconds (projection not timed)."""
        from gs_ray.core.gradients import compute_bucketed

        start = time.perf_counter()
        for pair in pairs:
            compute_bucketed(self.computer.engine, [pair], self.pad_id, 1)
        return 1000 * (time.perf_counter() - start) / max(1, len(pairs))

    def projected(self, part: str) -> np.ndarray:
        xs = self.proj.get(part, [])
        return np.concatenate(xs) if xs else np.zeros((0, self.computer.dim), np.float32)

    def run_silhouette(self, run_labels: np.ndarray) -> float:
        return cosine_silhouette(np.concatenate(self.full["train"]), run_labels)

    def ablate(self, k: int) -> dict[str, Any]:
        """GradientSpace's estimator with K = k on the full-dimensional training rows."""
        from gs_ray.stage2.launch import make_clusterer

        f_train = np.concatenate(self.full["train"])
        est = make_clusterer(self.cfg)
        est.n_clusters, est.k_range = k, (k, k)
        est.fit(f_train)
        return {
            "train": est.labels_,
            "test": est.predict(np.concatenate(self.full["test"])),
            "silhouette": cosine_silhouette(f_train, est.labels_),
        }


def gradients(
    p: Prepared, train: np.ndarray, test: np.ndarray, run_labels: np.ndarray, ablation_ks: list[int]
) -> Gradients:
    """The analysis pass, in a Ray actor (on a GPU where there is one), with progress lines."""
    import ray

    from gs_ray.progress import Progress

    ec = p.cfg.eval
    gcfg = dataclasses.replace(
        p.cfg,
        gradients=dataclasses.replace(
            p.cfg.gradients,
            projection_dim=ec.elrea_projection_dim,
            projection_kind=ec.elrea_projection_kind,
        ),
    )
    queries = [prompt_pair(p.samples[i].pair) for i in np.concatenate([train, test])]
    log.info(
        "eval: gradients of %d training samples and %d queries (projected to %d by %s)%s",
        len(train),
        len(queries),
        ec.elrea_projection_dim,
        ec.elrea_projection_kind,
        f"; K ablation {ablation_ks} on the full dimension" if ablation_ks else "",
    )
    actor = (
        ray.remote(AnalysisPass)
        .options(**task_resources())
        .remote(p.base_path, gcfg, str(p.run.warmup_adapter), p.pad_id)
    )
    want_full = bool(ablation_ks)
    parts = [("train", p.pairs(train), want_full), ("queries", queries, False)]
    if want_full:
        parts.append(("test", p.pairs(test), True))
    try:
        bar = Progress("eval: analysis gradients", total=sum(len(x[1]) for x in parts))
        for part, pairs, keep_full in parts:
            for start in range(0, len(pairs), CHUNK):
                bar.update(ray.get(actor.add.remote(part, pairs[start : start + CHUNK], keep_full)))
        bar.close()
        ms = ray.get(actor.query_ms.remote(queries[: ec.latency_samples]))
        ablation, run_sil = {}, None
        if want_full:
            run_sil = ray.get(actor.run_silhouette.remote(run_labels))
            for k in ablation_ks:
                start = time.perf_counter()
                ablation[k] = ray.get(actor.ablate.remote(k))
                log.info(
                    "eval: K ablation K=%d clustered in %.0f s (silhouette %.3f)",
                    k,
                    time.perf_counter() - start,
                    ablation[k]["silhouette"],
                )
        g_train, g_query = ray.get(
            [actor.projected.remote("train"), actor.projected.remote("queries")]
        )
    finally:
        ray.kill(actor)
    return Gradients(g_train, g_query, ms, ablation, run_sil)


# --------------------------------------------------------------------------- Table 3


def _text_routers_task(
    train_prompts, train_labels, test_prompts, k, router_cfg, cache_path, n_timed
):
    """Keyword and embedding-similarity routers: choices on the test prompts and milliseconds
    per prompt at batch 1."""
    from gs_ray.routing.encoder import encode_cached, load_encoder

    keyword = KeywordRouter(train_prompts, train_labels)
    feats = encode_cached(train_prompts, router_cfg.encoder, cache_path, router_cfg.max_length)
    centroids = unit_centroids(feats, train_labels, k)
    encoder = load_encoder(router_cfg.encoder, router_cfg.max_length)
    test_feats = encoder.encode(test_prompts)
    timed = test_prompts[:n_timed]

    def ms(fn):
        for text in timed[:3]:
            fn(text)
        start = time.perf_counter()
        for text in timed:
            fn(text)
        return 1000 * (time.perf_counter() - start) / max(1, len(timed))

    return {
        "keyword": (keyword.predict(test_prompts), ms(keyword.predict)),
        "embedding": (
            nearest_centroid(test_feats, centroids),
            ms(lambda t: nearest_centroid(encoder.encode([t]), centroids)),
        ),
    }


def router_table(
    p: Prepared,
    train: np.ndarray,
    test: np.ndarray,
    labels: np.ndarray,
    k: int,
    grads: Gradients | None,
    trained: tuple[np.ndarray, float],
) -> list[dict[str, Any]]:
    """The paper's Table 3 on the run's test rows (see the module docstring); ``trained``: the
    run's router's choices and its milliseconds per prompt."""
    import ray

    ec = p.cfg.eval
    prompts = [p.samples[i].prompt for i in train]
    test_prompts = [p.samples[i].prompt for i in test]
    task = ray.remote(_text_routers_task).options(**task_resources())
    chosen = ray.get(
        task.remote(
            prompts,
            labels[train],
            test_prompts,
            k,
            p.cfg.router,
            str(p.run.eval_prompt_features),
            ec.latency_samples,
        )
    )
    if grads is not None:
        centroids = unit_centroids(grads.queries[: len(train)], labels[train], k)
        chosen["gradient"] = (
            nearest_centroid(grads.queries[len(train) :], centroids),
            grads.query_ms,
        )
    chosen["trained"] = trained
    truth = labels[test]
    names = {
        "keyword": "keyword similarity (top TF-IDF terms)",
        "embedding": "embedding similarity (mean MiniLM embedding)",
        "gradient": "gradient similarity (ELREA's, projected prompt gradient)",
        "trained": "trained router (frozen encoder + linear head)",
    }
    return [
        {
            "router": key,
            "description": names[key],
            "agreement": agreement(pred, truth),
            "latency_ms": float(ms),
        }
        for key, (pred, ms) in chosen.items()
    ]


# --------------------------------------------------------------------------- Fig. 4


def _sts_task(base_path, cfg, adapter, pad_id, pairs, encoder, max_length):
    """Per sentence pair: cosine of the two sentences' LoRA gradients (full dimension, chunk by
    chunk) and of their encoder embeddings."""
    import torch

    from gs_ray.core.gradients import compute_bucketed
    from gs_ray.routing.encoder import load_encoder
    from gs_ray.stage2.computer import GradientComputer

    use_assigned_cpus()
    computer = GradientComputer(base_path, cfg, adapter, pad_id)
    grad_cos = []
    step = CHUNK // 2
    for start in range(0, len(pairs), step):
        chunk = pairs[start : start + step]
        G = compute_bucketed(
            computer.engine, [s for pr in chunk for s in pr[:2]], pad_id, computer.micro
        ).double()
        grad_cos.extend(torch.nn.functional.cosine_similarity(G[0::2], G[1::2], dim=1).tolist())
    enc = load_encoder(encoder, max_length)
    E1 = enc.encode([pr[2] for pr in pairs])
    E2 = enc.encode([pr[3] for pr in pairs])
    n1 = np.linalg.norm(E1, axis=1) * np.linalg.norm(E2, axis=1)
    emb_cos = (E1 * E2).sum(1) / np.maximum(n1, 1e-12)
    return np.array(grad_cos), emb_cos.astype(np.float64)


def sts_similarity(p: Prepared) -> dict[str, Any] | None:
    """The paper's Fig. 4 on ``eval.sts`` (None when it is not set)."""
    import ray

    from gs_ray.data.sts import read_sts, sample_pairs

    ec = p.cfg.eval
    if not ec.sts:
        return None
    pairs = sample_pairs(read_sts(ec.sts), ec.sts_pairs, p.cfg.run.seed)
    tok = p.tokenizer
    max_len = p.cfg.data.max_length

    def sample(text: str) -> tuple[list[int], list[int]]:
        ids = tok(text, truncation=True, max_length=max_len)["input_ids"]
        return ids, ids

    work = [(sample(pr.first), sample(pr.second), pr.first, pr.second) for pr in pairs]
    log.info("eval: STS similarity (Fig. 4) on %d sentence pairs of %s", len(work), ec.sts)
    task = ray.remote(_sts_task).options(**task_resources())
    cfg = dataclasses.replace(
        p.cfg, gradients=dataclasses.replace(p.cfg.gradients, projection_dim=None)
    )
    grad_cos, emb_cos = ray.get(
        task.remote(
            p.base_path,
            cfg,
            str(p.run.warmup_adapter),
            p.pad_id,
            work,
            p.cfg.router.encoder,
            p.cfg.router.max_length,
        )
    )
    gold = np.array([pr.score for pr in pairs])
    return {
        "file": str(ec.sts),
        "n_pairs": len(pairs),
        "gradient_vs_embedding": correlations(grad_cos, emb_cos),
        "gradient_vs_human": correlations(grad_cos, gold),
        "embedding_vs_human": correlations(emb_cos, gold),
        "pairs": [
            {
                "line": pr.line,
                "score": pr.score,
                "gradient_cosine": float(g),
                "embedding_cosine": float(e),
            }
            for pr, g, e in zip(pairs, grad_cos, emb_cos)
        ],
    }


def ablation_ks(cfg: Config, run_k: int) -> list[int]:
    """The K values the ablation trains (the run's own K is the run itself)."""
    return sorted({k for k in cfg.eval.k_ablation if k != run_k})
