"""Loading and checking the configuration (``gs_ray.config.schema`` holds what it loads): YAML and
``--section.key value`` overrides built into the typed dataclasses, each value coerced to its
field's type and checked against its metadata (``ge`` / ``gt`` / ``le`` / ``lt`` / ``pattern`` /
``nonempty``), then the relations between fields. Every error is a ``ConfigError`` naming the
key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from gs_ray.config.schema import (
    TRACKING_OFF,
    WHOLE_GRADIENT_TRANSPORTS,
    Config,
    DataConfig,
    TrackingScheme,
)
from gs_ray.errors import ConfigError


def config_from_dict(data: dict[str, Any]) -> Config:
    """A ``Config`` from a nested dict, checking every value: unknown keys, ill-typed values,
    choices, ranges and relations raise ConfigError naming the key, the value and what is
    allowed."""
    cfg = _build(Config, data, prefix="")
    _check_relations(cfg)
    return cfg


def validate(cfg: Config) -> Config:
    """Check a configuration built in Python (dataclass fields are not checked when set) as
    loading would; returns the checked copy or raises ConfigError."""
    return config_from_dict(cfg.to_dict())


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value or {}, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, f"{prefix}{key}")
            _check_value(kwargs[key], fields[key].metadata, f"{prefix}{key}")
    return cls(**kwargs)


def _choices(allowed: tuple) -> str:
    return " | ".join(str(a) for a in allowed)


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check `value` against the annotation `typ` (no string is read as a number: the command
    line parses its text by the field's type first, see `_parse_cli`); int -> float and
    scalar -> list are allowed."""
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
        also = " (or None)" if type(None) in args else ""
        raise ConfigError((errors[0] if errors else f"{key}: bad value {value!r}") + also)
    if origin is Literal:
        for choice in args:
            if value == choice and type(value) is type(choice):  # True is not the choice 1
                return choice
        if isinstance(value, bool) and str(value).lower() in args:  # YAML reads `true` as bool
            return str(value).lower()
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"{key}: {value!r} is not one of {_choices(args)}{hint}")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        if dataclasses.is_dataclass(args[0]):
            return [_build(args[0], v, prefix=f"{key}[{i}].") for i, v in enumerate(items)]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return value


def _allowed_range(meta: typing.Mapping[str, Any]) -> str:
    """'in [0, 1)', '>= 1', '> 0' ... from a field's bounds."""
    lo = ("[", meta["ge"]) if "ge" in meta else ("(", meta["gt"]) if "gt" in meta else None
    hi = ("]", meta["le"]) if "le" in meta else (")", meta["lt"]) if "lt" in meta else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1]}"
    return f"{'<=' if hi[0] == ']' else '<'} {hi[1]}"


def _check_value(value: Any, meta: typing.Mapping[str, Any], key: str) -> None:
    """The field's checks from its metadata (see `_f`); None (an unset optional) passes."""
    if value is None:
        return
    if isinstance(value, list):
        if meta.get("nonempty") and not value:
            raise ConfigError(f"{key}: must not be empty")
        for i, item in enumerate(value):
            _check_value(item, meta, f"{key}[{i}]")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # `not (a >= b)` rather than `a < b`, so that NaN fails too.
        bad = (
            ("ge" in meta and not value >= meta["ge"])
            or ("gt" in meta and not value > meta["gt"])
            or ("le" in meta and not value <= meta["le"])
            or ("lt" in meta and not value < meta["lt"])
        )
        if bad:
            raise ConfigError(f"{key}: {value!r} is out of range; must be {_allowed_range(meta)}")
    if isinstance(value, str) and "pattern" in meta and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"{key}: {value!r} is not allowed; expected {meta['help']}")


def _check_relations(cfg: Config) -> None:
    """Checks that involve more than one field."""
    c = cfg.clustering
    if c.k_min > c.k_max:
        raise ConfigError(
            f"clustering.k_min ({c.k_min}) is larger than clustering.k_max ({c.k_max}); "
            "allowed: k_min <= k_max"
        )
    _check_template(cfg.data.template)
    _check_mix(cfg.data)
    n = cfg.router.tfidf_ngrams
    if len(n) != 2 or n[0] > n[1]:
        raise ConfigError(f"router.tfidf_ngrams: expected [min, max] with min <= max, got {n}")
    s = cfg.serve
    if s.max_new_tokens > s.max_new_tokens_limit:
        raise ConfigError(
            f"serve.max_new_tokens ({s.max_new_tokens}) is larger than "
            f"serve.max_new_tokens_limit ({s.max_new_tokens_limit})"
        )
    if s.expert_max_replicas is not None and s.expert_max_replicas < s.expert_replicas:
        raise ConfigError(
            f"serve.expert_max_replicas ({s.expert_max_replicas}) is smaller than "
            f"serve.expert_replicas ({s.expert_replicas})"
        )
    _check_stream_consumers(cfg)
    if cfg.experts.init == "generalist" and not cfg.fallback.enabled:
        raise ConfigError(
            "experts.init: generalist needs the run's generalist (fallback.enabled: true); "
            "allowed with fallback.enabled false: warmup"
        )
    if cfg.tracking.mlflow not in (None, TRACKING_OFF):
        check_tracking_uri(cfg.tracking.mlflow, "tracking.mlflow")
    m = cfg.model
    if m.name == "tiny-llama" and m.tiny_hidden_size % m.tiny_num_heads:
        raise ConfigError(
            f"model.tiny_hidden_size ({m.tiny_hidden_size}) must be a multiple of "
            f"model.tiny_num_heads ({m.tiny_num_heads})"
        )


def check_tracking_uri(uri: str, key: str) -> None:
    """A tracking URI as MLflow takes it (``key`` names where it came from: tracking.mlflow or
    MLFLOW_TRACKING_URI): a scheme of ``TrackingScheme`` or a local folder, and no password in
    it (the config is kept in the run directory and logged; MLflow reads credentials from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN)."""
    from urllib.parse import urlsplit

    if not uri.strip():
        raise ConfigError(f"{key}: empty tracking URI; leave it unset, or '{TRACKING_OFF}'")
    parts = urlsplit(uri)
    scheme = parts.scheme.split("+")[0]  # postgresql+psycopg2://...: SQLAlchemy's driver form
    allowed = typing.get_args(TrackingScheme)
    if len(scheme) > 1 and scheme not in allowed:  # one letter: a Windows drive, a folder
        raise ConfigError(
            f"{key}: {uri!r}: scheme {parts.scheme!r} is not one of {_choices(allowed)} "
            "(or a local folder)"
        )
    if parts.password:
        raise ConfigError(
            f"{key}: the URI holds a password, which would be kept in the run directory; set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
            "instead"
        )


def _check_stream_consumers(cfg: Config) -> None:
    """stage2.consumers: each at most once, a target set to score against, the exact transport
    (the other transports keep the gradients on the workers)."""
    names = cfg.stage2.consumers
    if not names:
        return
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"stage2.consumers: {twice} listed more than once")
    if not cfg.selection.target:
        raise ConfigError(
            f"stage2.consumers {names} score the run's samples for a target set: "
            "set selection.target (a .jsonl/.json/.parquet file of records)"
        )
    if cfg.stage2.transport not in WHOLE_GRADIENT_TRANSPORTS:
        raise ConfigError(
            f"stage2.consumers {names} read the gradients at the centroid actor: they need "
            f"stage2.transport: gradients (got {cfg.stage2.transport!r})"
        )


def _check_mix(d: DataConfig) -> None:
    """data.source 'mix' needs data.mix and data.mix needs 'mix'; domains are unique; a source's
    prompt and response templates go together."""
    if d.source == "mix" and not d.mix:
        raise ConfigError("data.source is 'mix' but data.mix lists no source")
    if d.mix and d.source != "mix":
        raise ConfigError(
            f"data.mix lists {len(d.mix)} sources but data.source is {d.source!r}; "
            "set data.source: mix to read them"
        )
    seen: set[str] = set()
    for i, m in enumerate(d.mix):
        if m.domain in seen:
            raise ConfigError(f"data.mix[{i}].domain: {m.domain!r} is used by an earlier source")
        seen.add(m.domain)
        if (m.prompt is None) != (m.response is None):
            raise ConfigError(f"data.mix[{i}]: set both prompt and response templates, or neither")
        for name in ("prompt", "response"):
            if getattr(m, name) is not None:
                _template_names(getattr(m, name), f"data.mix[{i}].{name}")
        if m.format in ("text", "lines") and m.prompt is None:
            raise ConfigError(
                f"data.mix[{i}]: format {m.format!r} needs prompt and response templates"
            )
        if not m.separator:
            raise ConfigError(f"data.mix[{i}].separator: must not be empty")


def _template_names(template: str, key: str) -> set[str]:
    """The field names a template fills, each checked as ``str.format`` would use it on a string
    value, so that a bad template fails when the config loads, naming ``key``, rather than when
    the first sample is templated: a plain name (no ``{}``, ``{0}``, ``{x.attr}``, ``{x[0]}``),
    a conversion of ``!r``, ``!s`` or ``!a``, and a format spec valid for text (``{x:>10}``, not
    ``{x:d}`` or a nested ``{x:{w}}``)."""
    import string

    fix = "write {{ and }} for literal braces"
    try:
        parsed = [p for p in string.Formatter().parse(template) if p[1] is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: {e} in {template!r} ({fix})") from e
    names = set()
    for _, name, spec, conversion in parsed:
        where = f"{key}: placeholder {{{name}}} in {template!r}"
        if not name or name.isdigit() or "." in name or "[" in name:
            raise ConfigError(
                f"{where}: name a field, e.g. {{prompt}} (no positions, attributes or indices; "
                f"{fix})"
            )
        if conversion not in (None, "r", "s", "a"):
            raise ConfigError(f"{where}: unknown conversion !{conversion} (allowed: !r !s !a)")
        if "{" in spec or "}" in spec:
            raise ConfigError(f"{where}: nested placeholders in a format spec are not allowed")
        try:
            format("", spec)  # the value is always text
        except ValueError as e:
            raise ConfigError(f"{where}: bad format spec {spec!r} for text: {e}") from None
        names.add(name)
    return names


def _check_template(template: str) -> None:
    """data.template must hold {prompt} and no other placeholder (literal braces doubled)."""
    names = _template_names(template, "data.template")
    if names != {"prompt"}:
        other = sorted(names - {"prompt"})
        what = f"has placeholders {other}" if other else "has no {prompt} placeholder"
        raise ConfigError(
            f"data.template {template!r} {what}; it needs {{prompt}} and no other "
            "(write {{ and }} for literal braces)"
        )


def _leaf_type(parts: list[str]) -> Any:
    """The annotation of the field at ``section.key`` (None if there is no such field)."""
    cls: Any = Config
    for part in parts:
        if not dataclasses.is_dataclass(cls):
            return None
        hints = _field_types(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return cls


def _parse_cli(raw: str, typ: Any) -> Any:
    """Command-line text as the field's type; text that does not parse is passed on as it is,
    so that `_coerce` reports it with the key."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in ("none", "null", "~", ""):
            return None
        arms = [a for a in args if a is not type(None)]
        return _parse_cli(raw, arms[0]) if len(arms) == 1 else yaml.safe_load(raw)
    if origin is Literal:
        if isinstance(args[0], str):  # case is not a typo: TRUE or Tune are meant as written
            return raw.lower() if raw not in args and raw.lower() in args else raw
        return _parse_cli(raw, type(args[0]))
    if typ is str:
        return raw
    if typ is bool:
        flags = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
        return flags.get(raw.strip().lower(), raw)
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``--section.key value`` (or ``--section.key=value``) pairs; each value is parsed as
    its field's type (lists as YAML), then everything is checked as in `Config.from_dict`."""
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
        # An unknown leaf reaches _build, whose error names it with a suggestion.
        node[parts[-1]] = _parse_cli(raw, _leaf_type(parts))
    return config_from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then command-line overrides; everything checked."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            what = "is a directory, not a YAML file" if path.is_dir() else "not found"
            raise ConfigError(f"config file {path}: {what}")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        try:
            cfg = config_from_dict(raw)
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
