"""What every stage shares: the run directory, the base model, the tokenizer and the data splits."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field

import numpy as np

from gs_ray.config import Config
from gs_ray.core.models import load_tokenizer, model_card
from gs_ray.data import Sample, Splits, load_samples, make_splits
from gs_ray.rundir import RunDir
from gs_ray.stage2.result import SKIPPED
from gs_ray.training.pretrain import base_model_for

log = logging.getLogger(__name__)

SPLIT_NAMES = ("warmup", "val", "rest", "test")


@dataclass
class Prepared:
    """Everything the stages share: the run directory, base model path, tokenizer, data."""

    run: RunDir
    cfg: Config
    base_path: str
    tokenizer: object
    samples: list[Sample]
    splits: Splits
    _assignments: tuple[np.ndarray, int] | None = field(default=None, repr=False)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(s) for s in self.samples])

    def subset(self, idx: np.ndarray) -> list[Sample]:
        return [self.samples[i] for i in idx]

    def pairs(self, idx: np.ndarray) -> list[tuple[list[int], list[int]]]:
        return [self.samples[i].pair for i in idx]

    def assignments(self, reload: bool = False) -> tuple[np.ndarray, int]:
        """(cluster per sample, K) from Stage II's outputs, checked against the data."""
        if self._assignments is None or reload:
            rows = self.run.assignments()
            if [r["id"] for r in rows] != [s.id for s in self.samples]:
                raise RuntimeError(
                    f"{self.run.assignments_path} does not match the data: re-run stage 2"
                )
            labels = np.array([SKIPPED if r["cluster"] is None else r["cluster"] for r in rows])
            chosen = json.loads((self.run.stage2 / "k_selection.json").read_text())["chosen"]
            self._assignments = (labels.astype(np.int64), int(chosen["k"]))
        return self._assignments


def prepare(cfg: Config, run: RunDir | None = None) -> Prepared:
    """Create (or reopen) the run directory, materialise the base model, load and split data."""
    start = time.perf_counter()
    if run is None:  # a new run: a failed start leaves nothing behind
        run = RunDir.create(cfg)
        try:
            return _prepare(cfg, run, start)
        except BaseException:
            if run.created:
                shutil.rmtree(run.path, ignore_errors=True)
            raise
    return _prepare(cfg, run, start)


def _prepare(cfg: Config, run: RunDir, start: float) -> Prepared:
    seed = cfg.run.seed
    base_path = base_model_for(cfg, run.path)
    tokenizer = load_tokenizer(base_path)
    samples, report = load_samples(cfg.data, tokenizer, seed)
    splits = make_splits(len(samples), cfg.data, seed)
    split_of = np.empty(len(samples), dtype=object)
    for name in SPLIT_NAMES:
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
