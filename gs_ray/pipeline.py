"""The three stages of GradientSpace, top to bottom.

``prepare`` (data, base model, splits) is shared by every executor. ``run_local`` is the
single-process reference pipeline: a plain torch warm-up loop and Stage II in this process. It is
the oracle that the distributed pipeline must reproduce.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gs_ray.clustering import GradientSpaceClustering, within_cluster_variance
from gs_ray.config import Config
from gs_ray.data import Sample, Splits, load_samples, make_splits
from gs_ray.gradients import LoRAGradientEngine
from gs_ray.models import (
    add_lora,
    load_adapter,
    load_base_model,
    load_tokenizer,
    materialize_base_model,
    model_card,
)
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
    torch.manual_seed(cfg.run.seed)  # LoRA dropout draws from the global generator
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


def gradient_layout(p: Prepared) -> dict:
    """The gradient layout (parameter names, shapes, offsets) of the warm-up adapter."""
    model = load_adapter(load_base_model(p.base_path, p.cfg.model), p.run.warmup_adapter)
    engine = LoRAGradientEngine(model)
    k = p.cfg.gradients.projection_dim
    return {
        "param_names": engine.param_names,
        "shapes": [list(s) for s in engine.shapes],
        "offsets": engine.offsets.tolist(),
        "dim": engine.dim,
        "projection_dim": k,
    }


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
                       gradient_layout(p), info)  # fmt: skip
    write_stage2_outputs(p, res, time.perf_counter() - start)
    return res


def run(cfg: Config, resume: str | None = None) -> RunDir:
    """The distributed pipeline on Ray (connects to the cluster, or starts a local Ray)."""
    from gs_ray.ray_utils import init_ray

    log.info("Ray: %s", init_ray(cfg.run.ray_address, cfg.run.num_cpus))
    p = prepare(cfg, RunDir(resume) if resume else None)
    if not p.run.stage_done("warmup"):
        warmup_local(p)
    if not p.run.stage_done("stage2"):
        stage2_ray(p, resume=resume is not None)
    return p.run


def run_local(cfg: Config, resume: str | None = None) -> RunDir:
    """The single-process reference pipeline: prepare, warm-up, Stage II (finished stages of a
    resumed run are skipped)."""
    p = prepare(cfg, RunDir(resume) if resume else None)
    if not p.run.stage_done("warmup"):
        warmup_local(p)
    if not p.run.stage_done("stage2"):
        stage2_local(p)
    return p.run
