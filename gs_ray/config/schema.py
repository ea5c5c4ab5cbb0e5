"""What a gs-ray configuration is: one dataclass per concern, one ``Config`` that holds them all,
each field with its default, a one-line help text (``metadata["help"]``, which the CLI prints) and
its checks (``_f``), and the choices as ``Literal`` types. ``gs_ray.config.loader`` loads and
checks it; ``gs_ray.config`` exports both."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

# Choices (Literal types, checked when a config loads); each is defined here once.
Transport = Literal["gradients", "partial_sums", "collective"]
# The transports that send every gradient row whole to the centroid actor (what gradient
# consumers and the local reference need); stage2.transports.Transport.whole_gradients says the
# same of each and is checked against this.
WHOLE_GRADIENT_TRANSPORTS: tuple[Transport, ...] = ("gradients",)
ProjectionKind = Literal["rademacher", "countsketch"]  # core.gradients.RandomProjection
RouterKind = Literal["encoder", "tfidf"]  # routing.router.ROUTERS
RowDtype = Literal["float32", "bfloat16"]
NonFinitePolicy = Literal["fail", "skip"]
#: G-SNR utility (docs/selection.md): ``energy`` ||mean g||^2 / mean ||g_m - mean||^2 (default),
#: ``coordinate`` the mean over coordinates of mu_j^2 / var_j.
GSNRForm = Literal["energy", "coordinate"]
#: ``gs-ray spectra``: subset B's responses as read (``as_is``), or only the text after the last
#: "####" (``final_answer``: GSM8K's bare answer without the worked reasoning).
SpectraResponse = Literal["as_is", "final_answer"]

#: What ``gs-ray eval`` compares (docs/evaluation.md says what each one is).
EvalMethod = Literal[
    "base",
    "warmup",
    "single_lora",
    "single_lora_matched",
    "random_clusters",
    "embedding_kmeans",
    "merged",
    "elrea",
    "gradientspace",
    "gradientspace_nofallback",
    "gradientspace_oracle",
    "gradientspace_ensemble",
]

#: How ``gs-ray select`` scores the pool (docs/selection.md): GIST, a LESS-style baseline, random.
SelectionMethod = Literal["gist", "less", "random", "gsnr"]  # selection.consumers.SELECTORS
#: The selectors that can ride Stage II's gradient stream (``stage2.consumers``): those that read
#: the run's own LoRA gradients (G-SNR needs an ensemble's, so it runs only as ``gs-ray select``).
StreamSelector = Literal["gist", "less", "random"]

#: The pipeline's stages in order (``run.until`` takes one of them).
StageName = Literal[
    "warmup", "tune", "stage2", "routability", "experts", "router", "calibrate", "evaluate"
]  # pipeline.STAGES

#: After Stage II: ``merge`` joins the clusters that a router trained on the prompts cannot tell
#: apart (routing/routability.py), ``off`` keeps Stage II's partition exactly (the paper).
Routability = Literal["merge", "off"]
Pack = Literal["auto", "off"]  # training.ray_train.pack_runs
#: Where each expert starts (``Config.expert_start``): the run's generalist (one LoRA on every
#: training row, trained first) where the run has one, the warm-up adapter (the paper), or auto.
ExpertInit = Literal["auto", "warmup", "generalist"]
UseGpu = Literal["auto", "true", "false"]  # training.ray_train.resolve_use_gpu
#: The tracking URIs gs-ray takes (tracking.mlflow, MLFLOW_TRACKING_URI), by scheme: a local file
#: store (the ``tracking`` extra, mlflow-skinny), a database (the full ``mlflow`` package), a
#: tracking server, Databricks; a URI with no scheme is a local folder, a file store.
TrackingScheme = Literal[
    "file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks"
]
TRACKING_OFF = "off"  # tracking.mlflow: no tracking, even where MLFLOW_TRACKING_URI is set

# A torch device as the config names it: auto, cpu, cuda or cuda:N.
_DEVICE = r"auto|cpu|cuda(:\d+)?"


def _f(default: Any, help: str, **check: Any) -> Any:  # noqa: A002 - "help" reads best here
    """A dataclass field with a default (copied if mutable), a one-line help text and its checks:
    ``ge`` / ``gt`` / ``le`` / ``lt`` (numbers, or each item of a list), ``pattern`` (a regular
    expression the whole string must match), ``nonempty`` (a list)."""
    unknown = set(check) - _CHECKS
    assert not unknown, f"unknown field checks {unknown}"
    metadata = {"help": help, **check}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_CHECKS = {"ge", "gt", "le", "lt", "pattern", "nonempty"}


def _worker_resource(who: str) -> Any:
    """A custom Ray resource that each of ``who`` also asks one unit of (hard): the node type's
    GPU-like resource in ``cluster_config``, which the autoscaler adds nodes for."""
    return _f(
        "",
        f"a custom Ray resource each {who} also asks one unit of (a node type's GPU-like "
        "resource in cluster_config; the autoscaler adds nodes for it); empty: none",
        pattern=r"([\w.-]+)?",
    )


#: Record formats of one source. ``text``: a plain-text file cut into documents at ``separator``
#: (fields ``text``, ``head`` = its first sentence, ``tail`` = the rest); ``lines``: one record per
#: line, split at ``separator`` into ``columns``.
SourceFormat = Literal["auto", "alpaca", "prompt_response", "messages", "text", "lines"]


@dataclass
class MixSource:
    """One source of a data mix (``data.source: mix``): where, how to read it, how many rows."""

    source: str = _f("", "a .jsonl/.json/.parquet/.txt path or a HF dataset name", pattern=r".+")
    domain: str = _f("", "the source's label (evaluation and reports only)", pattern=r"[\w.-]+")
    format: SourceFormat = _f(
        "auto",
        "auto | alpaca | prompt_response | messages (field names as in data.*_field) | "
        "text | lines",
    )
    prompt: str | None = _f(
        None, "prompt built from the record's fields, e.g. '{question}' (None: from the format)"
    )
    response: str | None = _f(
        None, "response built from the record's fields, e.g. '{answer}' (None: from the format)"
    )
    separator: str = _f(
        "\n\n", "text: the string between documents; lines: the string between columns"
    )
    columns: list[str] = _f(["text"], "lines: the field names of the columns, in order")
    encoding: str = _f("utf-8", "text encoding of a .txt file (e.g. iso-8859-1)")
    hf_split: str = _f("train", "split to read when `source` is a Hugging Face dataset")
    max_samples: int | None = _f(
        None, "take this many records, drawn at random by the run seed (None: all)", ge=1
    )


@dataclass
class DataConfig:
    """Where the instruction data comes from, how it is templated and split."""

    source: str = _f(
        "demo",
        "'demo' (built-in corpus), a .jsonl/.json/.parquet path, a HF dataset name, or "
        "'mix' (the sources listed in data.mix)",
    )
    mix: list[MixSource] = _f([], "data.source 'mix': the sources, each with its domain label")
    hf_split: str = _f("train", "split to read when `source` is a Hugging Face dataset")
    format: Literal["auto", "alpaca", "prompt_response", "messages"] = _f(
        "auto",
        "record format of the whole source: auto (decided by its first record) | alpaca "
        "| prompt_response | messages",
    )
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
        "prompt template; {prompt} is the instruction (plus input); the loss covers the response "
        "only",
    )
    max_length: int = _f(256, "maximum tokens per sample (prompt + response)", ge=8)
    overflow: Literal["truncate", "drop"] = _f(
        "truncate", "over-long samples: 'truncate' the response's tail, or 'drop'"
    )
    max_samples: int | None = _f(None, "read at most this many rows (None: all)", ge=1)
    demo_size: int = _f(2400, "number of samples in the built-in demo corpus", ge=4)
    test_fraction: float = _f(0.1, "held-out test split (evaluation only)", ge=0, lt=1)
    warmup_fraction: float = _f(
        0.05, "share of the training split used for the LoRA warm-up (paper: 5%)", gt=0, lt=1
    )
    n_val: int = _f(
        256, "validation subset whose gradients choose K and the initial centroids", ge=2
    )


@dataclass
class ModelConfig:
    """The base causal LM."""

    name: str = _f(
        "tiny-llama",
        "'tiny-llama' (embedded default, random init), 'smollm2-135m', or a HF path / hub id",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", "weights dtype: float32 | bfloat16 | float16"
    )
    device: str = _f("auto", "auto | cpu | cuda | cuda:N", pattern=_DEVICE)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = _f(
        "sdpa", "attention kernel: sdpa | eager | flash_attention_2"
    )
    cache_dir: str = _f("~/.cache/gs_ray", "where converted models and tokenizers are cached")
    tiny_hidden_size: int = _f(128, "tiny-llama: hidden size", ge=1)
    tiny_num_layers: int = _f(4, "tiny-llama: decoder layers", ge=1)
    tiny_num_heads: int = _f(4, "tiny-llama: attention heads", ge=1)
    tiny_vocab_size: int = _f(4096, "tiny-llama: BPE vocabulary trained on the demo corpus", ge=64)
    tiny_pretrain_steps: int = _f(
        400,
        "tiny-llama: full-parameter pretraining steps on a disjoint part of the demo corpus, "
        "once per seed, tiny_* settings and engine (Ray Train or this process), cached "
        "(400: ~2.3 nats, chance is 8.3; 0: random weights)",
        ge=0,
    )
    tiny_pretrain_records: int = _f(
        8000,
        "tiny-llama: demo records generated for pretraining (before removing any that the "
        "instruction corpus holds)",
        ge=16,
    )
    tiny_pretrain_batch_size: int = _f(16, "tiny-llama: pretraining batch size", ge=1)
    tiny_pretrain_lr: float = _f(3e-3, "tiny-llama: pretraining learning rate (AdamW)", gt=0)
    tiny_pretrain_max_length: int = _f(256, "tiny-llama: pretraining tokens per text", ge=8)


@dataclass
class LoRAConfig:
    """The LoRA adapter (peft) whose parameters span the gradient space."""

    r: int = _f(32, "LoRA rank (paper: 32)", ge=1)
    alpha: int = _f(64, "LoRA alpha (scaling = alpha / r)", gt=0)
    dropout: float = _f(0.05, "LoRA dropout while training (off when taking gradients)", ge=0, lt=1)
    target_modules: list[str] = _f(
        ["q_proj", "v_proj"], "module names that get adapters", nonempty=True
    )


@dataclass
class TrainingConfig:
    """One LoRA training run (Ray Train + DeepSpeed)."""

    epochs: int = _f(3, "passes over the training data", ge=1)
    max_steps: int | None = _f(None, "stop after this many optimizer steps (None: no limit)", ge=1)
    batch_size: int = _f(8, "micro-batch per worker", ge=1)
    grad_accum: int = _f(1, "gradient accumulation steps", ge=1)
    lr: float = _f(1e-3, "learning rate (AdamW)", gt=0)
    weight_decay: float = _f(0.0, "AdamW weight decay", ge=0)
    zero_stage: Literal[0, 1, 2] = _f(2, "DeepSpeed ZeRO stage: 0 | 1 | 2")
    num_workers: int = _f(1, "Ray Train workers per run", ge=1)
    cpus_per_worker: float = _f(1, "CPUs per Ray Train worker", gt=0)
    use_gpu: UseGpu = _f("auto", "auto | true | false")
    worker_resource: str = _worker_resource("Ray Train worker")
    log_every: int = _f(10, "log a loss line every N steps", ge=1)
    max_failures: int = _f(
        2, "Ray Train retries of a failed run (the other runs are not redone)", ge=0
    )


@dataclass
class WarmupConfig(TrainingConfig):
    """Stage I: the LoRA warm-up on the warm-up split."""


@dataclass
class ExpertConfig(TrainingConfig):
    """Stage III: one LoRA expert per cluster, trained from the generalist or the warm-up
    adapter (``init``)."""

    epochs: int = _f(2, "passes over the cluster's data", ge=1)
    init: ExpertInit = _f(
        "auto",
        "auto: generalist where the run has one (fallback.enabled), else warmup | generalist: "
        "the run's generalist trains first and each expert refines it on its cluster | warmup: "
        "each expert starts from the warm-up adapter (the paper)",
    )
    parallel: bool = _f(True, "train the K experts concurrently")
    pack: Pack = _f(
        "auto",
        "auto: the adapters share as many Ray Train runs as the cluster holds at once, "
        "each run training its adapters one after another (the same adapters, fewer worker "
        "start-ups; with worker_resource set, one run per adapter, for the autoscaler to add "
        "nodes) | off: one run per adapter",
    )


@dataclass
class GradientConfig:
    """The per-sample gradient engine."""

    batch_size: int = _f(16, "samples per forward/backward", ge=1)
    bucket_window: int = _f(
        8, "length bucketing: sort by length within windows of this many batches", ge=1
    )
    projection_dim: int | None = _f(
        None, "random projection (ELREA/LESS baseline); None: full dim", ge=1
    )
    projection_kind: ProjectionKind = _f(
        "rademacher", "random projection: dense +-1 ('rademacher') or sparse ('countsketch')"
    )
    torch_threads: int | None = _f(
        None, "torch threads per gradient worker (None: CPUs it holds)", ge=1
    )
    prompt_mix_below: int = _f(
        0,
        "a sample whose response has fewer tokens than this gets the gradient row "
        "unit(g_response) + unit(g_prompt), the prompt's own language-modelling gradient, so that "
        "a one-token answer (a label) does not dominate it; 0: off (the paper)",
        ge=0,
    )


@dataclass
class ClusteringConfig:
    """Stage II: the GradientSpace clusterer (SVD + silhouette init, online EMA refinement)."""

    n_clusters: int | None = _f(None, "fix K; None: choose K by SVD + silhouette", ge=1)
    k_min: int = _f(1, "smallest K tried (1: a one-cluster answer is possible)", ge=1)
    k_max: int = _f(8, "largest K tried (>= k_min)", ge=1)
    variance_thresholds: list[float] = _f(
        [0.80, 0.85, 0.90, 0.95],
        "explained-variance thresholds, each in (0, 1]",
        gt=0,
        le=1,
        nonempty=True,
    )
    alpha: int = _f(5, "cluster cache size = alpha * batch_size (paper: 5-10)", ge=1)
    beta: float = _f(0.9, "EMA factor: c <- beta * c + (1 - beta) * mean(cache)", ge=0, lt=1)
    batch_size: int = _f(32, "|B_t|: samples per online update", ge=1)
    max_epochs: int = _f(3, "online calibration epochs at most", ge=1)
    tol: float = _f(
        0.01,
        "converged when at most this share of an epoch's samples changed cluster",
        ge=0,
        le=1,
    )
    kmeans_n_init: int = _f(10, "K-means runs per candidate, each scored by the same rule", ge=1)
    min_cluster_size: int = _f(4, "a cluster must have at least this many samples ...", ge=1)
    min_cluster_share: float = _f(0.01, "... and at least this share of the samples", ge=0, lt=1)
    min_silhouette: float = _f(
        0.0,
        "extra floor: a K >= 2 also needs at least this cosine silhouette (0: the "
        "structureless reference, null_draws, governs; with null_draws = 0 the only rule)",
        ge=-1,
        le=1,
    )
    k_selection: Literal["silhouette", "tune"] = _f(
        "silhouette", "silhouette (paper, default) | tune (Ray Tune over K)"
    )
    routability: Routability = _f(
        "merge",
        "merge: join clusters a prompt router confuses (default) | off: the paper's "
        "partition, unchanged",
    )
    routability_target: float = _f(
        0.95,
        "merge until the cross-validated router agreement reaches this (or K = 1)",
        gt=0,
        le=1,
    )
    routability_folds: int = _f(5, "cross-validation folds of the routability check", ge=2)
    null_draws: int = _f(4, "structureless reference data sets for K selection (0: none)", ge=0)
    null_margin: float = _f(4.0, "K >= 2 needs silhouette > reference + this many sd", ge=0)


@dataclass
class Stage2Config:
    """Distributed Stage II: gradient workers and the centroid actor."""

    num_workers: int | None = _f(
        None, "gradient workers (None: one per GPU, else one per CPU)", ge=1
    )
    cpus_per_worker: float = _f(1, "CPUs per gradient worker (CPU clusters)", gt=0)
    max_in_flight: int = _f(2, "gradient batches in flight per worker (backpressure)", ge=1)
    checkpoint_every: int = _f(20, "centroid-actor checkpoint interval, in batches", ge=1)
    worker_nice: int = _f(
        5,
        "CPU gradient workers lower every thread of their process by this much niceness, so "
        "that the centroid actor, which every batch passes through, never waits behind them "
        "for a core; 0: the same priority (GPU workers are left as they are)",
        ge=0,
        le=19,
    )
    worker_idle: bool = _f(
        True,
        "CPU gradient workers also take the SCHED_IDLE scheduling policy (Linux): they run on "
        "CPU time that no other process wants, so the centroid actor gets a core as soon as a "
        "batch arrives (niced workers still took 30% of a shared core from it); false: "
        "worker_nice alone",
    )
    checkpoint_max_share: float = _f(
        0.05,
        "the share of a pass that periodic checkpoints may take: one is skipped while the "
        "time since the last is under its write time / share (1: every checkpoint_every "
        "batches; phase ends are always saved)",
        gt=0,
        le=1,
    )
    transport: Transport = _f(
        "gradients",
        "gradients (exact) | partial_sums (workers assign, send sums) | collective (replicated "
        "centroids, one all-reduce per step)",
    )
    keep_rows_mb: float = _f(
        1024,
        "gradients transport: the centroid actor keeps the first online epoch's gradient rows "
        "when they fit in this many MB (float32), and the later online epochs and the final "
        "pass reuse them instead of recomputing (Stage II's model is frozen); 0: recompute in "
        "every pass (the paper's streaming)",
        ge=0,
    )
    row_dtype: RowDtype = _f(
        "float32", "collective: dtype of the cached unit gradients a worker keeps (bfloat16 halves)"
    )
    nonfinite: NonFinitePolicy = _f(
        "fail", "a NaN/Inf per-sample gradient: fail (name the samples) | skip (leave them out)"
    )
    worker_resource: str = _worker_resource("gradient worker")
    prefer_node_label: str = _f(
        "",
        "key=value: gradient workers prefer nodes with this Ray label (soft: elsewhere when "
        "none has room, e.g. the restarted workers after a lost node); empty: no preference",
        pattern=r"([\w./-]+=[\w.-]+)?",
    )
    consumers: list[StreamSelector] = _f(
        [],
        "selectors that read the same gradients on the final pass, next to the clusterer "
        "(gist | less | random; each needs selection.target and the gradients transport): "
        "outputs in selection/<method>/, as gs-ray select writes them",
    )


@dataclass
class TuneConfig:
    """K chosen with Ray Tune (clustering.k_selection = tune)."""

    k_values: list[int] = _f(
        [1, 2, 3, 4, 5],
        "candidate K values, one trial each (1: one LoRA on everything)",
        ge=1,
        nonempty=True,
    )
    n_samples: int = _f(600, "training samples whose gradients the trials cluster", ge=4)
    holdout_fraction: float = _f(
        0.25, "share of those held out to score the routed experts", gt=0, lt=1
    )
    trial_steps: int = _f(
        60,
        "optimizer steps of a trial in all, shared by its experts in proportion to their "
        "clusters' sizes (every K gets the same training budget)",
        ge=1,
    )
    max_concurrent_trials: int = _f(2, "trials at once", ge=1)


@dataclass
class EvalConfig:
    """``gs-ray eval``: GradientSpace against the baselines on the run's held-out split."""

    methods: list[EvalMethod] = _f(
        list(typing.get_args(EvalMethod)),
        "methods to compare (see docs/evaluation.md)",
        nonempty=True,
    )
    seeds: int = _f(1, "seeds per trained method (3 on cheap runs: the spread is shown)", ge=1)
    elrea_projection_dim: int = _f(8192, "ELREA: random projection of the gradients", ge=1)
    elrea_projection_kind: ProjectionKind = _f(
        "countsketch", "ELREA's projection: 'countsketch' (n*d work) or dense 'rademacher' (n*d*k)"
    )
    elrea_temperature: float = _f(0.1, "ELREA: softmax temperature over cosine similarity", gt=0)
    max_generate: int = _f(
        48,
        "checkable test items answered by greedy generation, per method (0: no exact match)",
        ge=0,
    )
    max_new_tokens: int = _f(96, "generation length for the exact-match items", ge=1)
    latency_samples: int = _f(16, "test queries timed at batch 1 for the inference cost", ge=1)
    max_parallel_trainings: int = _f(
        3, "baseline trainings at once (each is a Ray Train run: processes and memory)", ge=1
    )
    k_ablation: list[int] = _f(
        [2, 4],
        "K ablation (paper Fig. 6): K values clustered (GradientSpace, K fixed), trained "
        "and scored besides the run's own K; [] for none",
        ge=2,
    )
    sts: str | None = _f(
        None,
        "STS benchmark file (tab-separated: genre, file, year, id, score, s1, s2) for the "
        "gradient- vs embedding-similarity analysis (paper Fig. 4); None: skipped",
    )
    sts_pairs: int = _f(500, "sentence pairs drawn from eval.sts (the paper: 500)", ge=2)
    analyses: bool = _f(
        True,
        "the paper's analyses: Theorem 2's variances, routers compared and the K ablation (one "
        "more gradient pass over the training rows and every query) and STS; false: the "
        "comparison and its verdict alone (elrea still takes its gradient pass)",
    )


@dataclass
class RouterConfig:
    """The router: a frozen encoder and a linear head over K (``kind: encoder``, the paper's), or
    character n-gram TF-IDF features and a logistic-regression head (``kind: tfidf``)."""

    kind: RouterKind = _f(
        "tfidf",
        "tfidf (char n-gram TF-IDF + logistic regression: ~2 ms on a loaded CPU, as "
        "accurate on three runs; benchmarks/README.md) | encoder (the paper's: frozen "
        "transformer + linear head)",
    )
    encoder: str = _f("all-MiniLM-L6-v2", "encoder: 'all-MiniLM-L6-v2' (bundled) or a HF path / id")
    max_length: int = _f(128, "encoder max tokens", ge=1)
    epochs: int = _f(200, "head training epochs (full batch)", ge=1)
    lr: float = _f(1e-2, "head learning rate", gt=0)
    holdout_fraction: float = _f(
        0.2, "share of assigned samples held out for router accuracy", ge=0, lt=1
    )
    tfidf_ngrams: list[int] = _f([2, 5], "tfidf: character n-gram range [min, max]", ge=1)
    tfidf_max_features: int = _f(50000, "tfidf: vocabulary size at most", ge=1)
    tfidf_c: float = _f(10.0, "tfidf: inverse L2 regularisation of the logistic regression", gt=0)


@dataclass
class FallbackConfig:
    """The generalist fallback: one LoRA on all training rows, trained beside the experts, that
    prompts the calibrated router is unsure of go to (docs/evaluation.md)."""

    enabled: bool = _f(
        True, "train the generalist and calibrate the fallback (false: the paper's experts only)"
    )
    calibration_fraction: float = _f(
        0.1,
        "share of the training rows (outside the warm-up) held out to calibrate the router",
        gt=0,
        lt=0.5,
    )
    min_calibration: int = _f(
        16, "calibration rows at least (fewer training rows: no fallback)", ge=2
    )
    thresholds: int = _f(
        9,
        "confidence thresholds tried between 'never fall back' and 'always the generalist' "
        "(quantiles of the calibration rows' confidence)",
        ge=0,
    )


@dataclass
class ServeConfig:
    """Ray Serve deployment of the router and the experts."""

    host: str = _f("127.0.0.1", "HTTP host the Serve proxy binds to (0.0.0.0 to expose it)")
    port: int = _f(8000, "HTTP port", ge=1, le=65535)
    route_prefix: str = _f("/", "URL prefix of the gs-ray application", pattern=r"/\S*")
    api_docs: bool = _f(
        False, "serve the interactive API docs (/docs, /redoc, /openapi.json); off by default"
    )
    api_key: str | None = _f(
        None,
        "bearer API key every route but /healthz requires (None: the GS_RAY_API_KEY environment "
        "variable, else no key)",
    )
    api_keys_file: str | None = _f(
        None,
        "file of named API keys, one client per line: NAME KEY (mode 0600, keys of 16+ "
        "characters); read where the app is built; each client gets its own share "
        "(serve.client_*)",
    )
    client_max_in_flight: int | None = _f(
        None,
        "requests one client (its API key's name, else its address) may have in progress at "
        "once per ingress replica; 429 beyond (None: no limit)",
        ge=1,
    )
    client_rate: float | None = _f(
        None,
        "requests per second one client may start, sustained, per ingress replica; 429 with "
        "Retry-After beyond (None: no limit)",
        gt=0,
    )
    client_burst: int = _f(8, "requests a client may start at once above serve.client_rate", ge=1)
    allow_no_key: bool = _f(
        False,
        "serve on a non-loopback host with no API key (refused otherwise: anyone who can reach "
        "the port could use the models)",
    )
    max_prompt_chars: int = _f(
        65536,
        "longest prompt (or chat, all messages together) in characters, checked before routing",
        ge=1,
    )
    max_body_bytes: int = _f(
        1_048_576,
        "largest request body in bytes (413 beyond it, before the body is parsed)",
        ge=1024,
    )
    max_queued_requests: int = _f(
        64, "requests each deployment queues beyond those it serves; more get 503 at once", ge=1
    )
    max_ensemble_requests: int = _f(
        2,
        "ensemble requests (K experts per token) in progress at once per ingress replica; "
        "more get 429",
        ge=1,
    )
    ensemble_max_new_tokens: int = _f(
        128, "largest max_tokens an ensemble request may ask for", ge=1
    )
    request_timeout_s: float = _f(
        300.0, "end-to-end limit of one HTTP request in seconds (then 408)", gt=0
    )
    max_new_tokens: int = _f(64, "generation length when a request names none", ge=1)
    max_new_tokens_limit: int = _f(512, "largest max_new_tokens a request may ask for", ge=1)
    max_batch_size: int = _f(8, "requests the router and each expert replica batch together", ge=1)
    batch_wait_s: float = _f(0.01, "how long a replica waits to fill a batch", ge=0)
    expert_replicas: int = _f(
        1, "replicas of the experts deployment (each holds all K adapters)", ge=1
    )
    expert_max_replicas: int | None = _f(
        None, "autoscale the experts deployment up to this many replicas (None: fixed count)", ge=1
    )
    expert_gpus: float | None = _f(
        None, "GPUs per experts replica (None: 1 if the cluster has GPUs)", ge=0
    )
    expert_cpus: float = _f(1.0, "CPUs per experts replica", ge=0)
    router_cpus: float = _f(0.5, "CPUs per router replica", ge=0)
    router_int8: bool = _f(
        False,
        "route with the encoder's linear layers quantised to int8 (CPU; ~2.5x faster, ~1.3 "
        "points less agreement with the gradient clusters: benchmarks/README.md)",
    )
    device: str = _f(
        "auto", "torch device of the experts replicas: auto | cpu | cuda | cuda:N", pattern=_DEVICE
    )


@dataclass
class SpectraConfig:
    """``gs-ray spectra``: layer-wise gradient spectra of the base weights (arXiv 2504.10766)."""

    modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        "projections measured in every layer",
        nonempty=True,
    )
    batch_size: int = _f(8, "samples per forward/backward (length-sorted micro-batches)", ge=1)
    max_samples: int | None = _f(None, "measure at most this many samples per subset", ge=1)
    label_a: str = _f("A", "name of the --data subset in tables and plots", pattern=r"\S.*")
    label_b: str = _f("B", "name of the --subset-b subset in tables and plots", pattern=r"\S.*")
    b_response: SpectraResponse = _f(
        "as_is", "subset B's responses: as_is | final_answer (only the text after the last '####')"
    )


@dataclass
class GSNRConfig(TrainingConfig):
    """G-SNR (GradFiltering, arXiv 2601.13697): a LoRA ensemble on a small proxy model, trained
    briefly (these training fields), and the per-example utility over its members."""

    members: int = _f(4, "ensemble members M (seeds and data orders differ)", ge=2)
    form: GSNRForm = _f("energy", "G-SNR form: energy | coordinate (docs/selection.md)")
    eps: float = _f(1e-12, "added to the spread across members (no division by zero)", gt=0)
    epochs: int = _f(1, "passes over the data per member", ge=1)
    max_steps: int | None = _f(30, "optimizer steps per member (None: all epochs)", ge=1)
    parallel: bool = _f(True, "train the members concurrently (Ray Train runs)")
    pack: Pack = _f("auto", "as experts.pack")


@dataclass
class SelectionConfig:
    """``gs-ray select``: targeted data selection from the pool's LoRA gradients."""

    method: SelectionMethod = _f(
        "gist",
        "gist (target subspace, arXiv 2602.18584) | less (8,192-dim random projection, "
        "cosine to the target's mean) | random | gsnr (G-SNR under a LoRA ensemble, arXiv "
        "2601.13697: no target; settings under gsnr.*)",
    )
    target: str | None = _f(None, "the target set: a .jsonl/.json/.parquet file of records")
    budget: str = _f(
        "5%",
        "how much of the pool to select: a percentage (5%) or a count (120)",
        pattern=r"\s*\d+(\.\d+)?\s*%?\s*",
    )
    gist_rank: int | None = _f(
        None, "GIST: fixed subspace dimension k (None: by gist_energy)", ge=1
    )
    gist_energy: float = _f(
        0.9, "GIST: smallest k whose squared singular values hold this share", gt=0, le=1
    )
    less_dim: int = _f(8192, "LESS: random projection dimension", ge=1)


@dataclass
class TrackingConfig:
    """Experiment tracking with MLflow (docs/tracking.md): the run as one MLflow run, a nested run
    per stage and per adapter."""

    mlflow: str | None = _f(
        None,
        "MLflow tracking URI: file:./mlruns (a local store), sqlite:///mlflow.db, "
        "http(s)://host:5000, databricks; None: MLFLOW_TRACKING_URI if set, else no tracking; "
        f"'{TRACKING_OFF}': no tracking",
    )
    experiment: str = _f(
        "gs-ray", "MLflow experiment the run goes to (created if missing)", pattern=r"\S.*"
    )


@dataclass
class RunConfig:
    """The run as a whole."""

    output_dir: str = _f("runs", "where run directories go")
    name: str | None = _f(
        None,
        "run directory name: letters, digits, '.', '_' and '-', not starting with '.' (None: "
        "timestamp)",
        pattern=r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}",
    )
    seed: int = _f(0, "master seed: data splits, initialisation, shuffles", ge=0)
    ray_address: str | None = _f(
        None, "Ray cluster address (None: connect if RAY_ADDRESS is set, else local)"
    )
    num_cpus: int | None = _f(None, "CPUs for a locally started Ray (None: all)", ge=1)
    until: StageName | None = _f(
        None,
        "stop after this stage: warmup | tune | stage2 | routability | experts | router | "
        "calibrate | evaluate (None: all)",
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    spectra: SpectraConfig = field(default_factory=SpectraConfig)
    gsnr: GSNRConfig = field(default_factory=GSNRConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def expert_start(self) -> Literal["warmup", "generalist"]:
        """Where every expert starts: ``experts.init`` with auto resolved (the generalist where
        the run trains one, ``fallback.enabled``; else the warm-up adapter, as the paper)."""
        if self.experts.init == "auto":
            return "generalist" if self.fallback.enabled else "warmup"
        return self.experts.init

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML/JSON friendly)."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the configuration as YAML."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
