"""``gs-ray select``: rank a data pool for a target set and keep the budget's best.

Top to bottom: a run directory and its warm-up adapter (an existing run's, or a new run whose
warm-up is trained here on the pool's warm-up split, in this process, as ``gs-ray run --local``
does), the target's gradients (one small pass), then one pass over the pool whose gradient
batches go to the selector (a consumer of the gradient stream, ``gs_ray.selection.consumers``),
and finally the pool's records, ranked and cut to the budget, in the input's own format.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray.config import Config, ConfigError, validate
from gs_ray.core.models import load_tokenizer
from gs_ray.data import (
    Sample,
    check_source,
    load_samples,
    read_examples,
    rows_by_id,
    target_data_config,
)
from gs_ray.errors import DataError
from gs_ray.io import write_json
from gs_ray.prepare import Prepared, prepare
from gs_ray.progress import Progress
from gs_ray.rundir import WARMUP, RunDir
from gs_ray.selection.consumers import (
    ENSEMBLE_SELECTORS,
    ScoredSelector,
    Selector,
    make_selector,
)
from gs_ray.selection.ranking import budget_count
from gs_ray.stage2.batch import check_finite
from gs_ray.stage2.computer import GradientComputer
from gs_ray.stage2.consumers import ConsumerSet
from gs_ray.stage2.plan import FINAL
from gs_ray.training.pretrain import base_model_for

log = logging.getLogger(__name__)

STAGE = "select"  # its entry in the manifest


@dataclasses.dataclass
class Pool:
    """What the selection reads: the run, its base model, the pool and the target samples."""

    run: RunDir
    base_path: str
    pad_id: int
    pool: list[Sample]
    target: list[Sample]


def check_select_inputs(cfg: Config) -> None:
    """What can be checked before a model is loaded: the config, the budget, the pool's records
    and the target's (ConfigError / DataError naming the key or the file)."""
    validate(cfg)
    targeted = cfg.selection.method not in ENSEMBLE_SELECTORS
    if targeted and not cfg.selection.target:
        raise ConfigError(
            f"selection.target: {cfg.selection.method} needs a target set "
            "(gs-ray select --target FILE)"
        )
    try:
        budget_count(cfg.selection.budget, 1)
    except ValueError as e:
        raise ConfigError(f"selection.{e}") from None
    check_source(cfg.data, cfg.run.seed)
    if cfg.selection.target:
        read_examples(target_data_config(cfg), cfg.run.seed)


def open_pool(cfg: Config, run_dir: str | None = None, warm: bool = True) -> Pool:
    """The run directory with a warm-up adapter (warmed up here if it has none and ``warm``:
    G-SNR trains its own ensemble instead), the pool (``data.*``) and the target
    (``selection.target``), tokenised alike."""
    run = RunDir.open(run_dir) if run_dir else None
    if run is not None and (run.stage_done(WARMUP) or not warm):
        seed = cfg.run.seed
        base_path = base_model_for(cfg, run.path)
        tokenizer = load_tokenizer(base_path)
        pool, _ = load_samples(cfg.data, tokenizer, seed)
        log.info("select: the warm-up adapter of %s", run.path)
    else:
        from gs_ray.training.warmup import warmup_local

        p = prepare(cfg, run, base_model=base_model_for)
        if warm:
            log.info("select: warming up on %d pool samples", len(p.splits.warmup))
            warmup_local(p)
        run, base_path, tokenizer, pool = p.run, p.base_path, p.tokenizer, p.samples
    target = []
    if cfg.selection.target:
        target, _ = load_samples(target_data_config(cfg), tokenizer, cfg.run.seed)
    return Pool(run, base_path, int(tokenizer.pad_token_id), pool, target)


def target_gradients(computer: GradientComputer, target: list[Sample], chunk: int = 64):
    """(m, d) gradients of the target samples (non-finite ones are an error: the target is
    small and every sample of it is meant to count)."""
    parts = []
    for start in range(0, len(target), chunk):
        part = target[start : start + chunk]
        parts.append(check_finite(computer([s.pair for s in part]), [s.id for s in part], "fail").G)
    return np.concatenate(parts)


def stream_pool(
    computer: GradientComputer, pool: list[Sample], consumers: ConsumerSet, batch_size: int
) -> None:
    """One gradient pass over the pool, every batch to every consumer (plan phase ``final``)."""
    consumers.set_layout(computer.layout())
    order = np.argsort([len(s) for s in pool], kind="stable")  # similar lengths: less padding
    bar = Progress("select: pool gradients", total=len(pool))
    for t, start in enumerate(range(0, len(order), batch_size)):
        idx = order[start : start + batch_size]
        batch = computer.batch([pool[i].pair for i in idx], [pool[i].id for i in idx])
        consumers.feed(FINAL, 0, t, idx, batch.G, batch.skipped, batch.ids)
        bar.update(len(idx))
    bar.close()


def write_records(run: RunDir, name: str, cfg: Config, ranked_ids: list[str]) -> dict[str, Any]:
    """The pool's records best first (ranked.jsonl) and the budget's top (selected.jsonl)."""
    records = rows_by_id(cfg.data, cfg.run.seed)
    missing = [i for i in ranked_ids if i not in records]
    if missing:
        raise DataError(f"{cfg.data.source}: no record for sample ids {missing[:5]}")
    n = budget_count(cfg.selection.budget, len(ranked_ids))
    ranked = [records[i] for i in ranked_ids]
    run.write_jsonl(run.selection_ranked(name), ranked)
    run.write_jsonl(run.selection_selected(name), ranked[:n])
    return {"budget": cfg.selection.budget, "n_selected": n}


def record_selection(run: RunDir, cfg: Config, selector, **facts: Any) -> dict[str, Any]:
    """A fed selector's outputs: scores and summary (``Selector.write``), the pool's records
    ranked and the budget's selection, and the summary in metrics.json under ``selection``."""
    summary = selector.write(run)
    ranked_ids, _ = selector.ranking()
    summary.update(
        write_records(run, selector.name, cfg, ranked_ids),
        target=str(Path(cfg.selection.target)) if cfg.selection.target else None,
        **facts,
    )
    write_json(run.selection_summary(selector.name), summary)
    run.add_metrics(selection={**run.metrics().get("selection", {}), selector.name: summary})
    return summary


# ---------------------------------------------------------------- selectors riding Stage II


def stream_selectors(p: Prepared) -> list[Selector]:
    """The selectors of ``stage2.consumers``, fitted to the target's gradients under the run's
    warm-up adapter (one small pass, in this process), to read Stage II's final pass: every train
    and test sample's gradient, computed once for the clusterer and for them."""
    cfg = p.cfg
    if not cfg.stage2.consumers:
        return []
    target, _ = load_samples(target_data_config(cfg), p.tokenizer, cfg.run.seed)
    computer = GradientComputer(p.base_path, cfg, p.run.warmup_adapter, p.pad_id)
    T = target_gradients(computer, target)
    log.info(
        "stage2: %s score the run's samples for %d target samples (%s)",
        "+".join(cfg.stage2.consumers),
        len(target),
        cfg.selection.target,
    )
    return [make_selector(m, T, cfg.selection, cfg.run.seed) for m in cfg.stage2.consumers]


def record_stream_selections(p: Prepared, selectors: list) -> None:
    """Ranked and selected records of each selector fed by Stage II (``stream_selectors``)."""
    for selector in selectors:
        if isinstance(selector, Selector):
            record_selection(p.run, p.cfg, selector, pool="stage2 final pass (train + test)")


def stream_selections_complete(p: Prepared) -> bool:
    """Every selector of ``stage2.consumers`` has its selected records in the run directory."""
    return all(p.run.selection_selected(m).exists() for m in p.cfg.stage2.consumers)


def gsnr_selector(cfg: Config, pool: Pool) -> ScoredSelector:
    """G-SNR of every pool sample under a LoRA ensemble of the run's base model (the proxy),
    trained briefly on the pool itself on Ray (``selection.gsnr.gsnr_scores``)."""
    from gs_ray.selection.gsnr import gsnr_scores

    res = gsnr_scores(
        cfg,
        pool.pool,
        pool.base_path,
        pool.pad_id,
        pool.run.selection(ScoredSelector.method) / "ensemble",
    )
    info = {
        "form": res.form,
        "members": len(res.members),
        "seconds": res.seconds,
        "stored_bytes_per_sample": 0,
    }
    return ScoredSelector([s.id for s in pool.pool], res.scores, info)


def select(cfg: Config, run_dir: str | None = None, checked: bool = False) -> RunDir:
    """Score the pool for the target with ``selection.method``; outputs in
    ``RUN_DIR/selection/<method>/`` (scores, summary, ranked and selected records).
    ``checked``: the caller has run ``check_select_inputs`` on this config (the CLI does)."""
    sel = cfg.selection
    if not checked:
        check_select_inputs(cfg)
    pool = open_pool(cfg, run_dir, warm=sel.method not in ENSEMBLE_SELECTORS)
    run = pool.run
    with run.stage(STAGE) as info:
        if sel.method in ENSEMBLE_SELECTORS:
            selector, calls = gsnr_selector(cfg, pool), None
        else:
            computer = GradientComputer(pool.base_path, cfg, run.warmup_adapter, pool.pad_id)
            T = target_gradients(computer, pool.target)
            selector = make_selector(sel.method, T, sel, cfg.run.seed)
            stream_pool(computer, pool.pool, ConsumerSet([selector]), cfg.gradients.batch_size)
            calls = computer.calls
        summary = record_selection(
            run, cfg, selector, n_target=len(pool.target), engine_calls=calls, pool="gs-ray select"
        )
        info.update(method=sel.method, n_selected=summary["n_selected"])
        log.info(
            "select: %s kept %d of %d pool samples -> %s",
            sel.method,
            summary["n_selected"],
            summary["n_pool"],
            run.selection_selected(selector.name),
        )
    return run
