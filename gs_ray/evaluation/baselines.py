"""``gs-ray eval RUN_DIR``: GradientSpace against the usual ways, on the run's held-out split.

Every method is scored on exactly the same test rows (the run's test split, less samples left
out of clustering) and every trained method sees the same training budget: each training sample
``experts.epochs`` times, from the warm-up adapter, with the experts' optimiser settings (one
LoRA on everything takes as many sample passes as the K experts together). Methods
(docs/evaluation.md):

* ``base`` - the base model; ``warmup`` - the warm-up adapter alone;
* ``single_lora`` - one LoRA on all the training data;
* ``random_clusters`` - the run's cluster sizes, samples dealt at random; K LoRAs + a router;
* ``embedding_kmeans`` - K-means (K of the run) on the router encoder's prompt embeddings; K
  LoRAs + a router ("Mixture of LoRA");
* ``merged`` - the run's K experts averaged into one adapter (the mean of their B A updates);
* ``elrea`` - K-means on randomly projected gradients; at inference all K experts, weighted by
  the softmax of the query's gradient similarity to each cluster;
* ``gradientspace`` (what the run deploys: the router's expert, or the generalist where the
  calibrated router is unsure, ``routing/fallback.py``; the router alone where the run has no
  fallback), ``gradientspace_nofallback`` (the router's expert always), ``gradientspace_oracle``
  (routed by the gradient assignment, which needs the answer: a bound, not a deployable system)
  and ``gradientspace_ensemble`` (all K experts weighted by the router's probabilities).

``single_lora`` of the first seed is the run's own generalist where it has one (the same
budget), not trained again. Every method is compared with one LoRA and with the best other
baseline row by row (``stats.py``: paired differences, bootstrap intervals), and ``eval.json``
opens with the verdict: the deployed GradientSpace pays off, ties or loses against one LoRA.

The baselines' trainings run on Ray Train, in parallel, like the experts; an interrupted eval
run again keeps every finished adapter. Outputs: ``eval/eval.json`` (every number),
``eval/partitions.json`` (each partition over the run's samples, -1 outside the train split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray import tracking
from gs_ray.config import Config, apply_overrides
from gs_ray.core.clustering import unit_rows, within_cluster_variance
from gs_ray.core.seeds import eval_router_seed, eval_seed, expert_seed
from gs_ray.errors import ConfigError, RunDirError
from gs_ray.evaluation.analyses import (
    Gradients,
    ablation_ks,
    gradients,
    prompt_pair,
    router_table,
    sts_similarity,
)
from gs_ray.evaluation.compare import (
    agreement,
    answer_key,
    by_domain,
    domain_counts,
    is_correct,
    random_partition,
    spread,
    top_terms,
)
from gs_ray.evaluation.stats import comparisons, headline, routing_costs
from gs_ray.io import write_json
from gs_ray.prepare import Prepared, prepare
from gs_ray.ray_utils import task_resources, use_assigned_cpus
from gs_ray.routing.fallback import Fallback
from gs_ray.rundir import (
    EXPERT_RECORD,
    GENERALIST,
    TRAIN_RECORD,
    WARMUP,
    RunDir,
    adapter_complete,
    expert_name,
)
from gs_ray.training.pretrain import base_model_for

log = logging.getLogger(__name__)

PARTITIONED = ("random_clusters", "embedding_kmeans", "elrea")  # K experts trained here
ROUTED = ("random_clusters", "embedding_kmeans")  # ... and a router trained here
SINGLE = "single"
# The baselines every method is also compared with (the best of them, row by row).
BASELINES = ("single_lora", "embedding_kmeans", "random_clusters", "merged", "elrea", "warmup")


# --------------------------------------------------------------------------- partitions


def _train_test(p: Prepared) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(labels, train rows, test rows, K): the rows every method shares (the training rows less
    the run's calibration rows, which no adapter of the run was trained on)."""
    labels, k = p.assignments()
    train, test = p.fit_rows(), p.splits.test
    return labels, train[labels[train] >= 0], test[labels[test] >= 0], k


def _kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """K-means in cosine geometry, ``n_init`` runs (``clustering.kmeans_n_init``)."""
    from sklearn.cluster import KMeans

    x = unit_rows(x)  # cosine geometry
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x).astype(np.int64)


def _on_train(n: int, train: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.full(n, -1, dtype=np.int64)
    out[train] = values
    return out


def _encode_task(texts, router_cfg, cache_path):
    from gs_ray.routing.encoder import encode_cached

    return encode_cached(texts, router_cfg.encoder, cache_path, router_cfg.max_length)


def ablation_method(k: int) -> str:
    """The K ablation's partition with ``k`` clusters, named like a method."""
    return f"k{k}"


def partitions(
    p: Prepared, seed_index: int, grads: Gradients | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Each partitioned method's labels over the run's samples (-1 outside train), and what
    the rest needs: ELREA's test weights and seconds per query gradient; for the first seed the
    analysis pass (``analyses.Gradients``: later seeds reuse it, the warm-up adapter is the same)
    and the K ablation's partitions and test labels."""
    import ray

    from gs_ray.core.ensemble import gradient_similarity_probs

    cfg, ec = p.cfg, p.cfg.eval
    labels, train, test, k = _train_test(p)
    n, seed = len(p.samples), eval_seed(cfg.run.seed, seed_index)
    out: dict[str, np.ndarray] = {"gradientspace": _on_train(n, train, labels[train])}
    extra: dict[str, Any] = {}
    want = set(ec.methods)
    if "random_clusters" in want:
        out["random_clusters"] = random_partition(out["gradientspace"], seed)
    if "embedding_kmeans" in want:
        cache = str(p.run.eval_prompt_features)
        prompts = [p.samples[i].prompt for i in train]
        feats = ray.get(
            ray.remote(_encode_task).options(**task_resources()).remote(prompts, cfg.router, cache)
        )
        out["embedding_kmeans"] = _on_train(
            n, train, _kmeans(feats, k, seed, cfg.clustering.kmeans_n_init)
        )
    if "elrea" not in want and seed_index > 0:
        return out, extra
    if grads is None:
        grads = gradients(p, train, test, labels[train], ablation_ks(cfg, k))
    if seed_index == 0:
        extra["gradients"] = grads
        extra["ablation"] = {}
        for kk, fit in grads.ablation.items():
            out[ablation_method(kk)] = _on_train(n, train, fit["train"])
            extra["ablation"][kk] = fit
    if "elrea" in want:
        part = _kmeans(grads.train, k, seed, cfg.clustering.kmeans_n_init)
        out["elrea"] = _on_train(n, train, part)
        # A cluster's inference centroid: the mean unit prompt-gradient of its members, so that
        # queries (prompts only) are compared with what they can be compared with.
        unit = unit_rows(grads.queries)
        centroids = np.stack([unit[: len(train)][part == c].mean(0) for c in range(k)])
        extra["elrea_weights"] = gradient_similarity_probs(
            grads.queries[len(train) :], centroids, ec.elrea_temperature
        )
        extra["elrea_gradient_ms"] = grads.query_ms
    return out, extra


# --------------------------------------------------------------------------- training


def _jobs(p: Prepared, parts: dict[str, np.ndarray], seed_index: int) -> list:
    """The adapters this seed still needs: one LoRA on everything, K per partitioned method,
    and (for seeds after the first) the GradientSpace experts again."""
    from gs_ray.training.ray_train import AdapterJob

    labels, train, _, k = _train_test(p)
    methods = set(p.cfg.eval.methods)
    base_seed = eval_seed(p.cfg.run.seed, seed_index)
    wanted: list[tuple[str, str, np.ndarray, int]] = []
    # One LoRA on everything: the run's generalist for the first seed (the same job), trained
    # here for later seeds, where the deployed GradientSpace also falls back to it.
    reuse = seed_index == 0 and p.run.generalist_complete()
    if not reuse and ("single_lora" in methods or _has_fallback(p)):
        wanted.append(("single_lora", SINGLE, train, base_seed))
    # With a step limit per expert, one LoRA on everything gets the K experts' steps together.
    limit = p.cfg.experts.max_steps
    retrain = ["gradientspace"] if seed_index > 0 else []
    ablation = [m for m in parts if _is_ablation(m)]
    for method in [m for m in PARTITIONED if m in methods] + retrain + ablation:
        for c in range(_n_clusters(parts[method], train)):
            rows = train[parts[method][train] == c]
            wanted.append((method, expert_name(c), rows, expert_seed(base_seed, c)))
    jobs = []
    for method, name, rows, seed in wanted:
        out = p.run.eval_adapter(seed_index, method, name)
        if adapter_complete(out) or len(rows) == 0:
            continue
        jobs.append(
            AdapterJob(
                name=f"eval-s{seed_index}-{method}-{name}",
                base_path=p.base_path,
                output_dir=str(out),
                samples=p.pairs(rows),
                init_adapter=str(p.run.warmup_adapter),
                seed=seed,
                max_steps=limit * k if limit and name == SINGLE else None,
            )
        )
    return jobs


def _has_fallback(p: Prepared) -> bool:
    """The run deploys the generalist fallback (calibrated by its ``calibrate`` stage)."""
    return p.cfg.fallback.enabled and p.run.fallback_json.exists() and p.run.generalist_complete()


def _generalist(p: Prepared, seed_index: int) -> str:
    """The one-LoRA adapter of a seed: the run's generalist (first seed), else trained here."""
    if seed_index == 0 and p.run.generalist_complete():
        return GENERALIST
    return f"s{seed_index}/single_lora/{SINGLE}"


def _is_ablation(method: str) -> bool:
    return method[:1] == "k" and method[1:].isdigit()


def _n_clusters(part: np.ndarray, train: np.ndarray) -> int:
    return int(part[train].max()) + 1 if len(train) else 0


def train_baselines(p: Prepared, jobs: list) -> dict[str, dict]:
    """Train the jobs on Ray Train in parallel (the experts' settings); each record is kept
    next to its adapter. Raises when a training failed after its retries."""
    from gs_ray.training.ray_train import train_many_on_ray

    if not jobs:
        return {}
    log.info("eval: training %d adapters (%s)", len(jobs), ", ".join(j.name for j in jobs))
    storage = str(p.run.eval_ray_train.resolve())
    records = train_many_on_ray(
        jobs,
        p.cfg.model,
        p.cfg.lora,
        p.cfg.experts,
        p.pad_id,
        storage,
        parallel=p.cfg.experts.parallel,
        resume=True,
        max_concurrent=p.cfg.eval.max_parallel_trainings,
    )
    failed = {n: r.get("error") for n, r in records.items() if not r.get("ok")}
    if failed:
        raise RuntimeError(f"eval: training failed after retries: {failed}")
    for job in jobs:
        rec = records[job.name]
        write_json(
            Path(job.output_dir) / TRAIN_RECORD,
            {
                "n_train": len(job.samples),
                "steps": len(rec.get("losses", [])),
                "seconds": rec.get("seconds"),
                "losses": rec.get("losses"),
            },
        )
    return records


def _train_record(folder: Path) -> dict:
    path = folder / TRAIN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _fit_routers(p: Prepared, parts: dict[str, np.ndarray], seed_index: int) -> None:
    """The same kind of router as GradientSpace's, on each routed baseline's partition."""
    import ray

    from gs_ray.routing.router import ROUTER_JSON
    from gs_ray.routing.stage import fit_and_save_router

    _, train, _, _ = _train_test(p)
    prompts = [p.samples[i].prompt for i in train]
    cache = str(p.run.eval_prompt_features)
    pending = []
    for method in [m for m in parts if m in ROUTED or _is_ablation(m)]:
        folder = p.run.eval_router(method, seed_index)
        if not (folder / ROUTER_JSON).exists():
            task = ray.remote(fit_and_save_router).options(**task_resources())
            pending.append(
                task.remote(
                    prompts,
                    parts[method][train],
                    _n_clusters(parts[method], train),
                    p.cfg.router,
                    eval_router_seed(p.cfg.run.seed, seed_index),
                    cache,
                    str(folder),
                )
            )
    ray.get(pending)


def _route_task(folders: dict[str, str], prompts: list[str], n_latency: int) -> tuple[dict, dict]:
    """Each router's p(k | prompt) on the test prompts, and its latency per prompt (ms) over
    the first ``n_latency`` (``eval.latency_samples``)."""
    from gs_ray.routing.router import load_router

    probs, latency = {}, {}
    for key, folder in folders.items():
        router = load_router(folder)
        probs[key] = router.predict_proba(prompts)
        latency[key] = router.route_latency_ms(prompts[:n_latency])
    return probs, latency


class Scorer:
    """One base model with every adapter (merged ones built here) in one process: per-token test
    losses of the base model (name None) or an adapter, greedy generations for a plan (adapter
    names, weights), and the milliseconds of one forward of a query. ``evaluate_run`` hosts it
    in a Ray actor and asks for one adapter or plan at a time, so that it can show progress."""

    def __init__(
        self, base_path, model_cfg, adapters: dict[str, str], merges: dict[str, list[str]]
    ):
        from gs_ray.training.loop import load_adapters

        use_assigned_cpus()
        self.first = next(iter(adapters))  # the adapter the latency is timed with
        self.model = load_adapters(base_path, model_cfg, adapters)
        for name, parts in merges.items():
            # combination "cat" stacks the adapters' A and B: its update sum_k w_k B_k A_k is
            # exactly the weighted mean of the experts' updates when w_k = 1/K ("linear" averages
            # A and B separately, which is not the mean of the products).
            self.model.add_weighted_adapter(
                parts, [1.0 / len(parts)] * len(parts), name, combination_type="cat"
            )
        self.model.eval()

    def losses(self, name: str | None, pairs, pad_id: int) -> list[np.ndarray]:
        from gs_ray.core.generate import using
        from gs_ray.training.loop import token_losses

        with using(self.model, name):
            return token_losses(self.model, pairs, pad_id)

    def generate(self, names, weights, prompts, max_new_tokens: int, eos_id, pad_id: int):
        from gs_ray.core.generate import greedy_mixture

        return greedy_mixture(self.model, names, weights, prompts, max_new_tokens, eos_id, pad_id)

    def forward_ms(self, pairs, n_timed: int) -> float:
        import torch

        timed = [prompt_pair(pair)[0] for pair in pairs[:n_timed]]
        self.model.set_adapter(self.first)
        with torch.no_grad():
            for ids in timed[:2]:  # untimed warm-up calls
                self.model(input_ids=torch.tensor([ids]))
            start = time.perf_counter()
            for ids in timed:
                self.model(input_ids=torch.tensor([ids]))
        return 1000 * (time.perf_counter() - start) / max(1, len(timed))


def _score(p, cfg, adapters, merges, test, gen_plans, gen_prompts) -> tuple[dict, dict, float]:
    """Every adapter's per-token test losses, every plan's generations and one forward's
    milliseconds, from one ``Scorer`` actor, with a progress line per part."""
    import ray

    from gs_ray.progress import Progress

    ec = cfg.eval
    scorer = (
        ray.remote(Scorer)
        .options(**task_resources())
        .remote(p.base_path, cfg.model, adapters, merges)
    )
    try:
        pairs = ray.put(p.pairs(test))
        token_nll = {}
        bar = Progress("eval: test losses", total=1 + len(adapters) + len(merges), unit="adapters")
        for name in [None, *adapters, *merges]:
            token_nll[name] = ray.get(scorer.losses.remote(name, pairs, p.pad_id))
            bar.update(1)
        bar.close()
        generated = {}
        if gen_plans:
            bar = Progress("eval: generations", total=len(gen_plans), unit="plans")
            for key, (names, weights) in gen_plans.items():
                generated[key] = ray.get(
                    scorer.generate.remote(
                        names,
                        weights,
                        gen_prompts,
                        ec.max_new_tokens,
                        p.tokenizer.eos_token_id,
                        p.pad_id,
                    )
                )
                bar.update(1)
            bar.close()
        forward_ms = ray.get(scorer.forward_ms.remote(pairs, ec.latency_samples))
    finally:
        ray.kill(scorer)
    return token_nll, generated, forward_ms


# --------------------------------------------------------------------------- the whole comparison


@dataclasses.dataclass
class Plan:
    """How one method answers each test query: adapters (None: the base model) and weights
    (n_test, len(adapters)); its cost in forward passes; what it adds to a forward's latency."""

    adapters: list[str | None]
    weights: np.ndarray
    forward_passes: int
    extra_ms: float = 0.0
    deployable: bool = True


def _gs_experts(seed_index: int, k: int) -> list[str]:
    """GradientSpace's experts: the run's own for the first seed, retrained ones after."""
    if seed_index == 0:
        return [expert_name(c) for c in range(k)]
    return [f"s{seed_index}/gradientspace/{expert_name(c)}" for c in range(k)]


def _adapter_path(run: RunDir, name: str) -> Path:
    """Where an adapter named in a plan lives: the warm-up, a run expert, or an eval adapter
    ("s<i>/<method>/<name>")."""
    if name == WARMUP:
        return run.warmup_adapter
    if name == GENERALIST:
        return run.generalist
    if "/" in name:
        seed, method, expert = name.split("/")
        return run.eval_adapter(int(seed.removeprefix("s")), method, expert)
    return run.expert(int(name.removeprefix(expert_name(0)[:-1])))


def _response_text(p: Prepared, row: int) -> str:
    """A sample's reference response as the model was trained on it (after truncation)."""
    s = p.samples[row]
    return p.tokenizer.decode([t for t in s.labels if t != -100], skip_special_tokens=True)


def _one_hot(index: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(index), k))
    out[np.arange(len(index)), index] = 1.0
    return out


def _plans(
    p: Prepared, seed_index: int, parts: dict, extra: dict, probs: dict, router_ms: dict
) -> dict[str, Plan]:
    """Every method's plan for this seed."""
    labels, _, test, k = _train_test(p)
    n = len(test)
    ones = np.ones((n, 1))
    i = seed_index

    def experts(method: str) -> list[str]:
        if method == "gradientspace":
            return _gs_experts(i, k)
        return [f"s{i}/{method}/{expert_name(c)}" for c in range(k)]

    gs_probs = probs["gradientspace"]
    routed = Plan(
        experts("gradientspace"), _one_hot(gs_probs.argmax(1), k), 1, router_ms["gradientspace"]
    )
    deployed = routed
    if _has_fallback(p):
        _, _, back = Fallback.load(p.run.fallback_json).route(gs_probs)
        deployed = Plan(
            experts("gradientspace") + [_generalist(p, i)],
            _one_hot(np.where(back, k, gs_probs.argmax(1)), k + 1),
            1,
            router_ms["gradientspace"],
        )
    plans = {
        "base": Plan([None], ones, 1),
        "warmup": Plan([WARMUP], ones, 1),
        "single_lora": Plan([_generalist(p, i)], ones, 1),
        "merged": Plan([f"s{i}/merged"], ones, 1),
        "gradientspace": deployed,
        "gradientspace_nofallback": routed,
        "gradientspace_oracle": Plan(
            experts("gradientspace"), _one_hot(labels[test], k), 1, deployable=False
        ),
        "gradientspace_ensemble": Plan(
            experts("gradientspace"), gs_probs, k, router_ms["gradientspace"]
        ),
    }
    for method in ROUTED:
        if method in parts:
            key = f"{method}@{i}"
            plans[method] = Plan(
                experts(method), _one_hot(probs[key].argmax(1), k), 1, router_ms[key]
            )
    if "elrea" in parts:
        plans["elrea"] = Plan(
            experts("elrea"), extra["elrea_weights"], k + 1, extra["elrea_gradient_ms"]
        )
    return {m: plan for m, plan in plans.items() if m in p.cfg.eval.methods}


def _ablation_plans(ablation: dict[int, dict], probs: dict) -> dict[tuple[int, str], Plan]:
    """The K ablation's plans (first seed): each K's experts routed by its own router, and by
    the test rows' gradient assignment (oracle)."""
    out = {}
    for kk, fit in ablation.items():
        experts = [f"s0/{ablation_method(kk)}/{expert_name(c)}" for c in range(kk)]
        out[(kk, "routed")] = Plan(
            experts, _one_hot(probs[f"{ablation_method(kk)}@0"].argmax(1), kk), 1
        )
        out[(kk, "oracle")] = Plan(experts, _one_hot(fit["test"], kk), 1, deployable=False)
    return out


def _ablation_rows(ablation, ab_plans, nll, methods, probs, k, grads) -> list[dict[str, Any]]:
    """The paper's Fig. 6 as rows: per K, the cosine silhouette of the training gradients'
    partition (full dimension) and the held-out loss, routed and oracle; K = 1 is one LoRA on
    everything, the run's K is the run itself (online clustering, its own experts and router)."""
    rows = []
    if "single_lora" in methods:
        rows.append(
            {
                "k": 1,
                "source": "single_lora",
                "silhouette": None,
                "test_loss_routed": methods["single_lora"]["per_seed"][0]["test_loss"],
                "test_loss_oracle": methods["single_lora"]["per_seed"][0]["test_loss"],
            }
        )
    # The run's row is routed like the ablation's (the router alone, no fallback).
    routed = next((m for m in ("gradientspace_nofallback", "gradientspace") if m in methods), None)
    if routed and grads is not None:
        oracle = methods.get("gradientspace_oracle", {}).get("per_seed", [{}])[0]
        rows.append(
            {
                "k": k,
                "source": "run",
                "silhouette": grads.run_silhouette,
                "test_loss_routed": methods[routed]["per_seed"][0]["test_loss"],
                "test_loss_oracle": oracle.get("test_loss"),
            }
        )
    for kk, fit in ablation.items():
        rows.append(
            {
                "k": kk,
                "source": "ablation",
                "silhouette": fit["silhouette"],
                "test_loss_routed": float(nll(ab_plans[(kk, "routed")]).mean()),
                "test_loss_oracle": float(nll(ab_plans[(kk, "oracle")]).mean()),
                "router_agreement": agreement(
                    probs[f"{ablation_method(kk)}@0"].argmax(1), fit["test"]
                ),
                "cluster_sizes": np.bincount(fit["train"], minlength=kk).tolist(),
            }
        )
    return sorted(rows, key=lambda r: r["k"])


def _analysis_plots(run: RunDir, analyses: dict[str, Any]) -> None:
    from gs_ray.evaluation.plots import k_ablation_plot, sts_plot

    if len(analyses.get("k_ablation") or []) > 1:
        k_ablation_plot(run, analyses["k_ablation"])
    if analyses.get("sts"):
        sts_plot(run, analyses["sts"])


def eval_config(run: RunDir, overrides: list[str]) -> Config:
    bad = [o for o in overrides if o.startswith("--") and not o.startswith("--eval.")]
    if bad:
        raise ConfigError(f"gs-ray eval takes only --eval.* overrides, not {bad[0]}")
    return apply_overrides(run.config(), overrides)


def evaluate_run(run_dir: str | Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """Compare GradientSpace with the baselines on the run's held-out split; writes
    ``eval/eval.json`` and ``eval/partitions.json`` and returns the numbers."""
    run = RunDir.open(run_dir)
    cfg = eval_config(run, overrides or [])
    missing = [s for s in ("warmup", "stage2", "experts", "router") if not run.stage_done(s)]
    if missing:
        raise RunDirError(
            f"{run.path}: stages {missing} are not done; finish the run first "
            f"(gs-ray run --resume {run.path})"
        )
    # The run's MLflow run (tracking.mlflow): the eval is a nested run of it.
    with tracking.open_tracker(cfg, run) as tracker:
        tracker.log_done_stages()
        with tracker.stage(tracking.EVAL) as stage:
            out = _compare(run, cfg)
            stage.log_text(table(out), f"{tracking.EVAL}/eval_table.txt")
        tracker.log_outputs()
    return out


def _compare(run: RunDir, cfg: Config) -> dict[str, Any]:
    """``evaluate_run`` on a checked run: the baselines trained, every method scored, eval.json
    written and the report rebuilt."""
    import ray

    from gs_ray.core.ensemble import mixture_nll
    from gs_ray.ray_utils import init_ray

    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    started = time.time()
    p = prepare(cfg, run, base_model=base_model_for)
    ec = cfg.eval
    labels, train, test, k = _train_test(p)
    test_ids = [p.samples[i].id for i in test]
    log.info(
        "eval: %d methods, %d seed(s), K=%d, %d train / %d test samples",
        len(ec.methods),
        ec.seeds,
        k,
        len(train),
        len(test),
    )

    seeds = []
    for i in range(ec.seeds):
        parts, extra = partitions(p, i, seeds[0][1].get("gradients") if seeds else None)
        if i == 0:
            write_json(run.eval_partitions, {m: v.tolist() for m, v in parts.items()})
            grads = extra.get("gradients")
            analyses = analyse(
                p,
                {m: v for m, v in parts.items() if not _is_ablation(m)},
                grads.train if grads is not None else None,
            )
        train_baselines(p, _jobs(p, parts, i))
        _fit_routers(p, parts, i)
        seeds.append((parts, extra))

    # Routers' probabilities on the test prompts (GradientSpace's, then each baseline's).
    folders = {"gradientspace": str(run.router)}
    for i, (parts, _) in enumerate(seeds):
        folders.update(
            {
                f"{m}@{i}": str(run.eval_router(m, i))
                for m in parts
                if m in ROUTED or _is_ablation(m)
            }
        )
    prompts = [p.samples[j].prompt for j in test]
    probs, router_ms = ray.get(
        ray.remote(_route_task)
        .options(**task_resources())
        .remote(folders, prompts, p.cfg.eval.latency_samples)
    )

    plans = {
        i: _plans(p, i, parts, extra, probs, router_ms) for i, (parts, extra) in enumerate(seeds)
    }
    merges = {f"s{i}/merged": _gs_experts(i, k) for i, mp in plans.items() if "merged" in mp}
    ablation = seeds[0][1].get("ablation", {})
    ab_plans = _ablation_plans(ablation, probs)
    names = {a for mp in plans.values() for plan in mp.values() for a in plan.adapters}
    names |= {a for parts in merges.values() for a in parts}
    names |= {a for plan in ab_plans.values() for a in plan.adapters}
    adapters = {WARMUP: str(run.warmup_adapter)}  # first: the one the latency is timed with
    adapters.update({a: str(_adapter_path(run, a)) for a in sorted(names - set(merges) - {None})})

    # Exact match: checkable test items, capped; every method answers the same items.
    checkable = [j for j, row in enumerate(test) if answer_key(_response_text(p, row))]
    gen_rows = checkable[: ec.max_generate]
    gen_prompts = [prompt_pair(p.samples[test[j]].pair)[0] for j in gen_rows]
    gen_plans = (
        {
            (m, i): (plan.adapters, plan.weights[gen_rows])
            for i, mp in plans.items()
            for m, plan in mp.items()
        }
        if gen_rows
        else {}
    )
    log.info(
        "eval: scoring %d adapters on %d test samples; %d checkable items generated per method",
        len(adapters) + len(merges),
        len(test),
        len(gen_rows),
    )
    token_nll, generated, forward_ms = _score(
        p, cfg, adapters, merges, test, gen_plans, gen_prompts
    )

    domains = [p.samples[j].domain for j in test]
    references = [_response_text(p, test[j]) for j in gen_rows]
    gen_domains = [domains[j] for j in gen_rows]

    def nll(plan: Plan) -> np.ndarray:
        return np.array(
            [
                mixture_nll(np.stack([token_nll[a][j] for a in plan.adapters]), plan.weights[j])
                for j in range(len(test))
            ]
        )

    methods: dict[str, Any] = {}
    per_row: dict[str, np.ndarray] = {}  # method -> (seeds, test rows) losses, for the statistics
    for method in ec.methods:
        if method not in plans[0]:
            continue
        per_seed, losses_by_seed = [], []
        for i, mp in plans.items():
            plan = mp[method]
            losses = nll(plan)
            losses_by_seed.append(losses)
            correct = None
            if gen_rows:
                texts = [
                    p.tokenizer.decode(t, skip_special_tokens=True) for t in generated[(method, i)]
                ]
                correct = np.array([is_correct(r, t) for r, t in zip(references, texts)])
            per_seed.append(
                {
                    "seed_index": i,
                    "test_loss": float(losses.mean()),
                    "exact_match": float(correct.mean()) if correct is not None else None,
                    "exact_match_by_domain": by_domain(correct, gen_domains)
                    if correct is not None
                    else {},
                }
            )
        plan0 = plans[0][method]
        per_row[method] = np.stack(losses_by_seed)
        loss_mean, loss_std = spread([s["test_loss"] for s in per_seed])
        em_mean, em_std = spread([s["exact_match"] for s in per_seed])
        trained = _training_cost(run, method, plans, k)
        methods[method] = {
            "test_loss": loss_mean,
            "test_loss_std": loss_std,
            "test_loss_by_domain": by_domain(np.mean(losses_by_seed, axis=0), domains),
            "exact_match": em_mean,
            "exact_match_std": em_std,
            "exact_match_by_domain": per_seed[0]["exact_match_by_domain"],
            "forward_passes_per_query": plan0.forward_passes,
            "latency_ms_per_query": (
                plan0.extra_ms
                + forward_ms * (plan0.forward_passes - (1 if method == "elrea" else 0))
            )
            if plan0.deployable
            else None,
            "deployable": plan0.deployable,
            "k": len(plan0.adapters) if len(plan0.adapters) > 1 else None,
            **trained,
            "per_seed": per_seed,
        }
    for method, entry in comparisons(
        per_row, "single_lora", [m for m in BASELINES if m in per_row], seed=cfg.run.seed
    ).items():
        methods[method].update(entry)
    routing = None
    if "gradientspace" in plans[0]:
        expert_rows = np.array(
            [
                [token_nll[a][j].mean() if len(token_nll[a][j]) else 0.0 for j in range(len(test))]
                for a in _gs_experts(0, k)
            ]
        )
        routing = routing_costs(
            expert_rows, probs["gradientspace"].argmax(1), labels[test], seed=cfg.run.seed
        )
    analyses["routers"] = router_table(
        p,
        train,
        test,
        labels,
        k,
        seeds[0][1].get("gradients"),
        (probs["gradientspace"].argmax(1), router_ms["gradientspace"]),
    )
    analyses["k_ablation"] = _ablation_rows(
        ablation, ab_plans, nll, methods, probs, k, seeds[0][1].get("gradients")
    )
    analyses["sts"] = sts_similarity(p)
    _analysis_plots(run, analyses)
    verdict = None
    if "vs_reference" in methods.get("gradientspace", {}):
        verdict = {
            **methods["gradientspace"]["vs_reference"],
            "headline": headline("GradientSpace (as deployed)", methods["gradientspace"]),
            "fallback": _has_fallback(p),
        }
    out = {
        "verdict": verdict,
        "routing": routing,
        "run_dir": str(run.path),
        "n_test": len(test),
        "test_ids_sha256": hashlib.sha256("\n".join(test_ids).encode()).hexdigest(),
        "n_train": len(train),
        "k": k,
        "seeds": [eval_seed(cfg.run.seed, i) for i in range(ec.seeds)],
        "budget": {
            "epochs": cfg.experts.epochs,
            "rule": "every trained method sees each training "
            "sample experts.epochs times, from the warm-up adapter, with the experts' "
            "optimiser settings",
        },
        "n_exact_match_items": len(gen_rows),
        "forward_ms": forward_ms,
        "router_ms": router_ms.get("gradientspace"),
        "config": dataclasses.asdict(ec),
        "seconds": time.time() - started,
        "methods": methods,
        "analyses": analyses,
    }
    write_json(run.eval_json, out)
    from gs_ray.evaluation.report import build_report

    log.info("eval: written %s; report: %s\n%s", run.eval_json, build_report(run.path), table(out))
    if verdict:
        log.info("eval: %s", verdict["headline"])
    return out


def analyse(p: Prepared, parts: dict[str, np.ndarray], G: np.ndarray | None) -> dict[str, Any]:
    """The paper's analyses of each partition of the training samples: clusters by source
    domain (Fig. 5), top TF-IDF terms per cluster (Table 2) and, with the training samples'
    gradients (ELREA's, projected), Theorem 2's within-cluster variance against the whole set's."""
    _, train, _, _ = _train_test(p)
    domains = [p.samples[i].domain for i in train]
    texts = [p.samples[i].prompt for i in train]
    out = {}
    for name, labels in parts.items():
        lab = labels[train]
        entry = {"domains": domain_counts(lab, domains), "top_terms": top_terms(texts, lab)}
        if G is not None:
            entry["theorem2"] = within_cluster_variance(G, lab)
        out[name] = entry
    return out


def _training_cost(run: RunDir, method: str, plans: dict, k: int) -> dict[str, Any]:
    """Optimizer steps and seconds of a method's trainings (first seed)."""
    if method in ("base", "warmup", "merged", "gradientspace_oracle"):
        return {"train_steps": 0, "train_seconds": 0.0}
    if method.startswith("gradientspace"):
        recs = run.expert_records()
        if method == "gradientspace" and run.generalist_complete():
            recs.append(json.loads((run.generalist / EXPERT_RECORD).read_text()))
        return {
            "train_steps": sum(r.get("steps", 0) or 0 for r in recs),
            "train_seconds": sum(r.get("seconds", 0) or 0 for r in recs),
        }
    if method == "single_lora" and run.generalist_complete():  # the run's own generalist
        rec = json.loads((run.generalist / EXPERT_RECORD).read_text())
        return {"train_steps": rec.get("steps") or 0, "train_seconds": rec.get("seconds") or 0.0}
    names = [SINGLE] if method == "single_lora" else [expert_name(c) for c in range(k)]
    recs = [_train_record(run.eval_adapter(0, method, n)) for n in names]
    return {
        "train_steps": sum(r.get("steps", 0) for r in recs),
        "train_seconds": sum(r.get("seconds") or 0 for r in recs),
    }


def table(out: dict[str, Any]) -> str:
    """The comparison as a plain-text table (console, docs)."""

    def fmt(x, std=None, digits=4):
        if x is None:
            return "-"
        return f"{x:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    head = (
        f"{'method':24s} {'test loss':>18s} {'vs one LoRA [95% interval]':>30s} "
        f"{'exact match':>16s} {'passes':>6s} {'ms/query':>9s}"
    )
    lines = [head, "-" * len(head)]
    for name, m in out["methods"].items():
        ref = m.get("vs_reference")
        vs = f"{ref['mean']:+.4f} [{ref['lo']:+.4f}, {ref['hi']:+.4f}]" if ref else "-"
        lines.append(
            f"{name:24s} {fmt(m['test_loss'], m['test_loss_std']):>18s} {vs:>30s} "
            f"{fmt(m['exact_match'], m['exact_match_std'], 3):>16s} "
            f"{m['forward_passes_per_query']:>6d} "
            f"{fmt(m['latency_ms_per_query'], digits=1):>9s}"
        )
    if out.get("verdict"):
        lines.insert(0, out["verdict"]["headline"])
    return "\n".join(lines)
