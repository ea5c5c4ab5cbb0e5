"""Per-sample gradients for Stage II: the base model and the warm-up adapter, loaded once.

``GradientComputer`` turns a batch of samples into a (b, d) gradient matrix (length-sorted
micro-batches, optional random projection) and checks it where it is computed: a sample whose
gradient has a NaN or Inf is named by its id. ``stage2.nonfinite`` decides what happens then:
``fail`` (default) stops the run with ``NonFiniteGradientError``; ``skip`` leaves the sample out of
clustering (it gets no cluster and trains no expert) and counts it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gs_ray.config import Config
from gs_ray.core.gradients import LoRAGradientEngine, RandomProjection, compute_bucketed
from gs_ray.core.models import load_adapter, load_base_model, resolve_device
from gs_ray.data.loading import n_response_tokens, prompt_pair
from gs_ray.stage2.batch import GradientBatch, check_finite

log = logging.getLogger(__name__)


def _unit(X: torch.Tensor) -> torch.Tensor:
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


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
        self.nonfinite = cfg.stage2.nonfinite
        k = cfg.gradients.projection_dim
        self.project = (
            RandomProjection(
                self.engine.dim, k, seed=cfg.run.seed, kind=cfg.gradients.projection_kind
            )
            if k
            else None
        )
        self.dim = k or self.engine.dim
        self.prompt_mix_below = cfg.gradients.prompt_mix_below
        self.calls = 0  # engine passes (a test counts them)

    def __call__(self, pairs: Sequence[tuple[list[int], list[int]]]) -> np.ndarray:
        """(b, d) gradients of ``pairs``, unchecked (see ``batch``). With
        ``gradients.prompt_mix_below`` m, a sample with fewer than m response tokens (and a prompt
        of two tokens or more) gets ``unit(g_response) + unit(g_prompt)``."""
        self.calls += 1
        G = compute_bucketed(self.engine, pairs, self.pad_id, self.micro)
        short = [
            i
            for i, pair in enumerate(pairs)
            if n_response_tokens(pair) < self.prompt_mix_below and len(prompt_pair(pair)[0]) >= 2
        ]
        if short:
            P = compute_bucketed(
                self.engine, [prompt_pair(pairs[i]) for i in short], self.pad_id, self.micro
            )
            G[short] = _unit(G[short]) + _unit(P)
        return (self.project(G) if self.project else G).numpy()

    def batch(
        self, pairs: Sequence[tuple[list[int], list[int]]], ids: Sequence[str]
    ) -> GradientBatch:
        """Gradients of ``pairs`` (sample ``ids``) with the non-finite policy applied."""
        return check_finite(self(pairs), ids, self.nonfinite)

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
