"""Typed configuration: one dataclass per concern, one `Config` that holds them all.

The same objects drive the Python API, YAML files and the command line:

    cfg = load_config("run.yaml", ["--clustering.beta", "0.9", "--model.name", "smollm2-135m"])

Every field carries a one-line help text (``metadata["help"]``) that the CLI prints. Unknown keys,
in YAML or on the command line, are an error that names the key. Defaults follow the paper where
it gives a value (LoRA r=32, warm-up 5%, variance thresholds 0.80-0.95, alpha in [5, 10]) and are
small where a 2-core machine needs it (the embedded default model and corpus).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" reads best here
    """A dataclass field with a default (copied if mutable) and a one-line help text."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names it."""


@dataclass
class DataConfig:
    """Where the instruction data comes from, how it is templated and split."""

    source: str = _f(
        "demo", "'demo' (built-in corpus), a .jsonl/.json/.parquet path, or a HF dataset name"
    )
    hf_split: str = _f("train", "split to read when `source` is a Hugging Face dataset")
    format: str = _f("auto", "record format: auto | alpaca | prompt_response | messages")
    instruction_field: str = _f("instruction", "alpaca format: field with the instruction")
    input_field: str = _f("input", "alpaca format: optional field with extra input")
    output_field: str = _f("output", "alpaca format: field with the target response")
    prompt_field: str = _f("prompt", "prompt_response format: field with the prompt")
    response_field: str = _f("response", "prompt_response format: field with the response")
    messages_field: str = _f("messages", "messages format: field with the chat turns")
    domain_field: str = _f(
        "domain", "optional metadata field with a source label (evaluation only)"
    )
    template: str = _f(
        "### Instruction:\n{prompt}\n\n### Response:\n",
        "prompt template; {prompt} is the instruction (plus input); the loss covers the response only",
    )
    max_length: int = _f(256, "maximum tokens per sample (prompt + response)")
    overflow: str = _f("truncate", "over-long samples: 'truncate' the response's tail, or 'drop'")
    max_samples: int | None = _f(None, "read at most this many rows (None: all)")
    demo_size: int = _f(2400, "number of samples in the built-in demo corpus")
    test_fraction: float = _f(0.1, "held-out test split (evaluation only)")
    warmup_fraction: float = _f(
        0.05, "share of the training split used for the LoRA warm-up (paper: 5%)"
    )
    n_val: int = _f(256, "validation subset whose gradients choose K and the initial centroids")


@dataclass
class ModelConfig:
    """The base causal LM."""

    name: str = _f(
        "tiny-llama",
        "'tiny-llama' (embedded default, random init), 'smollm2-135m', or a HF path / hub id",
    )
    dtype: str = _f("float32", "weights dtype: float32 | bfloat16 | float16")
    device: str = _f("auto", "auto | cpu | cuda")
    attn_implementation: str = _f("sdpa", "attention kernel: sdpa | eager")
    cache_dir: str = _f("~/.cache/gs_ray", "where converted models and tokenizers are cached")
    tiny_hidden_size: int = _f(128, "tiny-llama: hidden size")
    tiny_num_layers: int = _f(4, "tiny-llama: decoder layers")
    tiny_num_heads: int = _f(4, "tiny-llama: attention heads")
    tiny_vocab_size: int = _f(4096, "tiny-llama: BPE vocabulary trained on the demo corpus")


@dataclass
class LoRAConfig:
    """The LoRA adapter (peft) whose parameters span the gradient space."""

    r: int = _f(32, "LoRA rank (paper: 32)")
    alpha: int = _f(64, "LoRA alpha (scaling = alpha / r)")
    dropout: float = _f(0.05, "LoRA dropout while training (off when taking gradients)")
    target_modules: list[str] = _f(["q_proj", "v_proj"], "module names that get adapters")


@dataclass
class TrainingConfig:
    """One LoRA training run (Ray Train + DeepSpeed)."""

    epochs: int = _f(3, "passes over the training data")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (None: no limit)")
    batch_size: int = _f(8, "micro-batch per worker")
    grad_accum: int = _f(1, "gradient accumulation steps")
    lr: float = _f(1e-3, "learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    zero_stage: int = _f(2, "DeepSpeed ZeRO stage (0-2)")
    num_workers: int = _f(1, "Ray Train workers per run")
    cpus_per_worker: float = _f(1, "CPUs per Ray Train worker")
    use_gpu: str = _f("auto", "auto | true | false")
    log_every: int = _f(10, "log a loss line every N steps")
    max_failures: int = _f(2, "Ray Train retries of a failed run (the other runs are not redone)")


@dataclass
class WarmupConfig(TrainingConfig):
    """Stage I: the LoRA warm-up on the warm-up split."""


@dataclass
class ExpertConfig(TrainingConfig):
    """Stage III: one LoRA expert per cluster, trained from the warm-up adapter."""

    epochs: int = _f(2, "passes over the cluster's data")
    parallel: bool = _f(True, "train the K experts concurrently")


@dataclass
class GradientConfig:
    """The per-sample gradient engine."""

    batch_size: int = _f(16, "samples per forward/backward")
    bucket_window: int = _f(
        8, "length bucketing: sort by length within windows of this many batches"
    )
    projection_dim: int | None = _f(None, "random projection (ELREA/LESS baseline); None: full dim")
    torch_threads: int | None = _f(None, "torch threads per gradient worker (None: CPUs it holds)")


@dataclass
class ClusteringConfig:
    """Stage II: the GradientSpace clusterer (SVD + silhouette init, online EMA refinement)."""

    n_clusters: int | None = _f(None, "fix K; None: choose K by SVD + silhouette")
    k_min: int = _f(2, "smallest K tried")
    k_max: int = _f(8, "largest K tried")
    variance_thresholds: list[float] = _f([0.80, 0.85, 0.90, 0.95], "explained-variance thresholds")
    alpha: int = _f(5, "cluster cache size = alpha * batch_size (paper: 5-10)")
    beta: float = _f(0.9, "EMA factor: c <- beta * c + (1 - beta) * mean(cache)")
    batch_size: int = _f(32, "|B_t|: samples per online update")
    max_epochs: int = _f(3, "online calibration epochs at most")
    tol: float = _f(1e-3, "stop when the largest centroid shift (1 - cosine) falls below this")
    kmeans_n_init: int = _f(10, "K-means restarts per candidate")
    k_selection: str = _f("silhouette", "silhouette (paper, default) | tune (Ray Tune over K)")


@dataclass
class Stage2Config:
    """Distributed Stage II: gradient workers and the centroid actor."""

    num_workers: int | None = _f(None, "gradient workers (None: one per GPU, else one per CPU)")
    cpus_per_worker: float = _f(1, "CPUs per gradient worker (CPU clusters)")
    max_in_flight: int = _f(2, "gradient batches in flight per worker (backpressure)")
    checkpoint_every: int = _f(20, "centroid-actor checkpoint interval, in batches")
    transport: str = _f("gradients", "gradients (exact) | partial_sums (workers assign, send sums)")


@dataclass
class TuneConfig:
    """K chosen with Ray Tune (clustering.k_selection = tune)."""

    k_values: list[int] = _f([2, 3, 4, 5], "candidate K values, one trial each")
    n_samples: int = _f(600, "training samples whose gradients the trials cluster")
    holdout_fraction: float = _f(0.25, "share of those held out to score the routed experts")
    expert_max_steps: int = _f(20, "optimizer steps per expert inside a trial")
    max_concurrent_trials: int = _f(2, "trials at once")


@dataclass
class RouterConfig:
    """The router: a frozen encoder and a linear head over K."""

    encoder: str = _f("all-MiniLM-L6-v2", "encoder: 'all-MiniLM-L6-v2' (bundled) or a HF path / id")
    max_length: int = _f(128, "encoder max tokens")
    epochs: int = _f(200, "head training epochs (full batch)")
    lr: float = _f(1e-2, "head learning rate")
    holdout_fraction: float = _f(0.2, "share of assigned samples held out for router accuracy")


@dataclass
class ServeConfig:
    """Ray Serve deployment of the router and the experts."""

    host: str = _f("127.0.0.1", "HTTP host the Serve proxy binds to (0.0.0.0 to expose it)")
    port: int = _f(8000, "HTTP port")
    route_prefix: str = _f("/", "URL prefix of the gs-ray application")
    api_docs: bool = _f(
        False, "serve the interactive API docs (/docs, /redoc, /openapi.json); off by default"
    )
    max_new_tokens: int = _f(64, "generation length when a request names none")
    max_new_tokens_limit: int = _f(512, "largest max_new_tokens a request may ask for")
    max_batch_size: int = _f(8, "requests the router and each expert replica batch together")
    batch_wait_s: float = _f(0.01, "how long a replica waits to fill a batch")
    expert_replicas: int = _f(1, "replicas of the experts deployment (each holds all K adapters)")
    expert_max_replicas: int | None = _f(
        None, "autoscale the experts deployment up to this many replicas (None: fixed count)"
    )
    expert_gpus: float | None = _f(
        None, "GPUs per experts replica (None: 1 if the cluster has GPUs)"
    )
    expert_cpus: float = _f(1.0, "CPUs per experts replica")
    router_cpus: float = _f(0.5, "CPUs per router replica")
    device: str = _f("auto", "torch device of the experts replicas: auto | cpu | cuda")


@dataclass
class RunConfig:
    """The run as a whole."""

    output_dir: str = _f("runs", "where run directories go")
    name: str | None = _f(None, "run directory name (None: timestamp)")
    seed: int = _f(0, "master seed: data splits, initialisation, shuffles")
    ray_address: str | None = _f(
        None, "Ray cluster address (None: connect if RAY_ADDRESS is set, else local)"
    )
    num_cpus: int | None = _f(None, "CPUs for a locally started Ray (None: all)")
    until: str | None = _f(
        None, "stop after this stage: warmup | stage2 | experts | router (None: all)"
    )


@dataclass
class Config:
    """The whole configuration of a gs-ray run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    clustering: ClusteringConfig = field(default_factory=ClusteringConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    experts: ExpertConfig = field(default_factory=ExpertConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the configuration as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build from a nested dict; unknown keys and ill-typed values raise ConfigError."""
        return _build(cls, data, prefix="")


# --------------------------------------------------------------------------- building and checking


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against the annotation `typ`; allow int -> float and scalar -> list."""
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``--section.key value`` (or ``--section.key=value``) pairs; values parse as YAML."""
    data = cfg.to_dict()
    i = 0
    while i < len(overrides):
        token = overrides[i]
        if not token.startswith("--"):
            raise ConfigError(f"expected --section.key, got '{token}'")
        if "=" in token:
            key, raw = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"'{token}' needs a value")
            key, raw = token[2:], overrides[i + 1]
            i += 2
        parts = key.replace("-", "_").split(".")
        node = data
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"unknown config key '{'.'.join(parts[: depth + 1])}'")
            node = node[part]
        if parts[-1] not in node:
            # Let _build produce the error message with a suggestion.
            node[parts[-1]] = None
        node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return Config.from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then command-line overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        try:
            cfg = Config.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e
    if overrides:
        cfg = apply_overrides(cfg, overrides)
    return cfg


def help_lines(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per leaf field: ``--section.key (default): help``."""
    lines = []
    for f in dataclasses.fields(cls):
        typ = _field_types(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            lines += help_lines(typ, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  --{prefix}{f.name} ({default!r}): {f.metadata.get('help', '')}")
    return lines
