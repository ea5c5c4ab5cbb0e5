"""The stages of GradientSpace, top to bottom, as one table and one loop.

``run`` is the job: ``prepare`` (data, base model, splits), then each row of ``STAGES`` in order:
the warm-up on Ray Train + DeepSpeed (Stage I), K with Ray Tune if asked, Stage II on gradient
workers and a centroid actor, the routability step (clusters a prompt router confuses are
merged), the K experts and the generalist on Ray Train + DeepSpeed in parallel, the router and
its calibration with the generalist fallback (Stage III), then a held-out evaluation. Each stage
reads and writes the run directory and records itself in the manifest, so ``run(cfg,
resume=RUN_DIR)`` skips what is complete and redoes what depends on a redone stage (a row's
``invalidates``). A new stage joins by adding a row (and the config keys it reads to
``READS``).

A resume compares its config with the run's (``plan_resume``): a changed key invalidates the
stages that read it (``READS``) and every stage after them; where one of those is finished, the
resume is refused with the keys named, unless ``redo`` names it. Each resume is recorded in the
manifest (``RunDir.record_resume``).

``run_local`` is the single-process reference pipeline (a plain torch warm-up loop, Stage II in
this process): the oracle that the distributed Stage II must reproduce.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, get_args

from gs_ray import logs, tracking
from gs_ray.config import Config, StageName
from gs_ray.data import check_inputs
from gs_ray.errors import RunDirError, UserError
from gs_ray.evaluation.heldout import evaluate
from gs_ray.evaluation.report import build_report
from gs_ray.export import write_model_cards
from gs_ray.preflight import check_run, log_notes
from gs_ray.prepare import Prepared, prepare
from gs_ray.routing.stage import calibrate_stage, routability_stage, router_stage
from gs_ray.rundir import EXPERT_PREFIX, GENERALIST, WARMUP, RunDir, config_hash, stored_config
from gs_ray.selection.select import (
    record_stream_selections,
    stream_selections_complete,
    stream_selectors,
)
from gs_ray.stage2.stage import stage2_local, stage2_ray
from gs_ray.training.experts import experts_complete, experts_ray
from gs_ray.training.pretrain import base_model_for
from gs_ray.training.tuning import tune_k
from gs_ray.training.warmup import warmup_complete, warmup_local, warmup_ray

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
    from gs_ray.evaluation import plots

    res = stage2_ray(p, resume, consumers=stream_selectors(p))
    record_stream_selections(p, res.consumers)
    plots.stage2_plots(p.run)


STAGES: tuple[Stage, ...] = (
    Stage("warmup", warmup_ray, invalidates=("tune", "stage2"), complete=warmup_complete),
    Stage(
        "tune",
        tune_k,
        invalidates=("stage2",),
        applies=lambda cfg: cfg.clustering.k_selection == "tune",
    ),
    Stage(
        "stage2",
        stage2_stage,
        invalidates=("routability", "experts", "router", "calibrate", "evaluate"),
        complete=stream_selections_complete,
    ),
    Stage(
        "routability",
        routability_stage,
        invalidates=("experts", "router", "calibrate", "evaluate"),
        applies=lambda cfg: cfg.clustering.routability != "off",
    ),
    Stage("experts", experts_ray, invalidates=("calibrate", "evaluate"), complete=experts_complete),
    Stage("router", router_stage, invalidates=("calibrate", "evaluate")),
    Stage(
        "calibrate",
        calibrate_stage,
        invalidates=("evaluate",),
        applies=lambda cfg: cfg.fallback.enabled,
    ),
    Stage("evaluate", evaluate),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
assert get_args(StageName) == STAGE_NAMES, "config.StageName must list pipeline.STAGES in order"

_BY_NAME = {s.name: s for s in STAGES}

# Which stages read each config key (the longest matching key decides): on a resume, a changed
# key invalidates these stages and every stage after them. () marks keys that change how a
# stage runs, not what it makes (machines, parallelism, logging, where things go), and the
# sections of the other commands (gs-ray eval, serve, spectra, select --method gsnr).
_HOW_TO_TRAIN = ("cpus_per_worker", "use_gpu", "worker_resource", "log_every", "max_failures")
_HOW_STAGE2 = (
    "num_workers",
    "cpus_per_worker",
    "max_in_flight",
    "checkpoint_every",
    "checkpoint_max_share",
    "worker_resource",
    "prefer_node_label",
)
_ROUTABILITY = ("routability", "routability_target", "routability_folds")
READS: dict[str, tuple[str, ...]] = {
    "data": ("warmup",),
    "model": ("warmup",),
    "lora": ("warmup",),
    "run.seed": ("warmup",),
    "warmup": ("warmup",),
    "tune": ("tune",),
    "gradients": ("tune", "stage2"),
    "clustering": ("tune", "stage2"),
    **{f"clustering.{k}": ("tune", "routability") for k in _ROUTABILITY},
    "stage2": ("stage2",),
    "selection": ("stage2",),
    "router": ("tune", "routability", "router"),
    "experts": ("tune", "experts"),
    "fallback": ("experts", "router", "calibrate"),
    "fallback.thresholds": ("calibrate",),
    "eval.latency_samples": ("evaluate",),
    # how, not what
    "run": (),
    "tracking": (),
    "eval": (),
    "serve": (),
    "spectra": (),
    "gsnr": (),
    "model.device": (),
    "model.attn_implementation": (),
    "model.cache_dir": (),
    "gradients.torch_threads": (),
    "experts.parallel": (),
    "tune.max_concurrent_trials": (),
    **{f"stage2.{k}": () for k in _HOW_STAGE2},
    **{f"{s}.{k}": () for s in ("warmup", "experts") for k in _HOW_TO_TRAIN},
}


def readers(key: str) -> tuple[str, ...]:
    """The stages that read config key ``section.key`` (``READS``, longest match)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in READS:
            return READS[".".join(parts[:n])]
    return (STAGE_NAMES[0],)  # a key nobody classified: assume it reaches every stage


def after(stages: Iterable[str]) -> set[str]:
    """These stages and every stage their rerun invalidates, transitively."""
    out, todo = set(), list(stages)
    while todo:
        name = todo.pop()
        if name not in out:
            out.add(name)
            todo.extend(_BY_NAME[name].invalidates)
    return out


def _discard_training(run: RunDir, *patterns: str) -> None:
    """Ray Train's runs of these names (their checkpoints: a resumed training would continue
    them, or restore one that had finished)."""
    from gs_ray.training.ray_train import discard_run

    names = {
        p.name.removesuffix(".gs_ray") for pattern in patterns for p in run.ray_train.glob(pattern)
    }
    for name in names:
        discard_run(str(run.ray_train), name)


def _discard_experts(run: RunDir) -> None:
    run.discard_experts()
    _discard_training(run, f"{EXPERT_PREFIX}*", GENERALIST, f"{GENERALIST}.gs_ray")


# What a stage's invalidation also removes from the run directory: outputs and checkpoints a
# rerun would otherwise keep or continue.
_DISCARD: dict[str, Callable[[RunDir], None]] = {
    "warmup": lambda run: _discard_training(run, WARMUP, f"{WARMUP}.gs_ray"),
    "stage2": RunDir.discard_stage2_checkpoint,
    "experts": _discard_experts,
}


def invalidate(run: RunDir, *stages: str) -> None:
    """Mark stages not done and drop the outputs that must not be reused: the outputs first, so
    that a crash in between leaves a stage marked done without them (its ``complete`` check or
    the next invalidation catches that), never stale outputs of a stage marked not done."""
    for name in stages:
        if name in _DISCARD:
            _DISCARD[name](run)
    run.invalidate(*stages)


@dataclass(frozen=True)
class ResumePlan:
    """What resuming a run with a config changes: the keys (key -> (before, now)) and the
    stages to forget (in pipeline order)."""

    changed: dict[str, tuple[Any, Any]]
    invalidate: tuple[str, ...]
    redo: tuple[str, ...]


def config_changes(
    before: dict[str, Any], now: dict[str, Any], prefix: str = ""
) -> dict[str, tuple[Any, Any]]:
    """The leaf keys (``section.key``) whose values differ; lists are compared whole."""
    out: dict[str, tuple[Any, Any]] = {}
    for key in [*now, *(k for k in before if k not in now)]:
        a, b = before.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.update(config_changes(a, b, f"{prefix}{key}."))
        elif a != b:
            out[f"{prefix}{key}"] = (a, b)
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def plan_resume(run: RunDir, cfg: Config, redo: Iterable[str] = ()) -> ResumePlan:
    """What resuming ``run`` with ``cfg`` invalidates: the stages that read a changed key
    (``READS``; a stage that applies under neither config reads nothing) and every stage
    after them, plus ``redo`` and every stage after it. Raises ``UserError`` naming the
    changed keys where that would forget a finished stage that ``redo`` does not name, and
    ``RunDirError`` where the manifest's config no longer matches its recorded hash."""
    redo = tuple(dict.fromkeys(redo))
    unknown = [s for s in redo if s not in STAGE_NAMES]
    if unknown:
        raise UserError(
            f"--redo {','.join(unknown)}: no such stage; stages: {', '.join(STAGE_NAMES)}"
        )
    m = run.manifest()
    recorded = m.get("config_sha256")
    if recorded is not None and config_hash(m.get("config")) != recorded:
        raise RunDirError(
            f"{run.manifest_path}: its config does not match its config_sha256 (edited after "
            "the run wrote it): the stages ran with another config; start a new run"
        )
    old = run.config()
    changed = config_changes(stored_config(old)[0], stored_config(cfg)[0])
    reached: dict[str, list[str]] = {}  # stage -> the changed keys it reads
    for key in changed:
        for name in readers(key):
            if _BY_NAME[name].applies(old) or _BY_NAME[name].applies(cfg):
                reached.setdefault(name, []).append(key)
    done = {name for name, st in m.get("stages", {}).items() if st.get("status") == "done"}
    kept = done - after(redo)  # finished stages the resume is not asked to redo
    blocked = {name: keys for name, keys in reached.items() if after([name]) & kept}
    if blocked:
        keys = dict.fromkeys(k for ks in blocked.values() for k in ks)
        lost = [s for s in STAGE_NAMES if s in after(blocked) & kept]
        ask = {*blocked, *redo}  # the --redo that covers them (and what was asked already)
        needed = [
            s for s in STAGE_NAMES if s in ask and not any(s != t and s in after([t]) for t in ask)
        ]
        raise UserError(
            f"{run.path}: resuming with "
            + ", ".join(f"{k} {_short(changed[k][0])} -> {_short(changed[k][1])}" for k in keys)
            + f" would invalidate the finished stages {', '.join(lost)}; redo them with "
            f"--redo {','.join(needed)}, or start a new run"
        )
    forget = after(reached) | after(redo)
    return ResumePlan(changed, tuple(s for s in STAGE_NAMES if s in forget), redo)


def resume_run(run: RunDir, cfg: Config, redo: Iterable[str] = ()) -> ResumePlan:
    """Resume ``run`` with ``cfg`` (its lock held): plan it (``plan_resume``, which may
    refuse), drop the invalidated stages' outputs and checkpoints, then record the resume and
    its config in the manifest."""
    plan = plan_resume(run, cfg, redo)
    for name in plan.invalidate:
        if name in _DISCARD:
            _DISCARD[name](run)
    entry = run.record_resume(cfg, plan.changed, plan.invalidate, plan.redo)
    if plan.changed or plan.redo:
        log.info(
            "resume: changed %s; redo %s; invalidated %s",
            ", ".join(plan.changed) or "nothing",
            ", ".join(plan.redo) or "nothing",
            ", ".join(entry["invalidated"]) or "nothing",
        )
    return plan


def run(
    cfg: Config, resume: str | None = None, checked: bool = False, redo: Iterable[str] = ()
) -> RunDir:
    """Every stage on Ray: warm-up, (K with Tune), Stage II, experts, router, evaluation.

    Connects to the cluster (inside ``ray job submit`` or with RAY_ADDRESS / run.ray_address),
    or starts a local Ray. With ``resume``, stages whose outputs are complete are skipped, and
    ``redo`` names stages to run again (with every stage after them); a config change that
    would invalidate a finished stage is refused before Ray starts (``plan_resume``).
    ``checked``: the caller has run ``check_before_ray``'s checks on this config already (the
    CLI does, and logs the notes)."""
    from gs_ray.ray_utils import init_ray

    log_notes([] if checked else check_before_ray(cfg, resume))  # before Ray starts
    resumed = _open_resumed(cfg, resume, redo)
    log.info("Ray: %s", init_ray(cfg.run.ray_address, cfg.run.num_cpus))
    p = prepare(cfg, resumed, base_model=base_model_for)
    try:
        if resumed is not None:
            resume_run(p.run, cfg, redo)
        with tracking.open_tracker(cfg, p.run) as tracker:
            return _run_stages(p, cfg, resumed is not None, tracker)
    finally:
        p.run.release_lock()


def _open_resumed(cfg: Config, resume: str | None, redo: Iterable[str]) -> RunDir | None:
    """The run to resume, its plan checked (a refusal before Ray starts, nothing written)."""
    if resume is None:
        if tuple(redo):
            raise UserError("--redo needs --resume RUN_DIR")
        return None
    run_dir = RunDir.open(resume)
    plan_resume(run_dir, cfg, redo)
    return run_dir


def check_before_ray(cfg: Config, resume: str | None = None, on_ray: bool = True) -> list[str]:
    """Everything a run checks before Ray starts or a run directory exists: config and data
    (``check_inputs``, no torch), then the model, the machine and the files the config names
    (``preflight.check_run``). Raises a UserError naming the key; returns the pre-flight's
    notes on what it could not check."""
    check_inputs(cfg)
    return check_run(cfg, resume, on_ray=on_ray)


def _run_stages(
    p: Prepared, cfg: Config, resume: bool, tracker: tracking.Tracker | None = None
) -> RunDir:
    from gs_ray.evaluation import plots

    tracker = tracker or tracking.Tracker()  # None: no tracking
    logs.attach_run(p.run.path)
    todo = [s for s in STAGES if s.applies(cfg)]
    for i, stage in enumerate(todo, start=1):
        if stage.done(p):
            log.info("[%d/%d] %s: done before, kept", i, len(todo), stage.name)
            tracker.log_kept(stage.name)
        else:
            log.info("[%d/%d] %s ...", i, len(todo), stage.name)
            # Before the stage can be marked done: a crash right after that must not leave
            # its dependents marked done on outputs of the stage's previous run.
            invalidate(p.run, *stage.invalidates)
            with tracker.stage(stage.name):
                stage.run(p, resume)
            seconds = p.run.manifest()["stages"][stage.name]["seconds"]
            log.info("[%d/%d] %s: done in %.1f s", i, len(todo), stage.name, seconds)
        if cfg.run.until == stage.name:
            return p.run
    plots.pipeline_plots(p.run, p.assignments()[1])
    try:
        cards = write_model_cards(p.run.path, {s.id: s.prompt for s in p.samples})
        log.info(
            "model cards: %d adapters (README.md in each; gs-ray export RUN OUT bundles them)",
            len(cards),
        )
    except UserError as e:  # a run without a router or experts (stages left out): no cards
        log.warning("no model cards: %s", e)
    log.info("done: %s; report: %s", p.run.path, build_report(p.run.path))
    tracker.log_outputs()
    return p.run


def run_local(
    cfg: Config, resume: str | None = None, checked: bool = False, redo: Iterable[str] = ()
) -> RunDir:
    """The single-process reference pipeline: prepare, warm-up, Stage II (finished stages of a
    resumed run are skipped). ``checked``, ``redo`` as for ``run``."""
    log_notes([] if checked else check_before_ray(cfg, resume, on_ray=False))
    resumed = _open_resumed(cfg, resume, redo)
    p = prepare(cfg, resumed, base_model=base_model_for)
    try:
        logs.attach_run(p.run.path)
        if resumed is not None:
            resume_run(p.run, cfg, redo)
        with tracking.open_tracker(cfg, p.run) as tracker:
            if not _BY_NAME["warmup"].done(p):
                invalidate(p.run, *_BY_NAME["warmup"].invalidates)
                with tracker.stage("warmup"):
                    warmup_local(p)
            else:
                tracker.log_kept("warmup")
            if not (p.run.stage_done("stage2") and stream_selections_complete(p)):
                from gs_ray.evaluation import plots

                with tracker.stage("stage2"):
                    res = stage2_local(p, consumers=stream_selectors(p))
                    record_stream_selections(p, res.consumers)
                    plots.stage2_plots(p.run)
            else:
                tracker.log_kept("stage2")
            tracker.log_outputs()
        return p.run
    finally:
        p.run.release_lock()
