"""The three stages of GradientSpace, top to bottom.

``run`` is the job: ``prepare`` (data, base model, splits), the warm-up on Ray Train + DeepSpeed
(Stage I), K with Ray Tune if asked, Stage II on gradient workers and a centroid actor, the K
experts on Ray Train + DeepSpeed in parallel and the router (Stage III), then a held-out
evaluation. Each stage reads and writes the run directory and records itself in the manifest,
so ``run(cfg, resume=RUN_DIR)`` skips what is complete and redoes what depends on a redone stage.

``run_local`` is the single-process reference pipeline (a plain torch warm-up loop, Stage II in
this process): the oracle that the distributed Stage II must reproduce.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gs_ray.clustering import GradientSpaceClustering, within_cluster_variance
from gs_ray.config import Config
from gs_ray.data import Sample, Splits, check_inputs, load_samples, make_splits
from gs_ray.models import (
    add_lora,
    load_base_model,
    load_tokenizer,
    materialize_base_model,
    model_card,
)
from gs_ray.ray_utils import task_resources
from gs_ray.rundir import RunDir, write_json
from gs_ray.stage2 import (
    CentroidHost,
    GradientComputer,
    Stage2Plan,
    make_clusterer,
    run_stage2_local,
    run_stage2_ray,
)
from gs_ray.training import TorchEngine, mean_loss, train_adapter

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Everything the stages share: the run directory, base model path, tokenizer, data."""

    run: RunDir
    cfg: Config
    base_path: str
    tokenizer: object
    samples: list[Sample]
    splits: Splits

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.samples])

    def subset(self, idx: np.ndarray) -> list[Sample]:
        return [self.samples[i] for i in idx]


def prepare(cfg: Config, run: RunDir | None = None) -> Prepared:
    """Create (or reopen) the run directory, materialise the base model, load and split data."""
    start = time.perf_counter()
    run = run or RunDir.create(cfg)
    seed = cfg.run.seed
    base_path = materialize_base_model(cfg.model, run.path, seed)
    tokenizer = load_tokenizer(base_path)
    samples, report = load_samples(cfg.data, tokenizer, seed)
    splits = make_splits(len(samples), cfg.data, seed)
    split_of = np.empty(len(samples), dtype=object)
    for name in ("warmup", "val", "rest", "test"):
        split_of[getattr(splits, name)] = name
    rows = (
        {"id": s.id, "split": split_of[i], "domain": s.domain, "n_tokens": len(s)}
        for i, s in enumerate(samples)
    )
    run.write_jsonl(run.sub("data", "samples.jsonl"), rows)
    run.update_manifest(
        data={**report.to_dict(), "splits": splits.counts()},
        base_model=model_card(base_path),
    )
    log.info("run directory %s; data: %s; splits %s", run.path, report.summary(), splits.counts())
    run.mark_stage("prepare", time.perf_counter() - start)
    return Prepared(run, cfg, base_path, tokenizer, samples, splits)


# --------------------------------------------------------------------------- Stage I (reference)


def warmup_local(p: Prepared) -> Path:
    """Stage I in this process: a plain AdamW loop on the warm-up split; the adapter in peft format."""
    start = time.perf_counter()
    cfg = p.cfg
    model = add_lora(load_base_model(p.base_path, cfg.model), cfg.lora, cfg.run.seed)
    warm = p.subset(p.splits.warmup)
    before = mean_loss(model, warm, p.pad_id)
    losses = train_adapter(TorchEngine(model, cfg.warmup), warm, cfg.warmup, p.pad_id, cfg.run.seed)
    after = mean_loss(model, warm, p.pad_id)
    model.save_pretrained(str(p.run.warmup_adapter))
    write_json(p.run.sub("warmup", "losses.json"), {"train_loss": losses})
    p.run.add_metrics(warmup={"loss_before": before, "loss_after": after, "steps": len(losses)})
    log.info("warm-up: %d steps, loss %.3f -> %.3f", len(losses), before, after)
    p.run.mark_stage("warmup", time.perf_counter() - start, engine="torch")
    return p.run.warmup_adapter


# --------------------------------------------------------------------------- Stage II outputs


@dataclass
class Stage2Result:
    """What Stage II leaves behind, whichever executor ran it."""

    clusterer: GradientSpaceClustering
    labels: np.ndarray
    val_grads: np.ndarray
    layout: dict
    info: dict


def write_stage2_outputs(p: Prepared, res: Stage2Result, seconds: float) -> None:
    """K table, centroids, layout and assignments into the run directory; metrics and plots."""
    run, c = p.run, res.clusterer
    write_json(
        run.sub("stage2", "k_selection.json"),
        {
            "table": c.k_selection_,
            "chosen": {
                "k": c.n_clusters_,
                "threshold": c.threshold_,
                "n_components": c.n_components_,
                "silhouette": c.silhouette_,
            },
            "explained_variance_ratio": c.explained_variance_ratio_,
            "singular_values": c.singular_values_,
        },
    )
    np.save(run.sub("stage2", "centroids.npy"), c.cluster_centers_)
    write_json(run.sub("stage2", "param_names.json"), res.layout)
    split_of = {int(i): name for name in ("train", "test") for i in getattr(p.splits, name)}
    rows = [
        {"id": s.id, "split": split_of[i], "cluster": int(res.labels[i]), "domain": s.domain}
        for i, s in enumerate(p.samples)
    ]
    if any(r["cluster"] < 0 for r in rows):
        raise RuntimeError("Stage II finished with unassigned samples")
    run.write_jsonl(run.assignments_path, rows)
    train_labels = res.labels[p.splits.train]
    run.add_metrics(
        stage2={
            "k": c.n_clusters_,
            "silhouette": c.silhouette_,
            "threshold": c.threshold_,
            "n_components": c.n_components_,
            "epochs": c.epoch_,
            "converged": c.converged_,
            "centroid_shift": c.shift_history_,
            "cluster_sizes_train": np.bincount(train_labels, minlength=c.n_clusters_).tolist(),
            "n_zero_gradients": c.n_zero_gradients_,
            "gradient_dim": res.layout["projection_dim"] or res.layout["dim"],
            "val_variance": within_cluster_variance(res.val_grads, c.predict(res.val_grads)),
            **res.info,
        }
    )
    from gs_ray import plots

    plots.stage2_plots(run)
    run.mark_stage(
        "stage2",
        seconds,
        k=c.n_clusters_,
        **{k: v for k, v in res.info.items() if k in ("executor", "workers", "resumed_from")},
    )


def stage2_local(p: Prepared) -> Stage2Result:
    """Stage II in this process (reference): gradients, K selection, online epochs, final pass."""
    start = time.perf_counter()
    cfg = p.cfg
    if cfg.stage2.transport != "gradients":
        raise ValueError("the local reference pipeline implements the exact transport only")
    computer = GradientComputer(p.base_path, cfg, p.run.warmup_adapter, p.pad_id)
    host = CentroidHost(make_clusterer(cfg), len(p.samples))
    plan = Stage2Plan.build(p.lengths, p.splits, cfg)
    run_stage2_local(plan, p.samples, computer, host)
    res = Stage2Result(host.clusterer, host.labels, np.concatenate(host.val_grads),
                       computer.layout(), {"executor": "local"})  # fmt: skip
    write_stage2_outputs(p, res, time.perf_counter() - start)
    return res


def stage2_ray(p: Prepared, resume: bool = False) -> Stage2Result:
    """Stage II on Ray: gradient workers and the centroid actor (see gs_ray.stage2)."""
    start = time.perf_counter()
    cfg = p.cfg
    plan = Stage2Plan.build(p.lengths, p.splits, cfg)
    out, timing = run_stage2_ray(
        plan, p.samples, cfg, p.base_path, str(p.run.warmup_adapter), p.pad_id,
        p.run.checkpoint_dir, resume=resume,
    )  # fmt: skip
    info = {"executor": "ray", "workers": timing.workers, "transport": timing.transport,
            "passes": timing.passes, "worker_busy_seconds": out["worker_busy_seconds"],
            "resumed_from": timing.resumed_from}  # fmt: skip
    res = Stage2Result(out["clusterer"], out["labels"], np.concatenate(out["val_grads"]),
                       out["layout"], info)  # fmt: skip
    write_stage2_outputs(p, res, time.perf_counter() - start)
    return res


# --------------------------------------------------------------------------- Stage I on Ray


def storage_path(p: Prepared) -> str:
    """Ray Train's storage for this run (absolute: every node must reach it)."""
    return str((p.run.path / "ray_train").resolve())


def warmup_ray(p: Prepared, resume: bool = False) -> Path:
    """Stage I: the LoRA warm-up as a Ray Train + DeepSpeed run on the warm-up split."""
    from gs_ray.training import AdapterJob, train_on_ray

    start = time.perf_counter()
    cfg = p.cfg
    job = AdapterJob(
        name="warmup",
        base_path=p.base_path,
        output_dir=str(p.run.warmup_adapter),
        samples=[s.pair for s in p.subset(p.splits.warmup)],
        seed=cfg.run.seed,
    )
    rec = train_on_ray(job, cfg.model, cfg.lora, cfg.warmup, p.pad_id, storage_path(p), resume)
    write_json(p.run.sub("warmup", "losses.json"), {"train_loss": rec["losses"]})
    p.run.add_metrics(warmup=_training_summary(rec))
    p.run.mark_stage("warmup", time.perf_counter() - start, engine=rec["engine"],
                     zero_stage=rec["zero_stage"], world_size=rec["world_size"])  # fmt: skip
    log.info("warm-up: %s ZeRO-%d, %d steps, loss %.3f -> %.3f", rec["engine"], rec["zero_stage"],
             rec["steps"], rec["losses"][0], rec["losses"][-1])  # fmt: skip
    return p.run.warmup_adapter


def _training_summary(rec: dict) -> dict:
    """The parts of a training record worth keeping in metrics.json."""
    keys = ("engine", "zero_stage", "world_size", "device", "steps", "epochs_done", "attempts",
            "deepspeed_init_s", "seconds", "resumed_from_epoch")  # fmt: skip
    out = {k: rec.get(k) for k in keys}
    losses = rec.get("losses") or []
    out.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    return out


# --------------------------------------------------------------------------- Stage III: experts


def expert_complete(path: Path) -> bool:
    """An expert folder that a resume may keep: the peft files and gs-ray's record."""
    return all((path / f).exists() for f in ("adapter_config.json", "expert.json")) and any(
        path.glob("adapter_model.*")
    )


def expert_job(p: Prepared, labels: np.ndarray, c: int, output_dir: str, name: str = ""):
    """The training job of expert c: cluster c's training samples, starting from the warm-up
    adapter, seeded by the cluster (``name`` defaults to ``expert_<c>``)."""
    from gs_ray.training import AdapterJob

    train = p.splits.train
    return AdapterJob(
        name=name or f"expert_{c}", base_path=p.base_path, output_dir=output_dir,
        samples=[p.samples[i].pair for i in train[labels[train] == c]],
        init_adapter=str(p.run.warmup_adapter), seed=p.cfg.run.seed + 1 + c,
    )  # fmt: skip


def experts_ray(p: Prepared, labels: np.ndarray, k: int, resume: bool = False) -> dict:
    """Stage III: one LoRA expert per cluster, from the warm-up adapter, on that cluster's
    training samples, the K trainings in parallel (Ray Train + DeepSpeed). Experts whose folder
    is complete are kept; a cluster with no training sample gets a copy of the warm-up adapter."""
    import shutil

    from gs_ray.training import discard_run, finished_run, train_many_on_ray

    start = time.perf_counter()
    cfg, run = p.cfg, p.run
    jobs, kept, copied = [], [], []
    for c in range(k):
        folder = run.expert(c)
        if expert_complete(folder):
            kept.append(c)
            continue
        job = expert_job(p, labels, c, str(folder))
        if not job.samples:
            shutil.rmtree(folder, ignore_errors=True)
            shutil.copytree(run.warmup_adapter, folder)
            write_json(folder / "expert.json", {"cluster": c, "n_train": 0, "copied_warmup": True})
            copied.append(c)
            continue
        jobs.append(job)
    for job in jobs:
        # A resume continues an interrupted training from its checkpoint; an expert whose run
        # had finished but whose folder is gone (deleted) is trained again from the warm-up.
        if not resume or finished_run(storage_path(p), job.name, cfg.experts):
            discard_run(storage_path(p), job.name)
    records = {}
    if jobs:
        log.info("training %d experts (%s), %s", len(jobs), ", ".join(j.name for j in jobs),
                 "in parallel" if cfg.experts.parallel else "one after another")  # fmt: skip
        records = train_many_on_ray(jobs, cfg.model, cfg.lora, cfg.experts, p.pad_id,
                                    storage_path(p), parallel=cfg.experts.parallel,
                                    resume=resume)  # fmt: skip
    failed = [n for n, r in records.items() if not r.get("ok")]
    if failed:
        errors = "; ".join(f"{n}: {records[n].get('error')}" for n in failed)
        raise RuntimeError(f"expert training failed after retries: {errors}")
    for job in jobs:
        rec = records[job.name]
        c = int(job.name.split("_")[1])
        write_json(run.expert(c) / "expert.json",
                   {"cluster": c, "n_train": len(job.samples), **_training_summary(rec),
                    "losses": rec["losses"], "train_start": rec.get("train_start"),
                    "train_end": rec.get("train_end")})  # fmt: skip
    trained = sorted(int(j.name.split("_")[1]) for j in jobs)
    engines = sorted({records[j.name]["engine"] for j in jobs})
    run.mark_stage("experts", time.perf_counter() - start, trained=trained, kept=kept,
                   copied_warmup=copied, engines=engines, parallel=cfg.experts.parallel)  # fmt: skip
    return records


# --------------------------------------------------------------------------- router


def _fit_router_task(texts, labels, k, cfg, seed, cache_path, folder) -> dict:
    from gs_ray.router import fit_router

    router, metrics = fit_router(texts, labels, k, cfg, seed, cache_path=cache_path)
    router.save(folder)
    return metrics


def router_stage(p: Prepared, labels: np.ndarray, k: int) -> dict:
    """Train the router (frozen encoder + linear head) on the training prompts' clusters, in a
    Ray task (on a GPU where there is one), and save it in the run directory."""
    import ray

    start = time.perf_counter()
    train = p.splits.train
    texts = [p.samples[i].prompt for i in train]
    task = ray.remote(_fit_router_task).options(**task_resources())
    metrics = ray.get(task.remote(texts, labels[train], k, p.cfg.router, p.cfg.run.seed,
                                  str(p.run.sub("router", "features_train.npy")),
                                  str(p.run.router)))  # fmt: skip
    p.run.add_metrics(router=metrics)
    p.run.mark_stage("router", time.perf_counter() - start,
                     holdout_accuracy=metrics.get("holdout_accuracy"))  # fmt: skip
    log.info("router: holdout accuracy %.3f (chance %.3f)", metrics.get("holdout_accuracy") or 0,
             metrics.get("chance_accuracy") or 0)  # fmt: skip
    return metrics


# --------------------------------------------------------------------------- evaluation


def _evaluate_task(base_path, model_cfg, adapters, pairs, pad_id, router_folder, prompts):
    from gs_ray.router import Router
    from gs_ray.training import adapter_losses

    losses = adapter_losses(base_path, model_cfg, adapters, pairs, pad_id)
    router = Router.load(router_folder)
    return losses, router.predict(prompts), router.route_latency_ms(prompts[:20])


def evaluate(p: Prepared, labels: np.ndarray, k: int) -> dict:
    """Held-out (test split) losses: every expert and the warm-up adapter on every cluster's
    test samples; routed by the router and by the gradient assignment (oracle)."""
    import ray

    start = time.perf_counter()
    test = p.splits.test
    adapters = {"warmup": str(p.run.warmup_adapter)}
    adapters.update({f"expert_{c}": str(p.run.expert(c)) for c in range(k)})
    task = ray.remote(_evaluate_task).options(**task_resources())
    per_sample, routed, latency = ray.get(task.remote(
        p.base_path, p.cfg.model, adapters, [p.samples[i].pair for i in test], p.pad_id,
        str(p.run.router), [p.samples[i].prompt for i in test],
    ))  # fmt: skip
    oracle = labels[test]
    rows = np.arange(len(test))
    experts = np.stack([per_sample[f"expert_{c}"] for c in range(k)])  # (k, n_test)
    warm = per_sample["warmup"]

    def mean(values, mask):
        return float(values[mask].mean()) if mask.any() else None

    matrix = [[mean(experts[e], oracle == c) for c in range(k)] for e in range(k)]
    out = {
        "n_test": len(test),
        "test_loss_warmup": float(warm.mean()),
        "test_loss_routed": float(experts[routed, rows].mean()),
        "test_loss_oracle": float(experts[oracle, rows].mean()),
        "router_test_accuracy": float((routed == oracle).mean()),
        "expert_vs_cluster_loss": matrix,
        "own_cluster": [
            {
                "cluster": c,
                "n": int((oracle == c).sum()),
                "expert": matrix[c][c],
                "warmup": mean(warm, oracle == c),
            }
            for c in range(k)
        ],  # fmt: skip
        "router_latency_ms": latency,
    }
    p.run.add_metrics(evaluation=out)
    p.run.mark_stage("evaluate", time.perf_counter() - start)
    log.info("held-out loss: warm-up %.4f, routed experts %.4f (oracle routing %.4f); "
             "router agrees with the gradient clusters on %.1f%% of test prompts",
             out["test_loss_warmup"], out["test_loss_routed"], out["test_loss_oracle"],
             100 * out["router_test_accuracy"])  # fmt: skip
    return out


# --------------------------------------------------------------------------- the whole job


def _assignments(p: Prepared) -> tuple[np.ndarray, int]:
    rows = p.run.assignments()
    labels = np.array([r["cluster"] for r in rows], dtype=np.int64)
    ids = [r["id"] for r in rows]
    if ids != [s.id for s in p.samples]:
        raise RuntimeError(f"{p.run.assignments_path} does not match the data: re-run stage 2")
    return labels, int(json.loads((p.run.stage2 / "k_selection.json").read_text())["chosen"]["k"])


STAGES = ("warmup", "stage2", "experts", "router", "evaluate")


def _invalidate(run: RunDir, *stages: str) -> None:
    m = run.manifest()
    for stage in stages:
        m.get("stages", {}).pop(stage, None)
    write_json(run.manifest_path, m)


def run(cfg: Config, resume: str | None = None) -> RunDir:
    """Every stage on Ray: warm-up, (K with Tune), Stage II, experts, router, evaluation.

    Connects to the cluster (inside ``ray job submit`` or with RAY_ADDRESS / run.ray_address),
    or starts a local Ray. With ``resume``, stages whose outputs are complete are skipped."""
    import shutil

    from gs_ray import plots
    from gs_ray.ray_utils import init_ray

    check_inputs(cfg)  # config and data, before Ray starts or a run directory exists
    stop = cfg.run.until
    if stop not in (None, *STAGES):
        raise ValueError(f"run.until: expected one of {STAGES}, got {stop!r}")
    log.info("Ray: %s", init_ray(cfg.run.ray_address, cfg.run.num_cpus))
    p = prepare(cfg, RunDir(resume) if resume else None)
    resuming = resume is not None
    if not p.run.stage_done("warmup"):
        warmup_ray(p, resume=resuming)
        _invalidate(p.run, "tune", "stage2")
    if stop == "warmup":
        return p.run
    if cfg.clustering.k_selection == "tune" and not p.run.stage_done("tune"):
        from gs_ray.tuning import tune_k

        tune_k(p)
        _invalidate(p.run, "stage2")
    if cfg.clustering.k_selection == "tune":
        p.cfg.clustering.n_clusters = p.run.manifest()["stages"]["tune"]["best_k"]
    if not p.run.stage_done("stage2"):
        stage2_ray(p, resume=resuming)
        shutil.rmtree(p.run.path / "experts", ignore_errors=True)
        _invalidate(p.run, "experts", "router", "evaluate")
    labels, k = _assignments(p)
    if stop == "stage2":
        return p.run
    if not p.run.stage_done("experts") or not all(
        expert_complete(p.run.expert(c)) for c in range(k)
    ):
        experts_ray(p, labels, k, resume=resuming)
        _invalidate(p.run, "evaluate")
    if stop == "experts":
        return p.run
    if not p.run.stage_done("router"):
        router_stage(p, labels, k)
        _invalidate(p.run, "evaluate")
    if stop == "router":
        return p.run
    if not p.run.stage_done("evaluate"):
        evaluate(p, labels, k)
    plots.pipeline_plots(p.run, k)
    log.info("done: %s", p.run.path)
    return p.run


def run_local(cfg: Config, resume: str | None = None) -> RunDir:
    """The single-process reference pipeline: prepare, warm-up, Stage II (finished stages of a
    resumed run are skipped)."""
    check_inputs(cfg)  # config and data, before a run directory exists
    p = prepare(cfg, RunDir(resume) if resume else None)
    if not p.run.stage_done("warmup"):
        warmup_local(p)
    if not p.run.stage_done("stage2"):
        stage2_local(p)
    return p.run
