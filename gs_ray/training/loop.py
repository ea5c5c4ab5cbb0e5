"""The LoRA training loop and held-out losses: plain torch + peft, no Ray.

``train_adapter`` is the one training loop. It drives an *engine* with DeepSpeed's interface
(``engine.backward(loss)``, ``engine.step()``): a ``deepspeed.DeepSpeedEngine`` inside Ray Train
(``gs_ray.training.ray_train``), or ``TorchEngine`` (a plain AdamW loop) in the single-process
reference pipeline, Ray Tune trials and tests. ``adapter_losses`` scores several adapters on the
same samples with one base model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from gs_ray.config import ModelConfig, TrainingConfig
from gs_ray.core.gradients import collate, per_sample_loss, response_token_loss
from gs_ray.core.models import load_base_model, resolve_device, safe_adapter
from gs_ray.data import Sample, length_bucketed_batches


class TorchEngine:
    """A plain-torch stand-in for a DeepSpeed engine (AdamW, gradient accumulation)."""

    def __init__(self, model: torch.nn.Module, cfg: TrainingConfig):
        self.module = model
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.accum = max(1, cfg.grad_accum)
        self.micro_steps = 0

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    @property
    def global_steps(self) -> int:
        return self.micro_steps // self.accum


def planned_steps(n_samples: int, cfg: TrainingConfig, world_size: int = 1) -> int:
    """Optimizer steps the loop will take (for progress and schedules)."""
    per_epoch = math.ceil(n_samples / (cfg.batch_size * world_size)) // max(1, cfg.grad_accum)
    total = max(1, per_epoch) * cfg.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def train_adapter(
    engine,
    samples: Sequence[Sample],
    cfg: TrainingConfig,
    pad_id: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train the engine's trainable parameters on ``samples``; returns the loss of every step.

    Each rank takes every world_size-th batch of a seeded, length-bucketed order, so that the
    ranks of a data-parallel run see disjoint data. The loss is the mean of the per-sample mean
    response-token losses (the quantity whose gradients Stage II clusters).
    """
    module = engine.module
    module.train()
    torch.manual_seed(seed * 7919 + rank)  # LoRA dropout draws from the global generator
    device = next(module.parameters()).device
    lengths = np.array([len(s) for s in samples])
    index = np.arange(len(samples))
    losses: list[float] = []
    max_steps = cfg.max_steps or float("inf")
    micro = 0
    for epoch in range(cfg.epochs):
        batches = length_bucketed_batches(lengths, index, cfg.batch_size, 8, seed + epoch)
        usable = len(batches) - len(batches) % world_size
        for b in batches[rank:usable:world_size]:
            batch = collate([samples[i].pair for i in b], pad_id).to(device)
            loss = per_sample_loss(engine, batch).mean()
            engine.backward(loss)
            engine.step()
            micro += 1
            if micro % max(1, cfg.grad_accum) == 0:
                losses.append(float(loss.detach()))
                if on_step is not None:
                    on_step(len(losses), losses[-1])
                if len(losses) >= max_steps:
                    return losses
    return losses


@torch.no_grad()
def mean_loss(
    model: torch.nn.Module, samples: Sequence[Sample], pad_id: int, batch_size: int = 16
) -> float:
    """Mean per-sample response loss of a model over samples (eval mode)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batch = collate([s.pair for s in chunk], pad_id).to(device)
        total += float(per_sample_loss(model, batch).sum())
        n += len(chunk)
    model.train(was)
    return total / max(1, n)


def load_adapters(base_path: str, model_cfg: ModelConfig, adapters: dict[str, str]):
    """One base model with the named peft adapters loaded side by side (``set_adapter`` switches
    between them; ``disable_adapter()`` gives the base model), in eval mode."""
    from peft import PeftModel

    base = load_base_model(base_path, model_cfg, resolve_device(model_cfg.device))
    names = list(adapters)
    model = PeftModel.from_pretrained(base, safe_adapter(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(safe_adapter(adapters[name]), adapter_name=name)
    return model.eval()


@torch.no_grad()
def token_losses(
    model: torch.nn.Module,
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """The model's next-token loss on each response token of each sample (float64 arrays, one
    per sample, in sample order); batches are sorted by length to keep padding low."""
    device = next(model.parameters()).device
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    out: list[np.ndarray] = [np.empty(0)] * len(pairs)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batch = collate([pairs[i] for i in chunk], pad_id).to(device)
        loss, rows = response_token_loss(model, batch)
        loss, rows = loss.double().cpu().numpy(), rows.cpu().numpy()
        for j, i in enumerate(chunk):
            out[i] = loss[rows == j]
    return out


def adapter_losses(
    base_path: str,
    model_cfg: ModelConfig,
    adapters: dict[str, str],
    pairs: Sequence[tuple[list[int], list[int]]],
    pad_id: int,
    batch_size: int = 16,
    base_key: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-sample mean response loss of each named adapter on the same samples: one base model,
    the adapters loaded side by side with peft and switched with ``set_adapter``; with
    ``base_key``, also the base model itself (adapters off) under that key."""
    model = load_adapters(base_path, model_cfg, adapters)

    def mean(losses: list[np.ndarray]) -> np.ndarray:
        return np.array([t.mean() if len(t) else 0.0 for t in losses])

    out = {}
    if base_key is not None:
        with model.disable_adapter():
            out[base_key] = mean(token_losses(model, pairs, pad_id, batch_size))
    for name in adapters:
        model.set_adapter(name)
        out[name] = mean(token_losses(model, pairs, pad_id, batch_size))
    return out
