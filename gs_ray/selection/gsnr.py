"""G-SNR, the gradient signal-to-noise utility of GradFiltering (arXiv 2601.13697).

An example's gradients under the M members of a LoRA ensemble (same proxy model, different seeds
and data orders) are g_1 .. g_M in R^d. With mu = mean_m g_m:

* ``energy`` (default): ``||mu||^2 / (mean_m ||g_m - mu||^2 + eps)`` - the energy of the mean
  gradient over its spread across members, i.e. sum_j mu_j^2 / sum_j var_j;
* ``coordinate``: ``mean_j mu_j^2 / (var_j + eps)`` - the same ratio per coordinate, averaged.

(var is the population variance over members, divided by M.) An example on which the members agree
scores high, one whose gradient direction changes from member to member scores low; the selection
keeps the top fraction (``select_top``). docs/selection.md says why ``energy`` is the default.

The top of this module is pure NumPy (``gsnr``, ``GSNRAccumulator``, ``select_top``). Below it,
``gsnr_scores`` builds the ensemble: M LoRA adapters trained at once on Ray (Ray Train runs of
``training.ray_train``, as Stage III trains the experts), then each example's gradients under every
member with the Stage II gradient engine (``stage2.computer.GradientComputer``); Ray and torch
are imported inside those functions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray.config import Config, GSNRForm
from gs_ray.core.seeds import gsnr_member_seed

log = logging.getLogger(__name__)


def gsnr(grads: np.ndarray, form: GSNRForm = "energy", eps: float = 1e-12) -> np.ndarray:
    """G-SNR per example of gradients ``grads`` (M members, n examples, d); returns (n,)."""
    grads = np.asarray(grads, dtype=np.float64)
    if grads.ndim != 3 or grads.shape[0] < 2:
        raise ValueError(f"expected gradients of shape (M >= 2, n, d), got {grads.shape}")
    acc = GSNRAccumulator(form, eps)
    for member in grads:
        acc.partial_fit(member)
    return acc.scores()


class GSNRAccumulator:
    """G-SNR streamed member by member (Welford's update, float64), for when the M x n x d array
    does not fit: memory n x d for ``energy`` (the mean and one scalar per example), 2 n x d for
    ``coordinate``.

    Example::

        acc = GSNRAccumulator("energy")
        for member in members:
            acc.partial_fit(gradients_under(member))   # (n, d)
        scores = acc.scores()                          # (n,)
    """

    def __init__(self, form: GSNRForm = "energy", eps: float = 1e-12):
        if form not in ("energy", "coordinate"):
            raise ValueError(f"form: expected energy | coordinate, got {form!r}")
        self.form = form
        self.eps = eps

    def partial_fit(self, member_grads: np.ndarray) -> GSNRAccumulator:
        """Add one member's gradients of the n examples, (n, d)."""
        g = np.asarray(member_grads, dtype=np.float64)
        if not hasattr(self, "mean_"):
            self.n_members_ = 0
            self.mean_ = np.zeros_like(g)
            self.sq_dev_ = np.zeros(len(g)) if self.form == "energy" else np.zeros_like(g)
        if g.shape != self.mean_.shape:
            raise ValueError(
                f"member gradients {g.shape} differ from the first's {self.mean_.shape}"
            )
        self.n_members_ += 1
        before = g - self.mean_
        self.mean_ += before / self.n_members_
        dev = before * (g - self.mean_)  # sum over members of these = M * population variance
        self.sq_dev_ += dev.sum(-1) if self.form == "energy" else dev
        return self

    def scores(self) -> np.ndarray:
        """The G-SNR of each example, (n,)."""
        if getattr(self, "n_members_", 0) < 2:
            raise ValueError("G-SNR needs the gradients of at least two members")
        var = self.sq_dev_ / self.n_members_
        if self.form == "energy":
            return (self.mean_**2).sum(-1) / (var + self.eps)
        return (self.mean_**2 / (var + self.eps)).mean(-1)


def select_top(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Indices of the ``ceil(fraction * n)`` highest scores, best first (ties: lower index
    first; NaN never chosen before a number)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    scores = np.asarray(scores, dtype=np.float64)
    keep = int(np.ceil(fraction * len(scores)))
    key = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-key, kind="stable")[:keep]


# =========================================================================== the ensemble (Ray)


@dataclass
class GSNRScores:
    """What ``gsnr_scores`` returns: one score per sample (in the given order) and how it came."""

    scores: np.ndarray
    form: str
    members: list[str]
    """The members' adapter folders (peft format)."""
    records: dict[str, Any] = field(default_factory=dict)
    """Each member's training record (losses, steps, engine), by member name."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall-clock time of the trainings and of the scoring."""


def ensemble_jobs(cfg: Config, train_samples: Sequence, base_path: str, work_dir: str | Path):
    """The M member trainings: fresh LoRA adapters (seeded by member), each on the training
    samples in its own order; ``cfg.gsnr`` holds the training settings."""
    from gs_ray.rundir import EnsembleDir, member_name
    from gs_ray.training.ray_train import AdapterJob

    out = EnsembleDir(work_dir)
    jobs = []
    for m in range(cfg.gsnr.members):
        seed = gsnr_member_seed(cfg.run.seed, m)
        order = np.random.default_rng(seed).permutation(len(train_samples))
        pairs = [getattr(s, "pair", s) for s in (train_samples[i] for i in order)]
        job = AdapterJob(member_name(m), base_path, str(out.member(m)), pairs, seed=seed)
        jobs.append(job)
    return jobs


def train_ensemble(
    cfg: Config, train_samples: Sequence, base_path: str, pad_id: int, work_dir: str | Path
) -> tuple[list[str], dict[str, Any]]:
    """Train the M members at once on Ray (each a Ray Train run with its own retries); returns
    the adapter folders and the training records. A member that still fails raises."""
    from gs_ray.rundir import EnsembleDir
    from gs_ray.training.ray_train import train_many_on_ray

    out = EnsembleDir(work_dir)
    jobs = ensemble_jobs(cfg, train_samples, base_path, work_dir)
    records = train_many_on_ray(
        jobs, cfg.model, cfg.lora, cfg.gsnr, pad_id, str(out.storage), parallel=cfg.gsnr.parallel
    )
    failed = [n for n, r in records.items() if not r.get("ok")]
    if failed:
        errors = "; ".join(f"{n}: {records[n].get('error')}" for n in failed)
        raise RuntimeError(f"G-SNR ensemble training failed after retries: {errors}")
    return [j.output_dir for j in jobs], records


class EnsembleScorer:
    """Every member of an ensemble loaded once (the Stage II engine, ``GradientComputer``: full
    LoRA gradients, or projected when ``gradients.projection_dim`` is set - the same seeded
    projection for every member); ``score`` gives the G-SNR of one chunk of examples, so memory
    holds M x chunk x d gradients, never M x n x d. A non-finite gradient follows
    ``stage2.nonfinite`` (``skip``: score NaN). ``gsnr_scores`` hosts it as a Ray actor."""

    def __init__(self, cfg: Config, base_path: str, adapters: Sequence[str], pad_id: int):
        from gs_ray.stage2.computer import GradientComputer

        self.form, self.eps = cfg.gsnr.form, cfg.gsnr.eps
        self.computers = [GradientComputer(base_path, cfg, a, pad_id) for a in adapters]

    def score(self, pairs: Sequence[tuple[list[int], list[int]]], ids: Sequence[str]) -> np.ndarray:
        batches = [c.batch(pairs, ids) for c in self.computers]
        scores = gsnr(np.stack([b.G for b in batches]), self.form, self.eps)
        skipped = np.logical_or.reduce([b.skipped for b in batches])
        return np.where(skipped, np.nan, scores)


def _chunks(n: int, cfg: Config, size: int | None = None) -> list[slice]:
    """The slices that score ``n`` examples a chunk at a time (``size`` default: 4 x
    ``gradients.batch_size``)."""
    size = size or 4 * cfg.gradients.batch_size
    return [slice(start, start + size) for start in range(0, n, size)]


def member_scores(
    cfg: Config,
    base_path: str,
    adapters: Sequence[str],
    pairs: Sequence[tuple[list[int], list[int]]],
    ids: Sequence[str],
    pad_id: int,
    chunk: int | None = None,
) -> np.ndarray:
    """G-SNR of every pair under the given members, in this process (``EnsembleScorer`` chunk by
    chunk; ``chunk`` default: 4 x ``gradients.batch_size``)."""
    scorer = EnsembleScorer(cfg, base_path, adapters, pad_id)
    parts = _chunks(len(pairs), cfg, chunk)
    return np.concatenate([scorer.score(pairs[sl], ids[sl]) for sl in parts] or [np.empty(0)])


class _EnsembleScorerActor(EnsembleScorer):
    """``EnsembleScorer`` as a Ray actor, with torch on the CPUs Ray assigned it."""

    def __init__(self, *args):
        from gs_ray.ray_utils import use_assigned_cpus

        use_assigned_cpus()
        super().__init__(*args)


def gsnr_scores(
    cfg: Config,
    samples: Sequence,
    base_path: str,
    pad_id: int,
    work_dir: str | Path,
    train_samples: Sequence | None = None,
) -> GSNRScores:
    """G-SNR of every sample (``data.Sample`` objects, scored in their order) under a LoRA
    ensemble of ``cfg.gsnr.members`` adapters on the base model at ``base_path`` (a small proxy:
    ``load_base_model`` must load it; ``prepare`` or ``core.models.materialize_base_model`` gives
    the path).

    The members train on ``train_samples`` (None: ``samples`` themselves, as GradFiltering trains
    its proxy briefly on the candidate pool) at once on Ray, with ``cfg.lora`` and the training
    settings of ``cfg.gsnr``; their adapters and Ray Train's folders go under ``work_dir``
    (``rundir.EnsembleDir``). The scoring then runs in one ``EnsembleScorer`` actor (a GPU where
    the cluster has one), a chunk per call, with progress lines. Connects to Ray
    (``ray_utils.init_ray``) if not connected.
    """
    import ray

    from gs_ray.progress import Progress
    from gs_ray.ray_utils import init_ray, task_resources

    init_ray(cfg.run.ray_address, cfg.run.num_cpus)
    start = time.perf_counter()
    adapters, records = train_ensemble(
        cfg, samples if train_samples is None else train_samples, base_path, pad_id, work_dir
    )
    trained = time.perf_counter()
    pairs = [s.pair for s in samples]
    ids = [s.id for s in samples]
    scorer = (
        ray.remote(_EnsembleScorerActor)
        .options(**task_resources())
        .remote(cfg, base_path, adapters, pad_id)
    )
    try:
        bar = Progress(f"G-SNR: gradients under {len(adapters)} members", total=len(samples))
        parts = []
        for sl in _chunks(len(samples), cfg):
            parts.append(ray.get(scorer.score.remote(pairs[sl], ids[sl])))
            bar.update(len(parts[-1]))
        bar.close()
    finally:
        ray.kill(scorer)
    scores = np.concatenate(parts or [np.empty(0)])
    done = time.perf_counter()
    log.info(
        "G-SNR (%s) of %d samples under %d members: training %.1fs, scoring %.1fs",
        cfg.gsnr.form,
        len(samples),
        len(adapters),
        trained - start,
        done - trained,
    )
    return GSNRScores(
        scores,
        cfg.gsnr.form,
        adapters,
        records,
        {"training": trained - start, "scoring": done - trained},
    )
