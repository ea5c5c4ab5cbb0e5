"""``gs-ray eval RUN_DIR``: GradientSpace against the usual ways, on the run's held-out split.

Every method is scored on exactly the same test rows (the run's test split, less samples left
out of clustering) and every trained method sees the same training budget: each training sample
``experts.epochs`` times with the experts' optimiser settings (one LoRA on everything, from the
warm-up adapter, takes as many sample passes as the K experts together); every method's experts
start where the run's do (``Config.expert_start``). Methods (docs/evaluation.md):

* ``base`` - the base model; ``warmup`` - the warm-up adapter alone;
* ``single_lora`` - one LoRA on all the training data;
* ``single_lora_matched`` - one LoRA with the product's whole budget (from the generalist);
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

Each method is one object (``methods.py``: its partition, router, plan and cost); this module
is the controller that asks them in order: partitions, trainings, routers, routes, plans, one
scoring actor (``scorer.py``), rows, statistics. The baselines' trainings run on Ray Train, in
parallel, like the experts; an interrupted eval run again keeps every finished adapter. The run
itself is opened read-only (``prepare(..., read_only=True)``): eval writes under ``eval/`` and
the report, never the run's manifest or stage outputs. Outputs: ``eval/eval.json`` (every
number), ``eval/partitions.json`` (each partition over the run's samples, -1 outside the train
split).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray import tracking
from gs_ray.config import Config, apply_overrides
from gs_ray.core.clustering import within_cluster_variance
from gs_ray.core.seeds import eval_router_seed
from gs_ray.errors import ConfigError, RunDirError
from gs_ray.evaluation.analyses import ablation_ks, prompt_pair, router_table, sts_similarity
from gs_ray.evaluation.compare import (
    agreement,
    answer_key,
    by_domain,
    domain_counts,
    is_correct,
    spread,
    top_terms,
)
from gs_ray.evaluation.methods import (
    METHODS,
    Adapter,
    Evaluation,
    GradientSpace,
    KAblation,
    Method,
    Plan,
    Routes,
)
from gs_ray.evaluation.scorer import score
from gs_ray.evaluation.stats import comparisons, headline, routing_costs
from gs_ray.io import write_json
from gs_ray.prepare import Prepared, prepare
from gs_ray.ray_utils import task_resources
from gs_ray.rundir import TRAIN_RECORD, RunDir, adapter_complete
from gs_ray.training.pretrain import base_model_for

log = logging.getLogger(__name__)

# The baselines every method is also compared with (the best of them, row by row).
BASELINES = (
    "single_lora",
    "single_lora_matched",
    "embedding_kmeans",
    "random_clusters",
    "merged",
    "elrea",
    "warmup",
)
REFERENCE = "single_lora"  # the verdict's reference: one LoRA on everything


# --------------------------------------------------------------------------- the steps


def partition(ev: Evaluation, seed_index: int, methods: list[Method]) -> dict[str, np.ndarray]:
    """Each partitioned method's labels over the run's samples for a seed (GradientSpace's
    first: the random baseline deals its sizes); the first seed also runs the analysis pass
    (``Evaluation.gradients``; later seeds reuse it, the warm-up adapter is the same)."""
    ev.extra[seed_index] = {}
    gs = GradientSpace()
    parts = ev.parts[seed_index] = {gs.family: gs.partition(ev, seed_index)}
    if seed_index == 0 and ev.cfg.eval.analyses:
        ev.gradients()  # the analyses' rows and the K ablation's partitions
    for m in methods:
        if m.family not in parts:
            labels = m.partition(ev, seed_index)
            if labels is not None:
                parts[m.family] = labels
    return parts


def _n_clusters(part: np.ndarray, train: np.ndarray) -> int:
    return int(part[train].max()) + 1 if len(train) else 0


def pending_jobs(ev: Evaluation, seed_index: int, methods: list[Method]) -> list:
    """The adapters a seed's plans use that gs-ray eval trains and has not trained yet (one LoRA
    on everything, K per partitioned method, GradientSpace's experts again for later seeds), as
    Ray Train jobs with the experts' settings. An adapter that starts from one not trained yet
    (``Evaluation.init_of``) waits: that one is in the jobs instead, and the next call, after
    they are trained, gives the waiting ones."""
    from gs_ray.training.ray_train import AdapterJob

    p = ev.p
    limit = p.cfg.experts.max_steps
    uses = {m.name: m.uses(ev, seed_index) for m in methods}
    # One LoRA on everything gets the K experts' steps where experts.max_steps limits each.
    whole = {a for m in methods if m.whole for a in uses[m.name]}
    wanted = list(dict.fromkeys(a for m in methods for a in uses[m.name]))
    seen = set(wanted)
    jobs = []
    for a in wanted:  # grows with the adapters others start from
        if a.source != "eval":
            continue
        rows, out = ev.rows(a), a.path(ev.run)
        if adapter_complete(out) or len(rows) == 0:
            continue
        init = ev.init_of(a)
        if init.source == "eval" and not adapter_complete(init.path(ev.run)):
            if init not in seen:
                seen.add(init)
                wanted.append(init)
            continue
        single = a.cluster is None or a in whole
        jobs.append(
            AdapterJob(
                name=a.job_name,
                base_path=p.base_path,
                output_dir=str(out),
                samples=p.pairs(rows),
                init_adapter=str(init.path(ev.run)),
                seed=ev.training_seed(a),
                max_steps=limit * ev.k if limit and single else None,
            )
        )
    return jobs


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
                "init": job.init_adapter,  # the adapter it started from
                "steps": len(rec.get("losses", [])),
                "seconds": rec.get("seconds"),
                "losses": rec.get("losses"),
            },
        )
    return records


def fit_routers(ev: Evaluation, seed_index: int, methods: list[Method]) -> None:
    """The same kind of router as GradientSpace's, on each routed method's partition (one Ray
    task each, in parallel; a router already saved is kept)."""
    import ray

    from gs_ray.routing.router import ROUTER_JSON
    from gs_ray.routing.stage import fit_and_save_router

    parts = ev.parts[seed_index]
    prompts = [ev.p.samples[i].prompt for i in ev.train]
    cache = str(ev.run.eval_prompt_features)
    task = ray.remote(fit_and_save_router).options(**task_resources())
    pending = []
    for m in methods:
        folder = ev.run.eval_router(m.name, seed_index)
        if m.routed and m.name in parts and not (folder / ROUTER_JSON).exists():
            part = parts[m.name]
            pending.append(
                task.remote(
                    prompts,
                    part[ev.train],
                    _n_clusters(part, ev.train),
                    ev.cfg.router,
                    eval_router_seed(ev.cfg.run.seed, seed_index),
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


def route(ev: Evaluation, routed: dict[int, list[Method]]) -> Routes:
    """Every router on the test prompts, in one Ray task: the run's own (GradientSpace's), then
    each seed's routed methods'."""
    import ray

    folders = {Routes.key(GradientSpace.family, 0): str(ev.run.router)}
    for i, methods in routed.items():
        for m in methods:
            if m.routed and m.name in ev.parts[i]:
                folders[Routes.key(m.name, i)] = str(ev.run.eval_router(m.name, i))
    prompts = [ev.p.samples[j].prompt for j in ev.test]
    task = ray.remote(_route_task).options(**task_resources())
    probs, ms = ray.get(task.remote(folders, prompts, ev.cfg.eval.latency_samples))
    return Routes(probs, ms)


def _response_text(p: Prepared, row: int) -> str:
    """A sample's reference response as the model was trained on it (after truncation)."""
    s = p.samples[row]
    return p.tokenizer.decode([t for t in s.labels if t != -100], skip_special_tokens=True)


def _names(adapters: list[Adapter | None]) -> list[str | None]:
    return [a.name if a is not None else None for a in adapters]


def _ablation_rows(ev, ablations, ab_plans, nll, methods, routes) -> list[dict[str, Any]]:
    """The paper's Fig. 6 as rows: per K, the cosine silhouette of the training gradients'
    partition (full dimension) and the held-out loss, routed and oracle; K = 1 is one LoRA on
    everything, the run's K is the run itself (online clustering, its own experts and router)."""
    rows = []
    if REFERENCE in methods:
        first = methods[REFERENCE]["per_seed"][0]["test_loss"]
        rows.append(
            {
                "k": 1,
                "source": REFERENCE,
                "silhouette": None,
                "test_loss_routed": first,
                "test_loss_oracle": first,
            }
        )
    # The run's row is routed like the ablation's (the router alone, no fallback).
    routed = next((m for m in ("gradientspace_nofallback", "gradientspace") if m in methods), None)
    if routed and ev.has_gradients:
        oracle = methods.get("gradientspace_oracle", {}).get("per_seed", [{}])[0]
        rows.append(
            {
                "k": ev.k,
                "source": "run",
                "silhouette": ev.gradients().run_silhouette,
                "test_loss_routed": methods[routed]["per_seed"][0]["test_loss"],
                "test_loss_oracle": oracle.get("test_loss"),
            }
        )
    for ab in ablations:
        fit = ab.fit(ev)
        routed_plan, oracle_plan = ab_plans[ab.name]
        probs, _ = routes.of(ab.name, 0)
        rows.append(
            {
                "k": ab.k,
                "source": "ablation",
                "silhouette": fit["silhouette"],
                "test_loss_routed": float(nll(routed_plan).mean()),
                "test_loss_oracle": float(nll(oracle_plan).mean()),
                "router_agreement": agreement(probs.argmax(1), fit["test"]),
                "cluster_sizes": np.bincount(fit["train"], minlength=ab.k).tolist(),
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
    from gs_ray.core.ensemble import mixture_nll
    from gs_ray.ray_utils import init_ray

    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    started = time.time()
    p = prepare(cfg, run, base_model=base_model_for, read_only=True)
    ec = cfg.eval
    ev = Evaluation(p)
    k, train, test = ev.k, ev.train, ev.test
    methods = [METHODS[m] for m in ec.methods]
    ablations = [KAblation(kk) for kk in ablation_ks(cfg, k)] if ec.analyses else []
    log.info(
        "eval: %d methods, %d seed(s), K=%d, %d train / %d test samples",
        len(methods),
        ec.seeds,
        k,
        len(train),
        len(test),
    )

    # 1. Partitions, trainings and routers, seed by seed (the K ablation: first seed only).
    seeds = range(ec.seeds)
    per_seed = {i: methods + (ablations if i == 0 else []) for i in seeds}
    for i in seeds:
        parts = partition(ev, i, per_seed[i])
        if i == 0:
            write_json(run.eval_partitions, {m: v.tolist() for m, v in parts.items()})
            analysed = {m: v for m, v in parts.items() if m in METHODS}
            analyses = analyse(p, ev, analysed)
        for _wave in range(2):  # an expert waits for what it starts from (pending_jobs)
            train_baselines(p, pending_jobs(ev, i, per_seed[i]))
        fit_routers(ev, i, per_seed[i])

    # 2. Every router on the test prompts; every method's plan per seed.
    routes = route(ev, per_seed)
    plans = {i: {m.name: m.plan(ev, i, routes) for m in methods} for i in seeds}
    ab_plans = {ab.name: (ab.plan(ev, 0, routes), ab.oracle(ev)) for ab in ablations}
    merges = {key: parts for m in methods for i in seeds for key, parts in m.merges(ev, i).items()}
    used = {a for mp in plans.values() for plan in mp.values() for a in plan.adapters}
    used |= {a for pair in ab_plans.values() for plan in pair for a in plan.adapters}
    used |= {a for parts in merges.values() for a in parts}
    warmup = Adapter("warmup")
    loaded = sorted((a for a in used - set(merges) - {None, warmup}), key=lambda a: a.name)
    adapters = {warmup.name: str(warmup.path(run))}  # first: the one the latency is timed with
    adapters.update({a.name: str(a.path(run)) for a in loaded})

    # 3. Exact match: checkable test items, capped; every method answers the same items.
    checkable = [j for j, row in enumerate(test) if answer_key(_response_text(p, row))]
    gen_rows = checkable[: ec.max_generate]
    gen_prompts = [prompt_pair(p.samples[test[j]].pair)[0] for j in gen_rows]
    gen_plans = {
        (m, i): (_names(plan.adapters), plan.weights[gen_rows])
        for i, mp in plans.items()
        for m, plan in mp.items()
        if gen_rows
    }
    log.info(
        "eval: scoring %d adapters on %d test samples; %d checkable items generated per method",
        len(adapters) + len(merges),
        len(test),
        len(gen_rows),
    )
    token_nll, generated, forward_ms = score(
        p,
        adapters,
        {a.name: _names(parts) for a, parts in merges.items()},
        test,
        gen_plans,
        gen_prompts,
    )

    # 4. Each method's row: its losses (per seed), exact match, cost, latency.
    domains = [p.samples[j].domain for j in test]
    references = [_response_text(p, test[j]) for j in gen_rows]
    gen_domains = [domains[j] for j in gen_rows]

    def nll(plan: Plan) -> np.ndarray:
        names = _names(plan.adapters)
        return np.array(
            [
                mixture_nll(np.stack([token_nll[a][j] for a in names]), plan.weights[j])
                for j in range(len(test))
            ]
        )

    rows: dict[str, Any] = {}
    per_row: dict[str, np.ndarray] = {}  # method -> (seeds, test rows) losses, for the statistics
    for m in methods:
        seed_rows, losses_by_seed = [], []
        for i in seeds:
            losses = nll(plans[i][m.name])
            losses_by_seed.append(losses)
            correct = None
            if gen_rows:
                texts = [
                    p.tokenizer.decode(t, skip_special_tokens=True) for t in generated[(m.name, i)]
                ]
                correct = np.array([is_correct(r, t) for r, t in zip(references, texts)])
            seed_rows.append(
                {
                    "seed_index": i,
                    "test_loss": float(losses.mean()),
                    "exact_match": float(correct.mean()) if correct is not None else None,
                    "exact_match_by_domain": by_domain(correct, gen_domains)
                    if correct is not None
                    else {},
                }
            )
        plan0 = plans[0][m.name]
        per_row[m.name] = np.stack(losses_by_seed)
        loss_mean, loss_std = spread([s["test_loss"] for s in seed_rows])
        em_mean, em_std = spread([s["exact_match"] for s in seed_rows])
        rows[m.name] = {
            "test_loss": loss_mean,
            "test_loss_std": loss_std,
            "test_loss_by_domain": by_domain(np.mean(losses_by_seed, axis=0), domains),
            "exact_match": em_mean,
            "exact_match_std": em_std,
            "exact_match_by_domain": seed_rows[0]["exact_match_by_domain"],
            "forward_passes_per_query": plan0.forward_passes,
            "latency_ms_per_query": plan0.latency_ms(forward_ms),
            "deployable": plan0.deployable,
            "k": len(plan0.adapters) if len(plan0.adapters) > 1 else None,
            **m.cost(ev),
            "per_seed": seed_rows,
        }

    # 5. Statistics against one LoRA and the best other baseline; the routing's costs.
    for name, entry in comparisons(
        per_row, REFERENCE, [m for m in BASELINES if m in per_row], seed=cfg.run.seed
    ).items():
        rows[name].update(entry)
    gs_probs, gs_ms = routes.of(GradientSpace.family, 0)
    routing = None
    if GradientSpace.name in plans[0]:
        expert_rows = np.array(
            [
                [token_nll[a][j].mean() if len(token_nll[a][j]) else 0.0 for j in range(len(test))]
                for a in _names(ev.experts(GradientSpace.family, 0))
            ]
        )
        routing = routing_costs(expert_rows, gs_probs.argmax(1), ev.labels[test], seed=cfg.run.seed)

    # 6. The paper's analyses: routers compared, the K ablation, STS similarity.
    if ec.analyses:
        grads = ev.gradients() if ev.has_gradients else None
        analyses["routers"] = router_table(
            p, train, test, ev.labels, k, grads, (gs_probs.argmax(1), gs_ms)
        )
        analyses["k_ablation"] = _ablation_rows(ev, ablations, ab_plans, nll, rows, routes)
        analyses["sts"] = sts_similarity(p)
        _analysis_plots(run, analyses)
    verdict = None
    if "vs_reference" in rows.get(GradientSpace.name, {}):
        verdict = {
            **rows[GradientSpace.name]["vs_reference"],
            "headline": headline("GradientSpace (as deployed)", rows[GradientSpace.name]),
            "fallback": ev.fallback,
        }
    test_ids = "\n".join(p.samples[i].id for i in test)
    out = {
        "verdict": verdict,
        "routing": routing,
        "run_dir": str(run.path),
        "n_test": len(test),
        "test_ids_sha256": hashlib.sha256(test_ids.encode()).hexdigest(),
        "n_train": len(train),
        "k": k,
        "seeds": [ev.seed(i) for i in seeds],
        "budget": {
            "epochs": cfg.experts.epochs,
            "rule": "every trained method sees each training "
            "sample experts.epochs times, with the experts' optimiser settings; experts start "
            "where the run's start",
            "experts_start": cfg.expert_start,
        },
        "n_exact_match_items": len(gen_rows),
        "forward_ms": forward_ms,
        "router_ms": gs_ms,
        "config": dataclasses.asdict(ec),
        "seconds": time.time() - started,
        "methods": rows,
        "analyses": analyses,
    }
    write_json(run.eval_json, out)
    from gs_ray.evaluation.report import build_report

    log.info("eval: written %s; report: %s\n%s", run.eval_json, build_report(run.path), table(out))
    if verdict:
        log.info("eval: %s", verdict["headline"])
    return out


def analyse(p: Prepared, ev: Evaluation, parts: dict[str, np.ndarray]) -> dict[str, Any]:
    """The paper's analyses of each partition of the training samples: clusters by source
    domain (Fig. 5), top TF-IDF terms per cluster (Table 2) and, with the training samples'
    gradients (ELREA's, projected), Theorem 2's within-cluster variance against the whole set's."""
    train = ev.train
    G = ev.gradients().train if ev.has_gradients else None
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
