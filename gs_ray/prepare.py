"""What every stage shares: the run directory, the base model, the tokenizer and the data splits."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gs_ray.config import Config
from gs_ray.core.models import load_tokenizer, model_card
from gs_ray.data import Sample, Splits, load_samples, make_splits
from gs_ray.data.loading import DataReport
from gs_ray.errors import RunDirError
from gs_ray.rundir import RunDir

log = logging.getLogger(__name__)

SPLIT_NAMES = ("warmup", "val", "rest", "test")
CALIBRATION_SEED = 7919  # the calibration draw's stream, apart from the splits' and the trainings'
BaseModel = Callable[[Config, Path], str]
"""(config, run folder) -> the base model's path: ``training.pretrain.base_model_for``, passed
in by the caller (the stages' modules are not imported here)."""


@dataclass
class Prepared:
    """Everything the stages share: the run directory, base model path, tokenizer, data."""

    run: RunDir
    cfg: Config
    base_path: str
    tokenizer: object
    samples: list[Sample]
    splits: Splits
    report: DataReport | None = field(default=None, repr=False)  # what loading kept, dropped
    fingerprint: str = ""  # data_fingerprint(samples): the run's data, checked on every reopen
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

    def stage2_assignments(self) -> tuple[np.ndarray, int]:
        """(cluster per sample, K) exactly as Stage II wrote them, checked against the data."""
        return self.run.stage2_labels([s.id for s in self.samples])

    def assignments(self, reload: bool = False) -> tuple[np.ndarray, int]:
        """(cluster per sample, K) of the partition the experts are trained on: Stage II's, with
        the routability step's merges applied where it ran (``stage2/routability.json``)."""
        if self._assignments is None or reload:
            labels, k = self.stage2_assignments()
            path = self.run.routability_json
            if self.cfg.clustering.routability != "off" and path.exists():
                merge = json.loads(path.read_text())
                mapping = np.asarray(merge["mapping"], dtype=np.int64)
                if len(mapping) != k:
                    raise RuntimeError(
                        f"{path} maps {len(mapping)} clusters, Stage II has {k}: "
                        "re-run the routability stage"
                    )
                ok = labels >= 0
                labels[ok] = mapping[labels[ok]]
                k = int(merge["k_after"])
            self._assignments = (labels, k)
        return self._assignments

    def calibration_rows(self) -> np.ndarray:
        """Training rows held out of the experts, the generalist and the router to calibrate the
        fallback (``fallback``): a seeded draw outside the warm-up split, empty when the fallback
        is off or the training split too small to spare ``fallback.min_calibration`` rows."""
        fb = self.cfg.fallback
        if not fb.enabled:
            return np.zeros(0, dtype=np.int64)
        pool = np.setdiff1d(self.splits.train, self.splits.warmup)
        n = max(fb.min_calibration, int(round(fb.calibration_fraction * len(self.splits.train))))
        if n > len(pool) // 2:
            return np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng([self.cfg.run.seed, CALIBRATION_SEED])
        return np.sort(rng.choice(pool, size=n, replace=False))

    def fit_rows(self) -> np.ndarray:
        """The training rows that the experts, the generalist and the router learn from: the
        train split less the calibration rows."""
        return np.setdiff1d(self.splits.train, self.calibration_rows())


def data_fingerprint(samples: list) -> str:
    """SHA-256 over every sample's id, token ids and labels, in order: what a resumed run (or
    its eval) must find unchanged."""
    h = hashlib.sha256()
    for s in samples:
        h.update(s.id.encode("utf-8", "surrogatepass") + b"\0")
        h.update(np.asarray(s.input_ids, dtype=np.int64).tobytes())
        h.update(np.asarray(s.labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def prepare(
    cfg: Config, run: RunDir | None = None, *, base_model: BaseModel, read_only: bool = False
) -> Prepared:
    """Create (or reopen) the run directory, materialise the base model (``base_model(cfg,
    run folder)``), load and split data. ``read_only``: an existing run as it is (``gs-ray
    eval``): the data are checked against its fingerprint, and neither the manifest nor the
    samples list is written."""
    start = time.perf_counter()
    if read_only:
        if run is None:
            raise ValueError("prepare(read_only=True) needs an existing run directory")
        run.hold_lock()  # what reads the run writes beside it (eval/): one process at a time
        return _load(cfg, run, base_model)
    if run is None:  # a new run (created exclusively, locked): a failed start leaves nothing
        run = RunDir.create(cfg)
        try:
            return _prepare(cfg, run, start, base_model)
        except BaseException:
            shutil.rmtree(run.path, ignore_errors=True)  # ours alone: created and locked here
            run.release_lock()
            raise
    run.hold_lock()  # a resumed run: one process at a time
    return _prepare(cfg, run, start, base_model)


def _load(cfg: Config, run: RunDir, base_model: BaseModel) -> Prepared:
    """The run's base model, data and splits, checked against the data it started with."""
    seed = cfg.run.seed
    base_path = base_model(cfg, run.path)
    tokenizer = load_tokenizer(base_path)
    samples, report = load_samples(cfg.data, tokenizer, seed)
    fingerprint = data_fingerprint(samples)
    before = (run.manifest().get("data") or {}).get("fingerprint")
    if before is not None and before != fingerprint:
        raise RunDirError(
            f"{run.path}: the data changed since this run started (fingerprint {before[:12]} -> "
            f"{fingerprint[:12]}: the rows, their text, the tokenizer or the template differ); "
            "resuming would mix its clusters and adapters with other data: start a new run"
        )
    splits = make_splits(len(samples), cfg.data, seed)
    return Prepared(run, cfg, base_path, tokenizer, samples, splits, report, fingerprint)


def _prepare(cfg: Config, run: RunDir, start: float, base_model: BaseModel) -> Prepared:
    p = _load(cfg, run, base_model)
    samples, splits = p.samples, p.splits
    split_of = np.empty(len(samples), dtype=object)
    for name in SPLIT_NAMES:
        split_of[getattr(splits, name)] = name
    rows = (
        {"id": s.id, "split": split_of[i], "domain": s.domain, "n_tokens": len(s)}
        for i, s in enumerate(samples)
    )
    run.write_jsonl(run.sub("data", "samples.jsonl"), rows)
    run.update_manifest(
        data={**p.report.to_dict(), "splits": splits.counts(), "fingerprint": p.fingerprint},
        base_model=model_card(p.base_path),
    )
    log.info("run directory %s; data: %s; splits %s", run.path, p.report.summary(), splits.counts())
    run.mark_stage("prepare", time.perf_counter() - start)
    return p
