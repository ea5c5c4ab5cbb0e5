"""LoRA trainings on Ray Train + DeepSpeed: the warm-up (Stage I) and the experts (Stage III).

``train_on_ray(AdapterJob, ...)`` is one Ray Train ``TorchTrainer`` run whose workers build the
model, wrap it with ``deepspeed.initialize`` and run ``gs_ray.training.loop.train_adapter``,
checkpointing the adapter every epoch; ``train_many_on_ray`` runs the K experts as K such runs at
once, each with its own retries. docs/training.md explains the choices and the measured costs.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from gs_ray.config import LoRAConfig, ModelConfig, TrainingConfig
from gs_ray.core.models import add_lora, load_adapter, load_base_model
from gs_ray.data import Sample
from gs_ray.training.loop import planned_steps, train_adapter

log = logging.getLogger(__name__)


# =========================================================================== Ray Train + DeepSpeed
#
# One LoRA training run is one Ray Train ``TorchTrainer``; the K experts are K trainers whose
# ``fit()`` calls run in driver threads at once (Ray's placement groups queue what the cluster
# cannot hold yet). See docs/training.md for why, and for the measured costs.

# Environment a worker must share with the driver (offline hub, caches, the extension cache).
FORWARDED_ENV = (
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",
)
_STATE_FILE = "train_state.json"
_ATTEMPTS_LOG = "attempts.jsonl"
_ADAPTER_DIR = "adapter"


@dataclass
class AdapterJob:
    """One LoRA training run (the warm-up, or one expert)."""

    name: str
    """Run name: "warmup", "expert_0", ...; also the run's folder under storage_path."""
    base_path: str
    """Base model path or hub id, loadable by ``load_base_model`` on every worker."""
    output_dir: str
    """Where the final adapter goes (peft format: ``PeftModel.from_pretrained`` loads it)."""
    samples: list
    """Training data: (input_ids, labels) pairs (``Sample.pair``) or ``Sample`` objects."""
    init_adapter: str | None = None
    """None: a fresh LoRA (``add_lora``, seeded); else a peft adapter folder to start from."""
    seed: int = 0
    """LoRA initialisation and batch order (epoch e uses seed + e, as ``train_adapter``)."""
    cluster: int | None = None
    """The cluster an expert is trained for (None for the warm-up)."""
    max_steps: int | None = None
    """This job's step limit in place of the training config's (None: the config's)."""
    full_model: bool = False
    """Train every weight of the base model (pretraining) instead of a LoRA adapter; the output
    folder is then a whole model (``load_base_model`` loads it)."""
    fail_once_at_step: int | None = None
    """Fault injection for tests: the first attempt's rank-0 worker process dies (``os._exit``)
    after this optimizer step; a marker file under the run folder keeps the retry alive."""


def train_on_ray(
    job: AdapterJob,
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    train_cfg: TrainingConfig,
    pad_id: int,
    storage_path: str,
    resume: bool = False,
) -> dict[str, Any]:
    """Train one LoRA adapter with Ray Train + DeepSpeed; the adapter lands in job.output_dir.

    Ray Train keeps the run under ``storage_path/job.name`` (an absolute path every node can
    reach). ``resume=False`` deletes what an earlier run of that name left there and starts over;
    ``resume=True`` continues from its last checkpoint (after a driver crash, say).

    Returns the run's record (see ``_run_job``). Raises ``AdapterTrainingError`` (carrying that
    record) when the run failed after ``max_failures`` retries.
    """
    record = _run_job(job, model_cfg, lora_cfg, train_cfg, pad_id, storage_path, resume)
    if not record["ok"]:
        raise AdapterTrainingError(record)
    return record


def train_many_on_ray(
    jobs: Sequence[AdapterJob],
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    train_cfg: TrainingConfig,
    pad_id: int,
    storage_path: str,
    parallel: bool | None = None,
    max_concurrent: int | None = None,
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """Train several adapters (the K experts), each its own Ray Train run; records by job name.

    ``parallel`` (None: ``train_cfg.parallel`` if the config has it, else True) launches every
    run at once, each ``fit()`` in its own driver thread; the cluster's resources bound how many
    train at a time (a run whose workers do not fit waits for its placement group).
    ``max_concurrent`` caps the number of runs in flight on top of that. A run that fails is
    retried on its own (``max_failures``) and, if it still fails, comes back with ``ok: False``
    and its error; the other runs' records are unaffected. ``resume`` as in ``train_on_ray``.
    """
    _check_storage_path(storage_path)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    if parallel is None:
        parallel = bool(getattr(train_cfg, "parallel", True))
    width = 1 if not parallel else max(1, min(len(jobs), max_concurrent or len(jobs)))
    _ensure_ray()

    def run(job: AdapterJob) -> dict[str, Any]:
        try:
            return _run_job(job, model_cfg, lora_cfg, train_cfg, pad_id, storage_path, resume)
        except Exception as e:  # set-up or export errors: this job fails, the others go on
            log.exception("%s: could not run", job.name)
            return {"name": job.name, "ok": False, "error": f"{type(e).__name__}: {e}"}

    if width == 1:
        return {job.name: run(job) for job in jobs}
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="gs-ray-train") as pool:
        futures = {job.name: pool.submit(run, job) for job in jobs}
        return {name: f.result() for name, f in futures.items()}


class AdapterTrainingError(RuntimeError):
    """A LoRA training run failed after its retries; ``.record`` holds what is known of it."""

    def __init__(self, record: dict[str, Any]):
        super().__init__(f"training run {record['name']!r} failed: {record['error']}")
        self.record = record


# --------------------------------------------------------------------------- driver side


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        from gs_ray.ray_utils import init_ray

        init_ray()


def resolve_use_gpu(train_cfg: TrainingConfig) -> bool:
    """train.use_gpu: true | false | auto (GPU when the connected cluster has GPUs)."""
    value = str(train_cfg.use_gpu).lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    if value != "auto":
        raise ValueError(f"use_gpu: expected auto | true | false, got {train_cfg.use_gpu!r}")
    from gs_ray.ray_utils import cluster_has_gpu

    _ensure_ray()
    return cluster_has_gpu()


def worker_resources(train_cfg: TrainingConfig, use_gpu: bool) -> dict[str, float]:
    """What each Ray Train worker of a run asks for: its CPUs, a GPU when ``use_gpu``, and one
    unit of ``worker_resource`` when set (a node type's resource: the autoscaler adds nodes)."""
    out = {"CPU": float(train_cfg.cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    if train_cfg.worker_resource:
        out[train_cfg.worker_resource] = 1.0
    return out


def deepspeed_config(
    train_cfg: TrainingConfig, model_cfg: ModelConfig, world_size: int, cuda: bool
) -> dict[str, Any]:
    """The DeepSpeed config of a run: ZeRO stage, micro-batch and accumulation from the config;
    bf16/fp16 only on CUDA and only when model.dtype asks for it (CPU trains in float32)."""
    if train_cfg.zero_stage not in (0, 1, 2):
        # ZeRO-3 partitions the parameters themselves: saving the adapter and the loss path
        # (which calls the decoder directly) would need gathering first.
        raise ValueError(f"zero_stage: expected 0, 1 or 2, got {train_cfg.zero_stage}")
    accum = max(1, train_cfg.grad_accum)
    return {
        "train_micro_batch_size_per_gpu": train_cfg.batch_size,
        "gradient_accumulation_steps": accum,
        "train_batch_size": train_cfg.batch_size * accum * world_size,
        "zero_optimization": {"stage": int(train_cfg.zero_stage)},
        "bf16": {"enabled": cuda and model_cfg.dtype == "bfloat16"},
        "fp16": {"enabled": cuda and model_cfg.dtype == "float16"},
        "steps_per_print": 10**9,  # our own loss lines instead
        "wall_clock_breakdown": False,
    }


def _check_storage_path(storage_path: str) -> None:
    if not os.path.isabs(storage_path):
        raise ValueError(f"storage_path must be an absolute path (Ray Train), got {storage_path!r}")


def finished_run(storage_path: str, name: str, train_cfg: TrainingConfig) -> bool:
    """True when Ray Train's folder for run ``name`` holds a checkpoint taken at its end (the
    last epoch, or ``max_steps`` reached)."""
    for path in Path(storage_path, name).glob(f"checkpoint_*/{_STATE_FILE}"):
        state = json.loads(path.read_text())
        steps = len(state.get("losses", []))
        if state.get("epoch", 0) >= train_cfg.epochs or (
            train_cfg.max_steps and steps >= train_cfg.max_steps
        ):
            return True
    return False


def discard_run(storage_path: str, name: str) -> None:
    """Forget an earlier run of that name (its checkpoints and gs-ray's bookkeeping)."""
    shutil.rmtree(Path(storage_path, name), ignore_errors=True)
    shutil.rmtree(_marker_dir(storage_path, name), ignore_errors=True)


def _marker_dir(storage_path: str, name: str) -> Path:
    """Our own bookkeeping next to Ray's run folder (attempt counter, fault-injection marker)."""
    return Path(storage_path) / f"{name}.gs_ray"


def _run_job(
    job: AdapterJob,
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    train_cfg: TrainingConfig,
    pad_id: int,
    storage_path: str,
    resume: bool = False,
) -> dict[str, Any]:
    """Run one TorchTrainer to the end; the record of the run, never raising for a failed run.

    The record: name, ok, error, output_dir, attempts, attempt_history (per attempt: start and
    end, crashed or failed; wall clock, from rank 0), start/end/seconds (driver, wall clock); and
    when it succeeded, from the rank-0 worker: engine (class name of the running engine),
    zero_stage (as the engine reports it), world_size, device, losses (one per optimizer step,
    mean over ranks, across attempts), steps, epochs_done, resumed_from_epoch,
    deepspeed_init_s, worker_start/train_start/train_end (last attempt, wall clock), checkpoint.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from gs_ray.training.process_group import LoopbackTorchConfig

    _check_storage_path(storage_path)
    _ensure_ray()
    use_gpu = resolve_use_gpu(train_cfg)
    max_failures = int(train_cfg.max_failures)
    markers = _marker_dir(storage_path, job.name)
    if not resume:  # Ray Train V2 would otherwise restore an earlier run of the same name
        shutil.rmtree(Path(storage_path) / job.name, ignore_errors=True)
        shutil.rmtree(markers, ignore_errors=True)
    markers.mkdir(parents=True, exist_ok=True)
    (markers / _ATTEMPTS_LOG).write_text("")  # the attempts of this call
    resources = worker_resources(train_cfg, use_gpu)
    loop_config = {
        "job": job,
        "model_cfg": model_cfg,
        "lora_cfg": lora_cfg,
        "train_cfg": train_cfg,
        "pad_id": int(pad_id),
        "markers": str(markers),
        "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop_config,
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=job.name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    record: dict[str, Any] = {
        "name": job.name,
        "ok": False,
        "error": None,
        "output_dir": str(job.output_dir),
    }
    start = time.time()
    log.info("%s: Ray Train run starting (%d samples)", job.name, len(job.samples))
    try:
        result = trainer.fit()
        error = result.error  # Train V2 raises, but check anyway
    except Exception as e:  # TrainingFailedError after the retries, or a controller error
        result, error = None, e
    end = time.time()
    history = _read_attempts(markers / _ATTEMPTS_LOG)
    record.update(start=start, end=end, seconds=end - start)
    record.update(attempts=len(history), attempt_history=history)
    if error is not None or result is None or result.checkpoint is None:
        record["error"] = f"{type(error).__name__}: {error}" if error else "no checkpoint reported"
        log.error(
            "%s: failed after %d attempt(s): %s", job.name, record["attempts"], record["error"]
        )
        return record
    record.update(result.return_value or {})
    record.update(ok=True, checkpoint=result.checkpoint.path)
    _export_adapter(result.checkpoint, Path(job.output_dir))
    losses = record.get("losses") or [float("nan")]
    log.info(
        "%s: done in %.1fs, %d steps, loss %.4f -> %.4f, %d attempt(s)",
        job.name, record["seconds"], len(record.get("losses", [])), losses[0], losses[-1],
        record["attempts"],
    )  # fmt: skip
    return record


def _export_adapter(checkpoint, target: Path) -> None:
    """Copy the checkpoint's peft adapter folder to ``target`` (replacing what was there)."""
    with checkpoint.as_directory() as folder:
        source = Path(folder) / _ADAPTER_DIR
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(source, tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)


def _log_attempt(path: Path, **event: Any) -> None:
    """Append one event (start / end / crash of an attempt) to the run's attempts log."""
    with path.open("a") as f:
        f.write(json.dumps(event) + "\n")


def _read_attempts(path: Path) -> list[dict[str, Any]]:
    """One dict per attempt: attempt, start, and end, crashed (+ step) or failed (+ error);
    wall-clock seconds, written by rank 0."""
    attempts: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            event = json.loads(line)
            attempts.setdefault(event["attempt"], {"attempt": event["attempt"]}).update(event)
    return [attempts[k] for k in sorted(attempts)]


# --------------------------------------------------------------------------- worker side


def _train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker loop: one attempt of a run, logged in the run's attempts log."""
    import ray.train

    worker_start = time.time()
    os.environ.update(config["env"])
    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    attempts_log = Path(config["markers"]) / _ATTEMPTS_LOG
    attempt = len(_read_attempts(attempts_log)) + (1 if rank == 0 else 0)
    if rank == 0:
        _log_attempt(attempts_log, attempt=attempt, start=worker_start)
    try:
        out = _train_attempt(config, rank, world, attempt)
    except BaseException as e:
        if rank == 0:
            _log_attempt(attempts_log, attempt=attempt, failed=time.time(), error=repr(e)[:500])
        raise
    if rank == 0:
        _log_attempt(attempts_log, attempt=attempt, end=out["train_end"])
    return {**out, "worker_start": worker_start}


def _train_attempt(config: dict[str, Any], rank: int, world: int, attempt: int) -> dict[str, Any]:
    """Model, DeepSpeed engine, resume from the last checkpoint, the epochs, the checkpoints."""
    import ray.train
    import ray.train.torch

    job: AdapterJob = config["job"]
    model_cfg: ModelConfig = config["model_cfg"]
    train_cfg: TrainingConfig = config["train_cfg"]
    if job.max_steps is not None:
        train_cfg = replace(train_cfg, max_steps=job.max_steps)
    pad_id: int = config["pad_id"]
    markers = Path(config["markers"])
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(max(1, int(train_cfg.cpus_per_worker)))
    samples = _as_samples(job.samples)

    # Where to start: the last checkpoint of this run (a retry), else the job's adapter / fresh.
    state = {"epoch": 0, "losses": []}
    checkpoint = ray.train.get_checkpoint()
    load_cfg = model_cfg if cuda else replace(model_cfg, dtype="float32")
    base = load_base_model(job.base_path, load_cfg, device)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = json.loads((Path(folder) / _STATE_FILE).read_text())
            if job.full_model:
                model = load_base_model(str(Path(folder) / _ADAPTER_DIR), load_cfg, device)
            else:
                model = load_adapter(base, Path(folder) / _ADAPTER_DIR, trainable=True)
    elif job.full_model:
        model = base
    elif job.init_adapter:
        model = load_adapter(base, job.init_adapter, trainable=True)
    else:
        model = add_lora(base, config["lora_cfg"], job.seed)
    if job.full_model:
        model.requires_grad_(True)
    resumed_from = int(state["epoch"])
    losses: list[float] = list(state["losses"])

    engine, init_s = _deepspeed_engine(model, train_cfg, model_cfg, world, cuda)
    planned = planned_steps(len(samples), train_cfg, world)
    if rank == 0:
        origin = f"checkpoint (epoch {resumed_from})" if checkpoint else job.init_adapter
        if job.full_model and not checkpoint:
            origin = f"every weight of {job.base_path}"
        log.info(
            "%s: attempt %d, %s ZeRO-%d, world size %d on %s, from %s, %d steps planned "
            "(DeepSpeed init %.1fs)",
            job.name, attempt, type(engine).__name__, engine.zero_optimization_stage(), world,
            device, origin or "a fresh LoRA", planned, init_s,
        )  # fmt: skip

    def on_step(step: int, loss: float) -> None:
        losses.append(_mean_over_ranks(loss, device, world))
        if rank == 0 and len(losses) % max(1, train_cfg.log_every) == 0:
            log.info("%s: step %d/%d loss %.4f", job.name, len(losses), planned, losses[-1])
        if rank == 0 and len(losses) == job.fail_once_at_step:
            _crash_once(markers, job.name, len(losses), attempt)

    train_start = time.time()
    epochs_done = resumed_from
    for epoch in range(resumed_from, train_cfg.epochs):
        remaining = (train_cfg.max_steps or 10**12) - len(losses)
        if remaining <= 0:
            break
        # One epoch per call, seeded seed + epoch: the same batch order as one multi-epoch call.
        one_epoch = replace(train_cfg, epochs=1, max_steps=remaining)
        train_adapter(engine, samples, one_epoch, pad_id, job.seed + epoch, rank, world, on_step)
        epochs_done = epoch + 1
        _report_epoch(engine, rank, epochs_done, losses)
    return {
        "engine": type(engine).__name__,
        "zero_stage": int(engine.zero_optimization_stage()),
        "world_size": world,
        "device": str(device),
        "losses": losses,
        "steps": len(losses),
        "epochs_done": epochs_done,
        "resumed_from_epoch": resumed_from,
        "deepspeed_init_s": init_s,
        "train_start": train_start,
        "train_end": time.time(),
    }


def _deepspeed_engine(
    model, train_cfg: TrainingConfig, model_cfg: ModelConfig, world: int, cuda: bool
):
    """``deepspeed.initialize`` with a torch AdamW (DeepSpeed's own Adam would JIT-compile
    ``fused_adam``); on CPU the shared-memory all-reduce op is skipped (see _skip_shm_comm)."""
    import deepspeed

    if not cuda and os.environ.get("GS_RAY_DS_SHM_COMM", "0") != "1":
        _skip_shm_comm()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    start = time.perf_counter()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(train_cfg, model_cfg, world, cuda),
    )
    return engine, time.perf_counter() - start


def _skip_shm_comm() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (``shm_comm``: 55-150 s
    on a machine whose extension cache is empty): gloo, which Ray Train has already set up, does
    the all-reduce instead. GS_RAY_DS_SHM_COMM=1 lets DeepSpeed build (once, then cached under
    TORCH_EXTENSIONS_DIR) and use it."""
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def _report_epoch(engine, rank: int, epoch: int, losses: list[float]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the adapter and the position."""
    import ray.train

    metrics = {"epoch": epoch, "step": len(losses), "loss": losses[-1] if losses else float("nan")}
    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix="gs-ray-ckpt-") as folder:
        engine.module.save_pretrained(str(Path(folder) / _ADAPTER_DIR))
        state = {"epoch": epoch, "losses": losses}
        (Path(folder) / _STATE_FILE).write_text(json.dumps(state))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _crash_once(markers: Path, name: str, step: int, attempt: int) -> None:
    """Fault injection: die hard, once (a marker file lets the retry pass this point).

    It waits one Ray Train poll interval first: Train V2 registers a reported checkpoint when
    the controller next polls the worker (every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a
    process that dies sooner after ``report`` loses that checkpoint, and the retry starts over.
    """
    marker = markers / "fault_injected"
    if marker.exists():
        return
    marker.write_text(str(step))
    time.sleep(float(os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", 2.0)) + 1.0)
    log.warning("%s: fault injection, the worker process exits at step %d", name, step)
    _log_attempt(markers / _ATTEMPTS_LOG, attempt=attempt, crashed=time.time(), step=step)
    logging.shutdown()
    os._exit(1)


def _as_samples(items: Sequence) -> list[Sample]:
    """(input_ids, labels) pairs or Samples -> Samples (what ``train_adapter`` takes)."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, Sample):
            out.append(item)
        else:
            ids, labels = item
            out.append(Sample(id=str(i), input_ids=list(ids), labels=list(labels)))
    return out


def _worker_logging() -> None:
    """Our INFO lines reach the worker's log (and the driver, with log_to_driver)."""
    logger = logging.getLogger("gs_ray")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
