"""A base model that has learned something: the embedded default's tiny Llama, pretrained once.

tiny-llama starts from random weights (chance: ln 4096 = 8.3 nats per token), so every loss of
a run on it would measure nothing but noise. Before its first use, gs-ray pretrains it, every
weight, on a pretraining part of the demo corpus that no instruction sample occurs in
(``data.demo.pretraining_texts``): plain text, loss on every token, ``model.tiny_pretrain_steps``
AdamW steps. On Ray (``gs-ray run``) it is a Ray Train + DeepSpeed run like the warm-up and the
experts; without Ray (``run_local``, notebooks) the same loop runs in this process.

The result is cached under ``model.cache_dir`` (``models/tiny-llama-pretrained-<key>``), keyed by
the seed, every ``tiny_*`` field and the pretraining texts, and published atomically
(``publish_folder``: written and flushed under a fresh temporary name beside it, then renamed):
later runs with the same settings copy it (about a second) instead of training again, and a
crash never leaves a half-written folder under the cache's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from gs_ray.config import Config, TrainingConfig
from gs_ray.core.models import (
    PRETRAIN_STAMP,
    TINY,
    build_tiny_llama,
    cache_dir,
    materialize_base_model,
    tiny_base_dir,
)
from gs_ray.io import publish_folder

log = logging.getLogger(__name__)


def base_model_for(cfg: Config, folder: str | Path) -> str:
    """The base model of a run (or spectra) folder, as ``materialize_base_model`` returns it:
    for tiny-llama with ``tiny_pretrain_steps``, the pretrained weights (trained once, then
    from the cache), unless the folder already holds its base model."""
    seed, source = cfg.run.seed, None
    saved = (tiny_base_dir(folder) / "config.json").exists()
    if cfg.model.name == TINY and cfg.model.tiny_pretrain_steps and not saved:
        source = pretrained_tiny(cfg, seed)
    return materialize_base_model(cfg.model, folder, seed, source)


def pretraining_corpus(cfg: Config, seed: int) -> list[str]:
    """The pretraining texts (no instruction sample among them; the same for every demo size
    up to ``PRETRAIN_EXCLUDE_SIZE``, so one pretrained model serves them all)."""
    from gs_ray.data.demo import build_demo_corpus, pretraining_texts

    instruction = build_demo_corpus(cfg.data.demo_size, seed) if cfg.data.source == "demo" else []
    return pretraining_texts(cfg.model.tiny_pretrain_records, seed, instruction)


def pretraining_pairs(
    cfg: Config, tokenizer, texts: list[str]
) -> list[tuple[list[int], list[int]]]:
    """The pretraining texts as (ids, labels) pairs with the loss on every token."""
    pairs = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=True)["input_ids"][
            : cfg.model.tiny_pretrain_max_length - 1
        ]
        ids = ids + [tokenizer.eos_token_id]
        pairs.append((ids, list(ids)))
    return pairs


def training_config(cfg: Config) -> TrainingConfig:
    """The pretraining run's settings: one pass at most, ``tiny_pretrain_steps`` steps, one
    worker with two CPUs (the whole of the embedded default's local Ray: nothing else runs yet)."""
    m = cfg.model
    return TrainingConfig(
        epochs=1,
        max_steps=m.tiny_pretrain_steps,
        batch_size=m.tiny_pretrain_batch_size,
        lr=m.tiny_pretrain_lr,
        zero_stage=cfg.warmup.zero_stage,
        num_workers=1,
        cpus_per_worker=max(2.0, cfg.warmup.cpus_per_worker),
        use_gpu=cfg.warmup.use_gpu,
        log_every=50,
        max_failures=cfg.warmup.max_failures,
    )


def cache_key(cfg: Config, seed: int, texts: list[str], on_ray: bool = True) -> str:
    """What the pretrained weights depend on: seed, tiny_* settings (the tokenizer and the model
    follow from them and the seed), the texts, and the engine: Ray Train's DeepSpeed and this
    process's loop do not give the same weights (default settings: loss 1.85 against 1.94 after
    400 steps), so a base trained by one is never reused by the other (a run's figures would
    then depend on which command first filled the cache). Ray Train's key is the one of before
    the engine was part of it: the cached default base model stays valid."""
    tiny = {k: v for k, v in asdict(cfg.model).items() if k.startswith("tiny_")}
    key = [seed, tiny, texts] if on_ray else [seed, tiny, texts, "this process"]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def pretrained_tiny(cfg: Config, seed: int, on_ray: bool | None = None) -> Path:
    """The pretrained tiny Llama's folder in the cache (model and tokenizer), trained first
    if it is not there yet: on Ray Train (``on_ray``; None: when Ray is initialised) or in
    this process."""
    if on_ray is None:
        import ray

        on_ray = ray.is_initialized()
    texts = pretraining_corpus(cfg, seed)
    key = cache_key(cfg, seed, texts, on_ray)
    target = cache_dir(cfg.model) / "models" / f"tiny-llama-pretrained-{key}"
    if _stamped(target):
        return target  # no model built, no tokenizer trained
    model, tokenizer = build_tiny_llama(cfg.model, seed)
    pairs = pretraining_pairs(cfg, tokenizer, texts)
    log.info(
        "pretraining the tiny base model (once; cached in %s): %d texts, %d steps",
        target,
        len(pairs),
        cfg.model.tiny_pretrain_steps,
    )
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="gs-ray-pretrain-") as tmp:
        init = Path(tmp) / "init"
        model.save_pretrained(str(init))
        tokenizer.save_pretrained(str(init))
        trained = Path(tmp) / "trained"
        losses, engine = _train(
            cfg, str(init), str(trained), pairs, seed, tokenizer.pad_token_id, on_ray
        )
        tokenizer.save_pretrained(str(trained))
        record = {
            "key": key,
            "seed": seed,
            "texts": len(pairs),
            "steps": len(losses),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "engine": engine,
            "seconds": time.time() - start,
        }
        (trained / PRETRAIN_STAMP).write_text(json.dumps(record))  # last: marks it complete
        publish_folder(
            target,
            lambda folder: shutil.copytree(trained, folder, dirs_exist_ok=True),
            complete=_stamped,
        )
    log.info(
        "pretrained the tiny base model in %.0f s: loss %.2f -> %.2f (%s)",
        record["seconds"],
        record["first_loss"],
        record["last_loss"],
        engine,
    )
    return target


def _stamped(folder: Path) -> bool:
    """A complete pretrained folder: its record (written last) is there."""
    return (Path(folder) / PRETRAIN_STAMP).is_file()


def _train(cfg: Config, init: str, output: str, pairs: list, seed: int, pad_id: int, on_ray: bool):
    """Full-parameter training: Ray Train + DeepSpeed, or the plain loop in this process."""
    train_cfg = training_config(cfg)
    if on_ray:
        from gs_ray.training.ray_train import AdapterJob, train_on_ray

        with tempfile.TemporaryDirectory(prefix="gs-ray-pretrain-ray-") as storage:
            job = AdapterJob(
                name="pretrain",
                base_path=init,
                output_dir=output,
                samples=pairs,
                seed=seed,
                full_model=True,
            )
            record = train_on_ray(job, cfg.model, cfg.lora, train_cfg, pad_id, storage)
        return record["losses"], f"Ray Train ({record.get('engine')})"
    import torch

    from gs_ray.core.models import load_base_model
    from gs_ray.data import Sample
    from gs_ray.training.loop import TorchEngine, train_adapter

    model = load_base_model(init, cfg.model, torch.device("cpu")).requires_grad_(True)
    engine = TorchEngine(model, train_cfg)
    samples = [Sample(str(i), ids, labels) for i, (ids, labels) in enumerate(pairs)]
    losses = train_adapter(engine, samples, train_cfg, pad_id, seed)
    model.save_pretrained(output)
    return losses, "this process (torch)"
