"""Stage II: per-sample gradients streamed into the GradientSpace clusterer.

Three pieces, each usable without Ray:

* ``Stage2Plan`` - which samples form which batch, in which order: the validation batches, the
  batches B_t of every online epoch (a seeded, length-bucketed shuffle per epoch) and the final
  assignment batches. Every executor follows the same plan, so results do not depend on it.
* ``GradientComputer`` - loads the base model and the warm-up adapter once and turns a batch of
  samples into a (b, d) gradient matrix (in micro-batches).
* ``CentroidHost`` - holds the clusterer and applies batches strictly in plan order: collect
  validation gradients, initialise, online updates, end of epoch, final assignment. It knows its
  position, checkpoints itself and resumes from a checkpoint.

``run_stage2_local`` drives them in one process: the reference pipeline, the oracle that the
distributed version (``gs_ray.distributed``) must reproduce.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gs_ray.clustering import GradientSpaceClustering
from gs_ray.config import ClusteringConfig, Config
from gs_ray.data import Sample, Splits, length_bucketed_batches
from gs_ray.gradients import LoRAGradientEngine, RandomProjection, compute_bucketed
from gs_ray.models import load_adapter, load_base_model, resolve_device
from gs_ray.progress import Progress
from gs_ray.rundir import atomic_write_text

log = logging.getLogger(__name__)

VAL, ONLINE, FINAL = "val", "online", "final"


@dataclass
class Stage2Plan:
    """The batches of Stage II in their global order (index arrays into the sample list)."""

    val: list[np.ndarray]
    online: list[list[np.ndarray]]  # one list of batches B_t per possible epoch
    final: list[np.ndarray]

    @classmethod
    def build(cls, lengths: np.ndarray, splits: Splits, cfg: Config) -> Stage2Plan:
        c, g, seed = cfg.clustering, cfg.gradients, cfg.run.seed
        val = [splits.val[i : i + c.batch_size] for i in range(0, len(splits.val), c.batch_size)]
        online = [
            length_bucketed_batches(
                lengths, splits.train, c.batch_size, g.bucket_window, seed + 101 * (e + 1)
            )
            for e in range(c.max_epochs)
        ]
        everything = np.sort(np.concatenate([splits.train, splits.test]))
        final = length_bucketed_batches(
            lengths, everything, c.batch_size, g.bucket_window, seed + 7
        )
        return cls(val=val, online=online, final=final)

    def phases(self) -> list[tuple[str, int, list[np.ndarray]]]:
        """(phase, epoch, batches) in execution order (the host may stop epochs early)."""
        out = [(VAL, 0, self.val)]
        out += [(ONLINE, e, b) for e, b in enumerate(self.online)]
        out.append((FINAL, 0, self.final))
        return out


class GradientComputer:
    """Base model + warm-up adapter, loaded once; turns samples into per-sample gradients."""

    def __init__(
        self,
        base_path: str,
        cfg: Config,
        adapter_path: str | Path,
        pad_id: int,
        device: torch.device | None = None,
    ):
        if cfg.gradients.torch_threads:
            torch.set_num_threads(cfg.gradients.torch_threads)
        self.device = device or resolve_device(cfg.model.device)
        base = load_base_model(base_path, cfg.model, self.device)
        self.model = load_adapter(base, adapter_path, trainable=True)
        self.engine = LoRAGradientEngine(self.model)
        self.pad_id = pad_id
        self.micro = cfg.gradients.batch_size
        k = cfg.gradients.projection_dim
        self.project = RandomProjection(self.engine.dim, k, seed=cfg.run.seed) if k else None
        self.dim = k or self.engine.dim

    def __call__(self, pairs: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        G = compute_bucketed(self.engine, pairs, self.pad_id, self.micro)
        return (self.project(G) if self.project else G).numpy()

    def layout(self) -> dict[str, Any]:
        """The gradient layout: parameter names, shapes and offsets (for the run directory)."""
        e = self.engine
        return {
            "param_names": e.param_names,
            "shapes": [list(s) for s in e.shapes],
            "offsets": e.offsets.tolist(),
            "dim": e.dim,
            "projection_dim": self.project.k if self.project else None,
        }


def make_clusterer(c: ClusteringConfig, seed: int) -> GradientSpaceClustering:
    """The clusterer with the configured hyper-parameters."""
    return GradientSpaceClustering(
        n_clusters=c.n_clusters,
        k_range=(c.k_min, c.k_max),
        variance_thresholds=tuple(c.variance_thresholds),
        alpha=c.alpha,
        beta=c.beta,
        batch_size=c.batch_size,
        max_epochs=c.max_epochs,
        tol=c.tol,
        n_init=c.kmeans_n_init,
        random_state=seed,
    )


class CentroidHost:
    """The clusterer plus its position in the plan; what the centroid actor hosts.

    Batches must arrive in plan order (phase, epoch, t); ``apply`` rejects anything else, which
    makes a replay after a restart harmless: batches at or before the position are skipped.
    """

    def __init__(self, clusterer: GradientSpaceClustering, n_samples: int):
        self.clusterer = clusterer
        self.labels = np.full(n_samples, -1, dtype=np.int64)
        self.val_grads: list[np.ndarray] = []
        self.position: tuple[str, int, int] = (VAL, 0, -1)  # last applied batch
        self.done_epochs = 0
        self.finished_online = False
        self.busy_seconds = 0.0
        self.bytes_in = 0

    # ------------------------------------------------------------------ order

    _ORDER = {VAL: 0, ONLINE: 1, FINAL: 2}

    def _key(self, phase: str, epoch: int, t: int) -> tuple[int, int, int]:
        return (self._ORDER[phase], epoch, t)

    def is_applied(self, phase: str, epoch: int, t: int) -> bool:
        return self._key(phase, epoch, t) <= self._key(*self.position)

    def apply(self, phase: str, epoch: int, t: int, idx: np.ndarray, G: np.ndarray) -> bool:
        """Apply one batch; False if it was already applied (replay)."""
        if self.is_applied(phase, epoch, t):
            return False
        start = time.perf_counter()
        self.bytes_in += G.nbytes
        if phase == VAL:
            self.val_grads.append(np.asarray(G, dtype=np.float32))
        elif phase == ONLINE:
            self.clusterer.partial_fit(G)
        else:
            self.labels[idx] = self.clusterer.predict(G)
        self.position = (phase, epoch, t)
        self.busy_seconds += time.perf_counter() - start
        return True

    def initialize(self) -> dict[str, Any]:
        """SVD + silhouette on the collected validation gradients."""
        start = time.perf_counter()
        if not hasattr(self.clusterer, "cluster_centers_"):
            G_val = np.concatenate(self.val_grads)
            self.clusterer.initialize(G_val)
        self.busy_seconds += time.perf_counter() - start
        return {"k": self.clusterer.n_clusters_, "silhouette": self.clusterer.silhouette_}

    def end_epoch(self, epoch: int) -> bool:
        """Close online epoch ``epoch`` (idempotent on replay); True when converged."""
        if epoch < self.done_epochs:
            return self.clusterer.converged_
        converged = self.clusterer.end_epoch()
        self.done_epochs = epoch + 1
        self.finished_online = converged or self.done_epochs >= self.clusterer.max_epochs
        return converged

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict[str, Any]:
        return {
            "clusterer": self.clusterer.state_dict(),
            "labels": self.labels.copy(),
            "val_grads": [g.copy() for g in self.val_grads],
            "position": self.position,
            "done_epochs": self.done_epochs,
            "finished_online": self.finished_online,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.clusterer.load_state_dict(state["clusterer"])
        self.labels = state["labels"].copy()
        self.val_grads = list(state["val_grads"])
        self.position = tuple(state["position"])
        self.done_epochs = state["done_epochs"]
        self.finished_online = state["finished_online"]

    def save_checkpoint(self, folder: Path) -> Path:
        """Pickle the state atomically to folder/centroids.ckpt; returns the path."""
        import pickle

        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "centroids.ckpt"
        tmp = folder / f".centroids.ckpt.tmp{id(self)}"
        with tmp.open("wb") as f:
            pickle.dump(self.state(), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(path)
        atomic_write_text(folder / "position.txt", f"{self.position}\n")
        return path

    def load_checkpoint(self, folder: Path) -> bool:
        """Restore from folder/centroids.ckpt if it exists."""
        import pickle

        path = folder / "centroids.ckpt"
        if not path.exists():
            return False
        with path.open("rb") as f:
            self.load_state(pickle.load(f))
        return True


def run_stage2_local(
    plan: Stage2Plan,
    samples: Sequence[Sample],
    compute: Callable[[list], np.ndarray],
    host: CentroidHost,
    checkpoint: Callable[[CentroidHost], None] | None = None,
    checkpoint_every: int = 0,
) -> CentroidHost:
    """The reference Stage II loop in one process: same plan, same host as the Ray version."""
    for phase, epoch, batches in plan.phases():
        if phase == ONLINE and (epoch >= host.clusterer.max_epochs or host.finished_online):
            continue
        bar = Progress(
            f"stage2 {phase}" + (f" epoch {epoch + 1}" if phase == ONLINE else ""),
            total=sum(len(b) for b in batches),
        )
        for t, idx in enumerate(batches):
            if not host.is_applied(phase, epoch, t):
                G = compute([samples[i].pair for i in idx])
                host.apply(phase, epoch, t, idx, G)
                if checkpoint and checkpoint_every and (t + 1) % checkpoint_every == 0:
                    checkpoint(host)
            bar.update(len(idx))
        bar.close()
        if phase == VAL:
            info = host.initialize()
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            host.end_epoch(epoch)
            log.info(
                "online epoch %d: centroid shift %.5f", epoch + 1, host.clusterer.shift_history_[-1]
            )
        if checkpoint:
            checkpoint(host)
    return host
