"""LoRA trainings on Ray Train + DeepSpeed: the warm-up (Stage I) and the experts (Stage III).

``train_on_ray(AdapterJob, ...)`` is one Ray Train ``TorchTrainer`` run whose workers build the
model, wrap it with ``deepspeed.initialize`` and run ``gs_ray.training.loop.train_adapter``,
checkpointing the adapter every epoch; ``train_many_on_ray`` trains several adapters (the K
experts and the generalist) packed into as many such runs as the cluster holds at once, each run
training its adapters one after another, each adapter with its own retries. docs/training.md
explains the choices and the measured costs.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import torch

from gs_ray import faults
from gs_ray.config import LoRAConfig, ModelConfig, Pack, TrainingConfig, UseGpu
from gs_ray.core.models import add_lora, load_adapter, load_base_model
from gs_ray.data import Sample
from gs_ray.tracking import without_mlflow
from gs_ray.training.loop import planned_steps, train_adapter

log = logging.getLogger(__name__)


# =========================================================================== Ray Train + DeepSpeed
#
# One Ray Train ``TorchTrainer`` trains one or several adapters, one after another (a worker
# start-up costs 15-40 s, more than a small adapter's training); several trainers' ``fit()``
# calls run in driver threads at once (Ray's placement groups queue what the cluster cannot hold
# yet). See docs/training.md for why, and for the measured costs.

# Ray Train V2's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by
# default), and a worker's checkpoint report and the run's end each wait for the next poll: a
# small adapter's run paid 6-7 s of its 21 s in those waits here (benchmarks/README.md). gs-ray
# sets this interval unless the environment already does; a poll is one actor call per worker.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = 0.2

# Environment a worker must share with the driver (offline hub, caches, the extension cache,
# the poll interval that the fault injection waits out, the planned faults of a test).
FORWARDED_ENV = (
    TRAIN_POLL_ENV,
    faults.ENV,
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "TOKENIZERS_PARALLELISM",
    "TORCH_EXTENSIONS_DIR",
)
_STATE_FILE = "train_state.json"  # per job, in the run's checkpoint: <job>/train_state.json
_RUN_FILE = "run.json"  # the run's jobs, in its checkpoint
_EVENT_TIMES = ("start", "end", "crashed", "failed")
_ATTEMPTS_LOG = "attempts.jsonl"
_PROGRESS_LOG = "progress.jsonl"  # rank 0's step lines, which the driver relays to its console
PROGRESS_EVERY_S = 15.0  # the driver relays at most one progress line per run this often
_ADAPTER_DIR = "adapter"
# A run's folder names (Ray Train's and ``<name>.gs_ray``) stay well under the 255 bytes a file
# name may have.
RUN_NAME_MAX = 160
_LOOP_CONFIG = "loop_config"  # train_loop_config's one key: the loop's config, by reference


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

    Returns the run's record (see ``_run_group``). Raises ``AdapterTrainingError`` (carrying that
    record) when the run failed after ``max_failures`` retries.
    """
    _check_storage_path(storage_path)
    record = _run_group([job], model_cfg, lora_cfg, train_cfg, pad_id, storage_path, resume)
    record = record[job.name]
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
    """Train several adapters (the K experts and the generalist, say); records by job name.

    The jobs are packed into Ray Train runs by ``pack_runs`` (``train_cfg.pack``: ``auto`` puts
    them into as many runs as the cluster holds at once, each run training its adapters one after
    another, so that K adapters pay for a few worker start-ups instead of K; ``off``: one run per
    adapter). ``parallel`` (None: ``train_cfg.parallel`` if the config has it, else True) launches
    every run at once, each ``fit()`` in its own driver thread; the cluster's resources bound how
    many train at a time (a run whose workers do not fit waits for its placement group).
    ``max_concurrent`` caps the number of runs in flight on top of that. An adapter whose
    training fails is retried (``max_failures`` times, from its last checkpoint; the adapters its
    run had finished are kept) and, if it still fails, comes back with ``ok: False`` and its
    error; the other adapters' records are unaffected. ``resume`` continues the runs an earlier
    call left unfinished; a run that had finished is trained again.
    """
    _check_storage_path(storage_path)
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names must be unique, got {names}")
    if parallel is None:
        parallel = bool(getattr(train_cfg, "parallel", True))
    width = 1 if not parallel else max(1, min(len(jobs), max_concurrent or len(jobs)))
    _ensure_ray()
    pack = getattr(train_cfg, "pack", "off")
    slots = len(jobs) if pack == "off" else cluster_slots(train_cfg, resolve_use_gpu(train_cfg))
    runs = min(width, slots)
    # The CPU slots these runs may take at once: the cluster's, or one where they run one after
    # another (parallel false), or max_concurrent's.
    cap = min(slots, max_concurrent or slots) if parallel else 1
    if pack != "off" and cap > 1 and widens(train_cfg):
        # On CPUs, fewer and wider runs where the work is uneven (one large cluster, say, or a
        # single adapter): the cores that a short run would leave idle train the long one.
        costs = [_planned(job, train_cfg) for job in jobs]
        # Even work keeps a run per slot whatever the nodes hold (a cap on the width only makes
        # fewer runs worse): ask the cluster for its free CPUs only where fewer runs than slots
        # would win (uneven work, or fewer adapters than slots).
        if fewest_runs(costs, cap) < cap:
            node = _widest_worker_cpus()
            runs = fewest_runs(costs, cap, int(node // train_cfg.cpus_per_worker))
            train_cfg = widened(train_cfg, cap // runs, node)
        if runs < min(len(jobs), cap):
            log.info(
                "%d adapters in %d run(s) of %g CPUs per worker (the planned steps %s are "
                "uneven: wider runs end sooner than one run per CPU slot)",
                len(jobs), runs, train_cfg.cpus_per_worker, costs,
            )  # fmt: skip
    groups = pack_runs(jobs, train_cfg, runs, pack)

    def run(group: list[AdapterJob]) -> dict[str, dict[str, Any]]:
        if resume and finished_run(storage_path, run_name(group)):
            discard_run(storage_path, run_name(group))
        try:
            return _run_group(group, model_cfg, lora_cfg, train_cfg, pad_id, storage_path, resume)
        except Exception as e:  # set-up or export errors: these jobs fail, the others go on
            log.exception("%s: could not run", run_name(group))
            error = f"{type(e).__name__}: {e}"
            return {j.name: {"name": j.name, "ok": False, "error": error} for j in group}

    if width == 1 or len(groups) == 1:
        out = {k: v for group in groups for k, v in run(group).items()}
    else:
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="gs-ray-train") as pool:
            futures = [pool.submit(run, group) for group in groups]
            out = {k: v for f in futures for k, v in f.result().items()}
    return {name: out[name] for name in names}


def pack_runs(
    jobs: Sequence[AdapterJob], train_cfg: TrainingConfig, runs: int, pack: Pack = "auto"
) -> list[list[AdapterJob]]:
    """The jobs grouped into at most ``runs`` Ray Train runs (``pack="off"``: one each).

    Each job goes to the run with the fewest planned optimizer steps so far, the longest job
    first (longest-processing-time scheduling), so that the runs end close together; a run keeps
    its jobs in the given order. Deterministic: the same jobs and ``runs`` give the same runs
    (a resumed call continues the same Ray Train runs)."""
    if pack == "off" or len(jobs) <= 1:
        return [[job] for job in jobs]
    n = max(1, min(len(jobs), runs))
    _, members = _longest_first([_planned(job, train_cfg) for job in jobs], n)
    return [[jobs[i] for i in sorted(m)] for m in members if m]


def _longest_first(costs: Sequence[int], runs: int) -> tuple[list[int], list[list[int]]]:
    """Longest-processing-time packing: each cost, the longest first, to the run with the least
    so far; (each run's load, each run's indices into ``costs``)."""
    loads, members = [0] * runs, [[] for _ in range(runs)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        g = loads.index(min(loads))
        members[g].append(i)
        loads[g] += costs[i]
    return loads, members


def cluster_slots(train_cfg: TrainingConfig, use_gpu: bool) -> int:
    """How many runs of ``train_cfg``'s shape the connected cluster holds at once, now. A config
    that names a ``worker_resource`` targets a node type the autoscaler adds: no bound then."""
    import ray

    if train_cfg.worker_resource:
        return 1 << 30
    total = ray.cluster_resources()
    per_run = worker_resources(train_cfg, use_gpu)
    return max(
        1, min(int(total.get(k, 0.0) // (v * train_cfg.num_workers)) for k, v in per_run.items())
    )


# A worker's extra CPU is one more torch thread, which trains a small model far less than a core's
# worth faster: on the embedded default, 2 threads trained the generalist 1.32-1.38x as fast as
# one (57.3 -> 43.4 s, 2026-12-04; 0.134 -> 0.097 s a step, 2026-12-05). fewest_runs counts each
# extra CPU of a worker as this share of one, so that it widens a run only where the cores would
# otherwise idle, not where they are shared evenly.
EXTRA_THREAD_GAIN = 0.35
FREE_CPU_SETTLE_S = 2.0  # _widest_worker_cpus


def fewest_runs(costs: Sequence[int], runs: int, widest: int | None = None) -> int:
    """How many of ``runs`` Ray Train runs (each of one CPU slot) to pack adapters of ``costs``
    (planned steps) into, when a run of fewer may take the others' slots (``widened``).

    A run of ``m`` slots is taken to train ``1 + EXTRA_THREAD_GAIN (m - 1)`` times as fast as a
    run of one (``m`` capped at ``widest``, the slots of the largest node); the runs are packed
    as ``pack_runs`` packs them; the count whose longest run ends first wins, ties to the most
    runs. So even work keeps one run per slot, and one large adapter beside small ones (a
    dominant cluster) gets every slot in one run instead of leaving the others' cores idle."""
    n = len(costs)
    runs = max(1, min(runs, n))
    if n <= 1:
        return 1

    def makespan(r: int) -> float:
        m = runs // r if widest is None else max(1, min(runs // r, widest))
        return max(_longest_first(costs, r)[0]) / (1.0 + EXTRA_THREAD_GAIN * (m - 1))

    return min(range(runs, 0, -1), key=makespan)  # the first minimum: the most runs


def widens(train_cfg: TrainingConfig) -> bool:
    """Whether a run of ``train_cfg`` may take more CPUs than it asks for (``widened``): CPU runs,
    not GPU ones, and not runs on a node type's resource (``worker_resource``), which the
    autoscaler adds per run."""
    return not train_cfg.worker_resource and not resolve_use_gpu(train_cfg)


def widened(train_cfg: TrainingConfig, slots: int, node_cpus: float) -> TrainingConfig:
    """``train_cfg`` for a run that takes ``slots`` runs' CPU slots: each worker asks for the
    CPUs of that many, up to ``node_cpus`` (the largest node's), and trains on as many threads;
    never fewer than it asked for."""
    cpus = int(min(train_cfg.cpus_per_worker * max(1, slots), node_cpus))
    if cpus <= train_cfg.cpus_per_worker:
        return train_cfg
    return replace(train_cfg, cpus_per_worker=float(cpus))


def _widest_worker_cpus() -> float:
    """The CPUs one widened worker may ask for now: the largest node's, and no more than the
    cluster has free (a Serve deployment or another job holding CPUs would leave a wider
    worker waiting for them)."""
    import ray

    _ensure_ray()
    node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
    # Actors killed just before (Stage II's, a run that just ended) give their CPUs back a moment
    # later: wait up to FREE_CPU_SETTLE_S for them before settling for fewer.
    deadline = time.monotonic() + FREE_CPU_SETTLE_S
    free = ray.available_resources().get("CPU", 0.0)
    while free < node and time.monotonic() < deadline:
        time.sleep(0.2)
        free = ray.available_resources().get("CPU", 0.0)
    return min(node, free)


def alone_on_the_cluster(train_cfg: TrainingConfig) -> TrainingConfig:
    """``train_cfg`` for a run that trains while every other waits for it (a single adapter, or
    the generalist that the experts start from). On CPUs each of its workers takes the CPUs of
    all the runs the cluster holds at once (``cluster_slots``), up to what the largest node has,
    and trains on that many threads, so that the cores do not idle; GPU runs and runs on a node
    type's resource (``worker_resource``) are left as they are."""
    _ensure_ray()
    if not widens(train_cfg):
        return train_cfg
    return widened(train_cfg, cluster_slots(train_cfg, use_gpu=False), _widest_worker_cpus())


def run_name(jobs: Sequence[AdapterJob]) -> str:
    """The Ray Train run (and folder) name of a group of jobs: their names joined by ``+``; a
    longer join (many adapters in one run, say a one-GPU cluster's K experts) is the first name,
    the count of the others and a digest of them all, since a folder name has at most 255
    bytes. The same jobs always give the same name (a resumed call finds its run)."""
    joined = "+".join(job.name for job in jobs)
    if len(joined.encode()) <= RUN_NAME_MAX:
        return joined
    digest = hashlib.sha256(joined.encode()).hexdigest()[:16]
    first = jobs[0].name.encode()[: RUN_NAME_MAX // 2].decode(errors="ignore")
    return f"{first}+{len(jobs) - 1}-more-{digest}"


def _planned(job: AdapterJob, train_cfg: TrainingConfig) -> int:
    if job.max_steps is not None:
        train_cfg = replace(train_cfg, max_steps=job.max_steps)
    return planned_steps(len(job.samples), train_cfg, train_cfg.num_workers)


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
    value = train_cfg.use_gpu
    if value not in get_args(UseGpu):  # a config built in code, past the load-time check
        raise ValueError(f"use_gpu: expected auto | true | false, got {value!r}")
    if value != "auto":
        return value == "true"
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


def finished_run(storage_path: str, name: str) -> bool:
    """True when Ray Train's folder for run ``name`` holds a checkpoint in which every adapter
    of the run had finished (its last epoch, or its ``max_steps``)."""
    for path in Path(storage_path, name).glob(f"checkpoint_*/{_RUN_FILE}"):
        jobs = json.loads(path.read_text())["jobs"]
        if all(_job_state(path.parent, job).get("finished") for job in jobs):
            return True
    return False


def discard_run(storage_path: str, name: str) -> None:
    """Forget an earlier run of that name (its checkpoints and gs-ray's bookkeeping)."""
    shutil.rmtree(Path(storage_path, name), ignore_errors=True)
    shutil.rmtree(_marker_dir(storage_path, name), ignore_errors=True)


def _marker_dir(storage_path: str, name: str) -> Path:
    """Our own bookkeeping next to Ray's run folder (attempts log, fault-injection markers)."""
    return Path(storage_path) / f"{name}.gs_ray"


def _job_state(folder: Path, job: str) -> dict[str, Any]:
    """One adapter's position in a run's checkpoint folder ({} before its first epoch)."""
    path = folder / job / _STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _run_group(
    jobs: Sequence[AdapterJob],
    model_cfg: ModelConfig,
    lora_cfg: LoRAConfig,
    train_cfg: TrainingConfig,
    pad_id: int,
    storage_path: str,
    resume: bool = False,
) -> dict[str, dict[str, Any]]:
    """One TorchTrainer that trains ``jobs`` one after another, to the end; a record per job,
    never raising for a failed training.

    A record: name, ok, error, output_dir, run (the Ray Train run's name), attempts and
    attempt_history (the run's attempts that trained this job; per attempt: start and end,
    crashed or failed, wall clock from rank 0), start/end/seconds (this job's first start and
    last event); and when it succeeded, from the rank-0 worker: engine (class name of the running
    engine), zero_stage (as the engine reports it), world_size, device, losses (one per optimizer
    step, mean over ranks, across attempts), steps, epochs_done, resumed_from_epoch,
    deepspeed_init_s, worker_start/train_start/train_end (its last attempt), checkpoint.

    Ray Train retries a failed attempt; the retry resumes the job that failed from its last
    epoch checkpoint and skips the jobs already finished. A job that failed in more than
    ``max_failures`` attempts is given up and the run goes on with the next.
    """
    import ray.train

    from gs_ray.training.process_group import LoopbackTorchConfig, TorchTrainerWithoutDatasets

    _ensure_ray()
    os.environ.setdefault(TRAIN_POLL_ENV, str(TRAIN_POLL_S))  # read by the controller it starts
    use_gpu = resolve_use_gpu(train_cfg)
    max_failures = int(train_cfg.max_failures)
    name = run_name(jobs)
    markers = _marker_dir(storage_path, name)
    if not resume:  # Ray Train V2 would otherwise restore an earlier run of the same name
        discard_run(storage_path, name)
    markers.mkdir(parents=True, exist_ok=True)
    (markers / _ATTEMPTS_LOG).write_text("")  # the attempts of this call
    loop_config = {
        "jobs": list(jobs),
        "model_cfg": model_cfg,
        "lora_cfg": lora_cfg,
        "train_cfg": train_cfg,
        "pad_id": int(pad_id),
        "markers": str(markers),
        "env": {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
    }
    # The loop's config reaches the workers through the object store: Ray Train also gives
    # train_loop_config to its controller, which unpickled gs-ray's jobs there and so imported
    # torch, transformers and peft for nothing (about 2 s of CPU per run, and the samples).
    payload = {_LOOP_CONFIG: ray.put(loop_config)}
    # Every job may fail max_failures + 1 times, and the attempt after its last failure skips it.
    retries = max_failures if len(jobs) == 1 else len(jobs) * (max_failures + 1)
    trainer = TorchTrainerWithoutDatasets(
        _train_loop,
        train_loop_config=payload,
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=train_cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(train_cfg, use_gpu),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=retries),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    start = time.time()
    what = (
        f"{len(jobs[0].samples)} samples"
        if len(jobs) == 1
        else (f"{len(jobs)} adapters one after another: {', '.join(j.name for j in jobs)}")
    )
    log.info("%s: Ray Train run starting (%s)", name, what)
    (markers / _PROGRESS_LOG).write_text("")
    relay = ProgressRelay(markers / _PROGRESS_LOG)
    stop = threading.Event()
    watcher = threading.Thread(target=relay.run, args=(stop,), daemon=True)
    watcher.start()
    try:
        result = trainer.fit()
        error = result.error  # Train V2 raises, but check anyway
    except Exception as e:  # TrainingFailedError after the retries, or a controller error
        result, error = None, e
    finally:
        stop.set()
        watcher.join(timeout=5)
    end = time.time()
    events = _read_events(markers / _ATTEMPTS_LOG)
    checkpoint = result.checkpoint if result is not None else None
    records = {}
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        for job in jobs:
            history = _attempts_of(events, job.name)
            record: dict[str, Any] = {
                "name": job.name,
                "ok": False,
                "error": None,
                "output_dir": str(job.output_dir),
                "run": name,
                "attempts": len(history),
                "attempt_history": history,
            }
            times = [t for a in history for k, t in a.items() if k in _EVENT_TIMES]
            first, last = (min(times), max(times)) if times else (start, end)
            record.update(start=first, end=last, seconds=last - first)
            state = _job_state(folder, job.name) if folder else {}
            if not state.get("finished"):
                failures = [a.get("error") or _why(a) for a in history if "end" not in a]
                reason = (
                    failures[-1]
                    if failures
                    else (f"{type(error).__name__}: {error}" if error else "no checkpoint reported")
                )
                record["error"] = reason
                log.error("%s: failed after %d attempt(s): %s", job.name, len(history), reason)
            else:
                record.update(state["result"], ok=True, checkpoint=checkpoint.path)
                _export_adapter(folder / job.name / _ADAPTER_DIR, Path(job.output_dir))
                losses = record["losses"] or [float("nan")]
                log.info(
                    "%s: done in %.1fs, %d steps, loss %.4f -> %.4f, %d attempt(s)",
                    job.name,
                    record["seconds"],
                    len(record["losses"]),
                    losses[0],
                    losses[-1],
                    record["attempts"],
                )
            records[job.name] = record
    return records


class ProgressRelay:
    """The driver's progress lines of a run: the workers' step lines (rank 0 appends them to the
    run's ``progress.jsonl``) are logged here, the newest at most every ``every`` seconds, so
    that a long training shows on the console (where only the driver's lines go) as it goes."""

    def __init__(self, path: Path, every: float = PROGRESS_EVERY_S):
        self.path, self.every, self.offset = path, every, 0

    def poll(self) -> str | None:
        """The newest step line written since the last poll, as a console line (None: none)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return None
        end = chunk.rfind(b"\n") + 1  # whole lines only: a line may be half written
        if not end:
            return None
        self.offset += end
        last = json.loads(chunk[:end].splitlines()[-1])
        return f"{last['job']}: step {last['step']}/{last['planned']} loss {last['loss']:.4f}"

    def run(self, stop: threading.Event) -> None:
        while not stop.wait(self.every):
            line = self.poll()
            if line:
                log.info(line)


def _why(attempt: dict[str, Any]) -> str:
    if "crashed" in attempt:
        return f"the worker process died at step {attempt.get('step')}"
    return "the attempt ended before this adapter finished (a worker died or was killed)"


def _export_adapter(source: Path, target: Path) -> None:
    """Copy a checkpoint's peft adapter folder to ``target`` (replacing what was there)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def _log_attempt(path: Path, **event: Any) -> None:
    """Append one event to the run's attempts log: an attempt's start (no job), or a job's
    start / end / crash / failure within an attempt."""
    with path.open("a") as f:
        f.write(json.dumps(event) + "\n")


def _read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_attempts(path: Path, job: str | None = None) -> list[dict[str, Any]]:
    """One dict per attempt: attempt, start, and end, crashed (+ step) or failed (+ error);
    wall-clock seconds, written by rank 0. ``job``: that job's events in each attempt that
    trained it (None: the attempts themselves)."""
    return _attempts_of(_read_events(path), job)


def _attempts_of(events: list[dict[str, Any]], job: str | None) -> list[dict[str, Any]]:
    attempts: dict[int, dict[str, Any]] = {}
    for event in events:
        if event.get("job") == job:
            fields = {k: v for k, v in event.items() if k != "job"}
            attempts.setdefault(event["attempt"], {"attempt": event["attempt"]}).update(fields)
    return [attempts[k] for k in sorted(attempts)]


# --------------------------------------------------------------------------- worker side


def _train_loop(config: dict[str, Any]) -> None:
    """The Ray Train worker loop: one attempt of a run, which trains the run's jobs that are not
    finished yet (from the last checkpoint) one after another, each logged in the attempts log."""
    import ray.train
    import ray.train.torch

    worker_start = time.time()
    config = ray.get(config[_LOOP_CONFIG])
    os.environ.update(config["env"])
    _worker_logging()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    jobs: list[AdapterJob] = config["jobs"]
    attempts_log = Path(config["markers"]) / _ATTEMPTS_LOG
    max_failures = int(config["train_cfg"].max_failures)
    # Rank 0 decides the attempt's number and which jobs to give up; every rank follows.
    plan: list[Any] = [None, None]
    if rank == 0:
        events = _read_events(attempts_log)
        attempt = 1 + max((e["attempt"] for e in events), default=0)
        failed = {j.name: sum("end" not in a for a in _attempts_of(events, j.name)) for j in jobs}
        plan = [attempt, sorted(n for n, k in failed.items() if k > max_failures)]
        _log_attempt(attempts_log, attempt=attempt, start=worker_start)
    if world > 1:
        torch.distributed.broadcast_object_list(plan, src=0)
    attempt, given_up = plan
    device = ray.train.torch.get_device()
    if device.type != "cuda":
        torch.set_num_threads(max(1, int(config["train_cfg"].cpus_per_worker)))
    # This attempt's copy of the run's checkpoint: the adapters done so far and the one in
    # progress; every epoch reports the whole folder (LoRA adapters are small).
    work = Path(tempfile.mkdtemp(prefix="gs-ray-run-"))
    try:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is not None:
            with checkpoint.as_directory() as folder:
                shutil.copytree(folder, work, dirs_exist_ok=True)
        (work / _RUN_FILE).write_text(json.dumps({"jobs": [j.name for j in jobs]}))
        for job in jobs:
            state = _job_state(work, job.name)
            if state.get("finished"):
                continue
            if job.name in given_up:
                if rank == 0:
                    log.error(
                        "%s: failed in more than %d attempt(s), given up", job.name, max_failures
                    )
                continue
            if rank == 0:
                _log_attempt(attempts_log, attempt=attempt, job=job.name, start=time.time())
            try:
                _train_job(job, config, work, state, rank, world, attempt, device, worker_start)
            except BaseException as e:
                if rank == 0:
                    _log_attempt(
                        attempts_log,
                        attempt=attempt,
                        job=job.name,
                        failed=time.time(),
                        error=repr(e)[:500],
                    )
                raise
            if rank == 0:
                _log_attempt(attempts_log, attempt=attempt, job=job.name, end=time.time())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if rank == 0:
        _log_attempt(attempts_log, attempt=attempt, end=time.time())


def _train_job(
    job: AdapterJob,
    config: dict[str, Any],
    work: Path,
    state: dict[str, Any],
    rank: int,
    world: int,
    attempt: int,
    device: torch.device,
    worker_start: float,
) -> None:
    """One job: model, DeepSpeed engine, resume from its last epoch checkpoint, the epochs, a
    checkpoint of the run's folder after each (the last one marks the job finished)."""
    model_cfg: ModelConfig = config["model_cfg"]
    train_cfg: TrainingConfig = config["train_cfg"]
    if job.max_steps is not None:
        train_cfg = replace(train_cfg, max_steps=job.max_steps)
    pad_id: int = config["pad_id"]
    markers = Path(config["markers"])
    cuda = device.type == "cuda"
    samples = _as_samples(job.samples)

    # Where to start: this job's last epoch checkpoint (a retry), else the job's adapter / fresh.
    load_cfg = model_cfg if cuda else replace(model_cfg, dtype="float32")
    base = load_base_model(job.base_path, load_cfg, device)
    saved = work / job.name / _ADAPTER_DIR
    if state:
        if job.full_model:
            model = load_base_model(str(saved), load_cfg, device)
        else:
            model = load_adapter(base, saved, trainable=True)
    elif job.full_model:
        model = base
    elif job.init_adapter:
        model = load_adapter(base, job.init_adapter, trainable=True)
    else:
        model = add_lora(base, config["lora_cfg"], job.seed)
    if job.full_model:
        model.requires_grad_(True)
    resumed_from = int(state.get("epoch", 0))
    losses: list[float] = list(state.get("losses", []))

    engine, init_s = _deepspeed_engine(model, train_cfg, model_cfg, world, cuda)
    planned = planned_steps(len(samples), train_cfg, world)
    if rank == 0:
        origin = f"checkpoint (epoch {resumed_from})" if state else job.init_adapter
        if job.full_model and not state:
            origin = f"every weight of {job.base_path}"
        log.info(
            "%s: attempt %d, %s ZeRO-%d, world size %d on %s, from %s, %d steps planned "
            "(DeepSpeed init %.1fs)",
            job.name,
            attempt,
            type(engine).__name__,
            engine.zero_optimization_stage(),
            world,
            device,
            origin or "a fresh LoRA",
            planned,
            init_s,
        )

    def on_step(step: int, loss: float) -> None:
        losses.append(_mean_over_ranks(loss, device, world))
        if rank == 0 and len(losses) % max(1, train_cfg.log_every) == 0:
            log.info("%s: step %d/%d loss %.4f", job.name, len(losses), planned, losses[-1])
            with (markers / _PROGRESS_LOG).open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "job": job.name,
                            "step": len(losses),
                            "planned": planned,
                            "loss": losses[-1],
                            "t": time.time(),
                        }
                    )
                    + "\n"
                )
        if rank == 0 and fault_plan:  # step: within the epoch (train_adapter runs one epoch)
            _crash_if_planned(fault_plan, markers, job.name, epoch, step, len(losses), attempt)

    fault_plan = faults.parse()  # fault injection (tests); empty unless GS_RAY_FAULTS is set
    train_start = time.time()
    for epoch in range(resumed_from, train_cfg.epochs):  # on_step reads `epoch`
        remaining = (train_cfg.max_steps or 10**12) - len(losses)
        if remaining <= 0:
            break
        # One epoch per call, seeded seed + epoch: the same batch order as one multi-epoch call.
        one_epoch = replace(train_cfg, epochs=1, max_steps=remaining)
        train_adapter(engine, samples, one_epoch, pad_id, job.seed + epoch, rank, world, on_step)
        done = epoch + 1 >= train_cfg.epochs or len(losses) >= (train_cfg.max_steps or 10**12)
        state = {"epoch": epoch + 1, "losses": losses, "finished": done}
        if done:
            state["result"] = {
                "engine": type(engine).__name__,
                "zero_stage": int(engine.zero_optimization_stage()),
                "world_size": world,
                "device": str(device),
                "losses": losses,
                "steps": len(losses),
                "epochs_done": epoch + 1,
                "resumed_from_epoch": resumed_from,
                "deepspeed_init_s": init_s,
                "worker_start": worker_start,
                "train_start": train_start,
                "train_end": time.time(),
            }
        _report_epoch(engine, rank, work, job.name, state)
        if done:
            break
    del engine, model, base
    gc.collect()


def import_deepspeed():
    """DeepSpeed (and ``deepspeed.ops``), imported without the MLflow that its autotuner loads
    where MLflow is installed (``tracking.without_mlflow``): the workers never log to MLflow,
    and the import costs them most of a second."""
    with without_mlflow():
        import deepspeed
        import deepspeed.ops  # noqa: F401 - _skip_shm_comm reads it
    return deepspeed


def _deepspeed_engine(
    model, train_cfg: TrainingConfig, model_cfg: ModelConfig, world: int, cuda: bool
):
    """``deepspeed.initialize`` with a torch AdamW (DeepSpeed's own Adam would JIT-compile
    ``fused_adam``); on CPU the shared-memory all-reduce op is skipped (see _skip_shm_comm)."""
    deepspeed = import_deepspeed()
    if not cuda and os.environ.get("GS_RAY_DS_SHM_COMM", "0") != "1":
        _skip_shm_comm(deepspeed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    start = time.perf_counter()
    engine, *_ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        config=deepspeed_config(train_cfg, model_cfg, world, cuda),
    )
    return engine, time.perf_counter() - start


def _skip_shm_comm(deepspeed) -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (``shm_comm``: 55-150 s
    on a machine whose extension cache is empty): gloo, which Ray Train has already set up, does
    the all-reduce instead. GS_RAY_DS_SHM_COMM=1 lets DeepSpeed build (once, then cached under
    TORCH_EXTENSIONS_DIR) and use it."""
    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False


def _report_epoch(engine, rank: int, work: Path, job: str, state: dict[str, Any]) -> None:
    """Every rank reports (a barrier); rank 0 saves the job's adapter and position into the
    run's folder and attaches the whole folder as the checkpoint."""
    import ray.train

    losses = state["losses"]
    metrics = {
        "job": job,
        "epoch": state["epoch"],
        "step": len(losses),
        "loss": losses[-1] if losses else float("nan"),
    }
    if rank != 0:
        ray.train.report(metrics)
        return
    engine.module.save_pretrained(str(work / job / _ADAPTER_DIR))
    (work / job / _STATE_FILE).write_text(json.dumps(state))
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(work)))


def _mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float32, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / world


def _crash_if_planned(
    fault_plan, markers: Path, name: str, epoch: int, t: int, step: int, attempt: int
) -> None:
    """Fault injection (``gs_ray.faults``, ``trainer:<job>:<epoch>:<t>``): die hard, once,
    after step t of that epoch (``step``: counted from the job's start, for the attempts log; a
    marker file lets the retry pass this point).

    It waits one Ray Train poll interval first: Train V2 registers a reported checkpoint when
    the controller next polls the worker (every TRAIN_POLL_ENV seconds: Ray's default 2 s, or
    TRAIN_POLL_S as gs-ray sets it), so a process that dies sooner after ``report`` loses that
    checkpoint, and the retry starts over.
    """
    if not faults.fires(fault_plan, "trainer", name, epoch, t, markers):
        return
    time.sleep(float(os.environ.get(TRAIN_POLL_ENV, 2.0)) + 1.0)
    log.warning("%s: fault injection, the worker process exits at step %d", name, step)
    _log_attempt(markers / _ATTEMPTS_LOG, attempt=attempt, job=name, crashed=time.time(), step=step)
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
