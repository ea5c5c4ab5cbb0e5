"""Stage I, the warm-up: one LoRA adapter on the warm-up split (paper: a random 5% of the data).

``warmup_ray`` trains it with Ray Train + DeepSpeed (the job); ``warmup_local`` with the plain
torch loop in this process (the reference pipeline).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from gs_ray.core.models import add_lora, load_base_model
from gs_ray.io import write_json
from gs_ray.prepare import Prepared
from gs_ray.rundir import ADAPTER_SHA256, WARMUP, adapter_digest
from gs_ray.training.loop import TorchEngine, mean_loss, train_adapter

log = logging.getLogger(__name__)


def storage_path(p: Prepared) -> str:
    """Ray Train's storage for this run (absolute: every node must reach it)."""
    return str(p.run.ray_train.resolve())


def training_summary(rec: dict[str, Any]) -> dict[str, Any]:
    """The parts of a training record worth keeping in metrics.json."""
    keys = (
        "engine",
        "zero_stage",
        "world_size",
        "device",
        "steps",
        "epochs_done",
        "attempts",
        "deepspeed_init_s",
        "seconds",
        "resumed_from_epoch",
        "run",  # the Ray Train run that trained it (adapters packed into one share its name)
    )
    out = {k: rec.get(k) for k in keys}
    losses = rec.get("losses") or []
    out.update(first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None)
    return out


def warmup_local(p: Prepared) -> Path:
    """Stage I in this process: a plain AdamW loop on the warm-up split; the adapter in peft
    format."""
    cfg = p.cfg
    with p.run.stage(WARMUP) as info:
        model = add_lora(load_base_model(p.base_path, cfg.model), cfg.lora, cfg.run.seed)
        warm = p.subset(p.splits.warmup)
        before = mean_loss(model, warm, p.pad_id)
        losses = train_adapter(
            TorchEngine(model, cfg.warmup), warm, cfg.warmup, p.pad_id, cfg.run.seed
        )
        after = mean_loss(model, warm, p.pad_id)
        model.save_pretrained(str(p.run.warmup_adapter))
        write_json(p.run.warmup_losses, {"train_loss": losses})
        p.run.add_metrics(warmup={"loss_before": before, "loss_after": after, "steps": len(losses)})
        log.info("warm-up: %d steps, loss %.3f -> %.3f", len(losses), before, after)
        info.update(engine="torch", **{ADAPTER_SHA256: adapter_digest(p.run.warmup_adapter)})
    return p.run.warmup_adapter


def warmup_complete(p: Prepared) -> bool:
    """The warm-up adapter is the one the stage trained (RunDirError if not: Stage II's
    gradients would be taken with another adapter)."""
    p.run.check_warmup_adapter()
    return True


def warmup_ray(p: Prepared, resume: bool = False) -> Path:
    """Stage I: the LoRA warm-up as a Ray Train + DeepSpeed run on the warm-up split."""
    from gs_ray.training.ray_train import AdapterJob, train_on_ray

    cfg = p.cfg
    with p.run.stage(WARMUP) as info:
        job = AdapterJob(
            name=WARMUP,
            base_path=p.base_path,
            output_dir=str(p.run.warmup_adapter),
            samples=p.pairs(p.splits.warmup),
            seed=cfg.run.seed,
        )
        rec = train_on_ray(job, cfg.model, cfg.lora, cfg.warmup, p.pad_id, storage_path(p), resume)
        write_json(p.run.warmup_losses, {"train_loss": rec["losses"]})
        p.run.add_metrics(warmup=training_summary(rec))
        info.update(
            engine=rec["engine"],
            zero_stage=rec["zero_stage"],
            world_size=rec["world_size"],
            **{ADAPTER_SHA256: adapter_digest(p.run.warmup_adapter)},
        )
        log.info(
            "warm-up: %s ZeRO-%d, %d steps, loss %.3f -> %.3f",
            rec["engine"],
            rec["zero_stage"],
            rec["steps"],
            rec["losses"][0],
            rec["losses"][-1],
        )
    return p.run.warmup_adapter
