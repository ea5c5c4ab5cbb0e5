"""Stage III, the experts: one LoRA expert per cluster, on that cluster's training samples; the
K trainings run in parallel (Ray Train + DeepSpeed). With ``fallback.enabled`` the run also
trains the generalist (one LoRA on all the training rows, from the warm-up adapter: the budget of
``gs-ray eval``'s ``single_lora``). Where the experts start is ``Config.expert_start``: by
default the generalist, which then trains first, alone; with ``experts.init: warmup`` (or no
fallback) the warm-up adapter, as in the paper, and the generalist trains beside them."""

from __future__ import annotations

import logging
import shutil

import numpy as np

from gs_ray.core.seeds import expert_seed
from gs_ray.prepare import Prepared
from gs_ray.rundir import GENERALIST, expert_name
from gs_ray.training.warmup import storage_path, training_summary

log = logging.getLogger(__name__)


def expert_init(p: Prepared) -> str:
    """The adapter every expert of the run starts from (``Config.expert_start``)."""
    if p.cfg.expert_start == "generalist":
        return str(p.run.generalist)
    return str(p.run.warmup_adapter)


def expert_job(p: Prepared, labels: np.ndarray, c: int, output_dir: str, name: str = ""):
    """The training job of expert c: cluster c's training samples, starting from
    ``expert_init``, seeded by the cluster (``name`` defaults to the expert's name)."""
    from gs_ray.training.ray_train import AdapterJob

    train = p.fit_rows()
    return AdapterJob(
        name=name or expert_name(c),
        base_path=p.base_path,
        output_dir=output_dir,
        samples=p.pairs(train[labels[train] == c]),
        init_adapter=expert_init(p),
        seed=expert_seed(p.cfg.run.seed, c),
        cluster=c,
    )


def generalist_job(p: Prepared, labels: np.ndarray, k: int, output_dir: str):
    """The generalist's training job: every training row that the experts learn from (any
    cluster), from the warm-up adapter, with the experts' settings; with ``experts.max_steps``
    it gets the K experts' steps together (as ``gs-ray eval``'s ``single_lora``)."""
    from gs_ray.training.ray_train import AdapterJob

    rows = p.fit_rows()
    limit = p.cfg.experts.max_steps
    return AdapterJob(
        name=GENERALIST,
        base_path=p.base_path,
        output_dir=output_dir,
        samples=p.pairs(rows[labels[rows] >= 0]),
        init_adapter=str(p.run.warmup_adapter),
        seed=p.cfg.run.seed,
        max_steps=limit * k if limit else None,
    )


def _train(p: Prepared, jobs: list, resume: bool, alone: bool = False) -> dict:
    """Train ``jobs`` on Ray Train with the experts' settings; raises when one failed after
    its retries. ``alone``: one run that the others wait for, which may take every CPU slot
    (``ray_train.alone_on_the_cluster``)."""
    from gs_ray.training.ray_train import alone_on_the_cluster, train_many_on_ray

    cfg = p.cfg
    if not jobs:
        return {}
    settings = alone_on_the_cluster(cfg.experts) if alone else cfg.experts
    log.info(
        "training %d adapters (%s), %s",
        len(jobs),
        ", ".join(j.name for j in jobs),
        "in parallel" if cfg.experts.parallel else "one after another",
    )
    records = train_many_on_ray(
        jobs,
        cfg.model,
        cfg.lora,
        settings,
        p.pad_id,
        storage_path(p),
        parallel=cfg.experts.parallel,
        resume=resume,
    )
    failed = [n for n, r in records.items() if not r.get("ok")]
    if failed:
        errors = "; ".join(f"{n}: {records[n].get('error')}" for n in failed)
        raise RuntimeError(f"expert training failed after retries: {errors}")
    return records


def experts_ray(p: Prepared, resume: bool = False) -> dict:
    """Train the experts that are missing. Experts whose folder is complete are kept; a cluster
    with no training sample gets a copy of the adapter the experts start from. Where that is
    the generalist (``Config.expert_start``), the generalist trains first, then the experts."""
    cfg, run = p.cfg, p.run
    labels, k = p.assignments()
    from_generalist = cfg.expert_start == "generalist"
    with run.stage("experts") as info:
        # A resume continues an interrupted training from its checkpoint; an adapter whose run
        # had finished but whose folder is gone (deleted) is trained again from the start.
        generalist = []
        if cfg.fallback.enabled and run.generalist_complete():
            run.check_adapter(run.generalist)
        elif cfg.fallback.enabled:
            generalist.append(generalist_job(p, labels, k, str(run.generalist)))
        # experts from the generalist (Config.expert_start): it trains first, alone
        records = _train(p, generalist, resume, alone=True) if from_generalist else {}
        jobs, kept, copied = [], [], []
        for c in range(k):
            if run.expert_complete(c):
                run.check_adapter(run.expert(c))  # the files it was trained into, or refuse
                kept.append(c)
                continue
            job = expert_job(p, labels, c, str(run.expert(c)))
            if not job.samples:
                shutil.rmtree(run.expert(c), ignore_errors=True)
                shutil.copytree(job.init_adapter, run.expert(c))
                run.write_expert_record(c, {"n_train": 0, "copied_init": cfg.expert_start})
                copied.append(c)
                continue
            jobs.append(job)
        records.update(_train(p, jobs if from_generalist else jobs + generalist, resume))
        jobs += generalist
        for job in jobs:
            rec = records[job.name]
            record = {
                "n_train": len(job.samples),
                "init": job.init_adapter,  # the adapter it started from
                **training_summary(rec),
                "losses": rec["losses"],
                "train_start": rec.get("train_start"),
                "train_end": rec.get("train_end"),
            }
            if job.name == GENERALIST:
                run.write_adapter_record(run.generalist, {"generalist": True, **record})
            else:
                run.write_expert_record(job.cluster, record)
        info.update(
            trained=sorted(j.cluster for j in jobs if j.name != GENERALIST),
            generalist=any(j.name == GENERALIST for j in jobs),
            kept=kept,
            copied_init=copied,
            init=cfg.expert_start,
            engines=sorted({records[j.name]["engine"] for j in jobs}),
            parallel=cfg.experts.parallel,
        )
    return records


def experts_complete(p: Prepared) -> bool:
    """Every cluster's expert folder is complete (and the generalist's, where there is one);
    RunDirError if one of them is not what was trained there (``RunDir.check_adapter``)."""
    _, k = p.assignments()
    folders = [p.run.expert(c) for c in range(k) if p.run.expert_complete(c)]
    if len(folders) < k:
        return False
    if p.cfg.fallback.enabled:
        if not p.run.generalist_complete():
            return False
        folders.append(p.run.generalist)
    for folder in folders:  # kept as they are only if they are what was trained there
        p.run.check_adapter(folder)
    return True
