"""Typed configuration: one dataclass per concern, one `Config` that holds them all.

The same objects drive the Python API, YAML files and the command line:

    cfg = load_config("run.yaml", ["--clustering.beta", "0.9", "--model.name", "smollm2-135m"])

``schema.py`` holds what a configuration is: the dataclasses, each field with a one-line help text
(``metadata["help"]``, which the CLI prints) and its checks, and the ``Literal`` choices.
``loader.py`` holds how one is loaded and checked (``config_from_dict``, which ``load_config``,
``apply_overrides`` and ``validate`` go through); each error names the key, the value and what
is allowed:

* unknown keys, in YAML or on the command line (with a "did you mean");
* types: a YAML string where a number is wanted is an error; a command-line value is parsed as the
  field's type (``--lora.r 8`` is the integer 8, ``--run.name 007`` the string "007");
* choices: a field typed ``Literal[...]`` takes only those values;
* ranges: a field's ``ge`` / ``gt`` / ``le`` / ``lt`` bounds (and ``pattern``) in its metadata;
* relations between fields (``k_min <= k_max``, ...) in ``loader._check_relations``.

Defaults follow the paper where it gives a value (LoRA r=32, warm-up 5%, variance thresholds
0.80-0.95, alpha in [5, 10]) and are small where a 2-core machine needs it (the embedded default
model and corpus). This package's names are those of its two modules, imported here.
"""

from gs_ray.config.loader import (
    apply_overrides,
    check_tracking_uri,
    config_from_dict,
    help_lines,
    load_config,
    validate,
)
from gs_ray.config.schema import (
    TRACKING_OFF,
    WHOLE_GRADIENT_TRANSPORTS,
    ClusteringConfig,
    Config,
    DataConfig,
    EvalConfig,
    EvalMethod,
    ExpertConfig,
    FallbackConfig,
    GradientConfig,
    GSNRConfig,
    GSNRForm,
    LoRAConfig,
    MixSource,
    ModelConfig,
    NonFinitePolicy,
    Pack,
    ProjectionKind,
    Routability,
    RouterConfig,
    RouterKind,
    RowDtype,
    RunConfig,
    SelectionConfig,
    SelectionMethod,
    ServeConfig,
    SourceFormat,
    SpectraConfig,
    SpectraResponse,
    Stage2Config,
    StageName,
    StreamSelector,
    TrackingConfig,
    TrackingScheme,
    TrainingConfig,
    Transport,
    TuneConfig,
    UseGpu,
    WarmupConfig,
)
from gs_ray.errors import ConfigError

__all__ = [
    "ClusteringConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "EvalMethod",
    "ExpertConfig",
    "FallbackConfig",
    "GSNRConfig",
    "GSNRForm",
    "GradientConfig",
    "LoRAConfig",
    "MixSource",
    "ModelConfig",
    "NonFinitePolicy",
    "Pack",
    "ProjectionKind",
    "Routability",
    "RouterConfig",
    "RouterKind",
    "RowDtype",
    "RunConfig",
    "SelectionConfig",
    "SelectionMethod",
    "ServeConfig",
    "SourceFormat",
    "SpectraConfig",
    "SpectraResponse",
    "Stage2Config",
    "StageName",
    "StreamSelector",
    "TRACKING_OFF",
    "WHOLE_GRADIENT_TRANSPORTS",
    "TrackingConfig",
    "TrackingScheme",
    "TrainingConfig",
    "Transport",
    "TuneConfig",
    "UseGpu",
    "WarmupConfig",
    "apply_overrides",
    "config_from_dict",
    "check_tracking_uri",
    "help_lines",
    "load_config",
    "validate",
]
