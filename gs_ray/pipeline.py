"""The stages of GradientSpace, top to bottom, as one table and one loop.

``run`` is the job: ``prepare`` (data, base model, splits), then each row of ``STAGES`` in order:
the warm-up on Ray Train + DeepSpeed (Stage I), K with Ray Tune if asked, Stage II on gradient
workers and a centroid actor, the routability step (clusters a prompt router confuses are
merged), the K experts and the generalist on Ray Train + DeepSpeed in parallel, the router and
its calibration with the generalist fallback (Stage III), then a held-out evaluation. Each stage reads and writes the run directory and
records itself in the manifest, so ``run(cfg, resume=RUN_DIR)`` skips what is complete and
redoes what depends on a redone stage (a row's ``invalidates``). A new stage joins by adding a
row.

``run_local`` is the single-process reference pipeline (a plain torch warm-up loop, Stage II in
this process): the oracle that the distributed Stage II must reproduce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from gs_ray import logs
from gs_ray.config import Config, StageName
from gs_ray.data import check_inputs
from gs_ray.errors import UserError
from gs_ray.evaluation.heldout import evaluate
from gs_ray.evaluation.report import build_report
from gs_ray.export import write_model_cards
from gs_ray.preflight import check_run, log_notes
from gs_ray.prepare import Prepared, prepare
from gs_ray.routing.stage import calibrate_stage, routability_stage, router_stage
from gs_ray.rundir import RunDir
from gs_ray.selection.select import (
    record_stream_selections,
    stream_selections_complete,
    stream_selectors,
)
from gs_ray.stage2.stage import stage2_local, stage2_ray
from gs_ray.training.experts import experts_complete, experts_ray
from gs_ray.training.tuning import tune_k
from gs_ray.training.warmup import warmup_local, warmup_ray

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """One row of the pipeline: what runs, when it applies, what a rerun of it invalidates."""

    name: str
    run: Callable[[Prepared, bool], Any]  # (prepared run, resume) -> anything
    invalidates: tuple[str, ...] = ()
    applies: Callable[[Config], bool] = lambda cfg: True
    complete: Callable[[Prepared], bool] | None = None  # beyond the manifest's "done"

    def done(self, p: Prepared) -> bool:
        return p.run.stage_done(self.name) and (self.complete is None or self.complete(p))


def stage2_stage(p: Prepared, resume: bool) -> None:
    """Stage II on Ray, with the selectors of ``stage2.consumers`` (if any) reading the same
    gradients on its final pass; their ranked and selected records in ``selection/<method>/``."""
    res = stage2_ray(p, resume, consumers=stream_selectors(p))
    record_stream_selections(p, res.consumers)


STAGES: tuple[Stage, ...] = (
    Stage("warmup", warmup_ray, invalidates=("tune", "stage2")),
    Stage("tune", tune_k, invalidates=("stage2",),
          applies=lambda cfg: cfg.clustering.k_selection == "tune"),
    Stage("stage2", stage2_stage,
          invalidates=("routability", "experts", "router", "calibrate", "evaluate"),
          complete=stream_selections_complete),
    Stage("routability", routability_stage,
          invalidates=("experts", "router", "calibrate", "evaluate"),
          applies=lambda cfg: cfg.clustering.routability != "off"),
    Stage("experts", experts_ray, invalidates=("calibrate", "evaluate"),
          complete=experts_complete),
    Stage("router", router_stage, invalidates=("calibrate", "evaluate")),
    Stage("calibrate", calibrate_stage, invalidates=("evaluate",),
          applies=lambda cfg: cfg.fallback.enabled),
    Stage("evaluate", evaluate),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
assert get_args(StageName) == STAGE_NAMES, "config.StageName must list pipeline.STAGES in order"

# What a stage's invalidation also removes from the run directory.
_DISCARD: dict[str, Callable[[RunDir], None]] = {"experts": RunDir.discard_experts}


def invalidate(run: RunDir, *stages: str) -> None:
    """Mark stages not done (and drop the outputs that must not be reused)."""
    run.invalidate(*stages)
    for name in stages:
        if name in _DISCARD:
            _DISCARD[name](run)


def run(cfg: Config, resume: str | None = None, checked: bool = False) -> RunDir:
    """Every stage on Ray: warm-up, (K with Tune), Stage II, experts, router, evaluation.

    Connects to the cluster (inside ``ray job submit`` or with RAY_ADDRESS / run.ray_address),
    or starts a local Ray. With ``resume``, stages whose outputs are complete are skipped.
    ``checked``: the caller has run ``check_before_ray``'s checks on this config already (the
    CLI does, and logs the notes)."""
    from gs_ray.ray_utils import init_ray

    log_notes([] if checked else check_before_ray(cfg, resume))  # before Ray starts
    log.info("Ray: %s", init_ray(cfg.run.ray_address, cfg.run.num_cpus))
    p = prepare(cfg, RunDir.open(resume) if resume else None)
    try:
        return _run_stages(p, cfg, resume is not None)
    finally:
        p.run.release_lock()


def check_before_ray(cfg: Config, resume: str | None = None, on_ray: bool = True) -> list[str]:
    """Everything a run checks before Ray starts or a run directory exists: config and data
    (``check_inputs``, no torch), then the model, the machine and the files the config names
    (``preflight.check_run``). Raises a UserError naming the key; returns the pre-flight's
    notes on what it could not check."""
    check_inputs(cfg)
    return check_run(cfg, resume, on_ray=on_ray)


def _run_stages(p: Prepared, cfg: Config, resume: bool) -> RunDir:
    from gs_ray.evaluation import plots

    logs.attach_run(p.run.path)
    todo = [s for s in STAGES if s.applies(cfg)]
    for i, stage in enumerate(todo, start=1):
        if stage.done(p):
            log.info("[%d/%d] %s: done before, kept", i, len(todo), stage.name)
        else:
            log.info("[%d/%d] %s ...", i, len(todo), stage.name)
            stage.run(p, resume)
            invalidate(p.run, *stage.invalidates)
            seconds = p.run.manifest()["stages"][stage.name]["seconds"]
            log.info("[%d/%d] %s: done in %.1f s", i, len(todo), stage.name, seconds)
        if cfg.run.until == stage.name:
            return p.run
    plots.pipeline_plots(p.run, p.assignments()[1])
    try:
        cards = write_model_cards(p.run.path, {s.id: s.prompt for s in p.samples})
        log.info("model cards: %d adapters (README.md in each; gs-ray export RUN OUT bundles "
                 "them)", len(cards))  # fmt: skip
    except UserError as e:  # a run without a router or experts (stages left out): no cards
        log.warning("no model cards: %s", e)
    log.info("done: %s; report: %s", p.run.path, build_report(p.run.path))
    return p.run


def run_local(cfg: Config, resume: str | None = None, checked: bool = False) -> RunDir:
    """The single-process reference pipeline: prepare, warm-up, Stage II (finished stages of a
    resumed run are skipped). ``checked`` as for ``run``."""
    log_notes([] if checked else check_before_ray(cfg, resume, on_ray=False))
    p = prepare(cfg, RunDir.open(resume) if resume else None)
    try:
        logs.attach_run(p.run.path)
        if not p.run.stage_done("warmup"):
            warmup_local(p)
        if not (p.run.stage_done("stage2") and stream_selections_complete(p)):
            res = stage2_local(p, consumers=stream_selectors(p))
            record_stream_selections(p, res.consumers)
        return p.run
    finally:
        p.run.release_lock()
