"""Typed configuration: YAML, command-line overrides, unknown keys, defaults from the paper."""

from __future__ import annotations

import pytest

from gs_ray.config import Config, ConfigError, apply_overrides, help_lines, load_config, validate


def test_defaults_follow_the_paper():
    cfg = Config()
    assert cfg.lora.r == 32
    assert cfg.data.warmup_fraction == 0.05
    assert cfg.clustering.variance_thresholds == [0.80, 0.85, 0.90, 0.95]
    assert 5 <= cfg.clustering.alpha <= 10
    assert cfg.model.name == "tiny-llama"


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("clustering:\n  beta: 0.8\n  k_max: 6\nmodel:\n  name: smollm2-135m\n")
    cfg = load_config(
        path,
        [
            "--clustering.beta",
            "0.95",
            "--lora.target_modules=[q_proj,k_proj]",
            "--clustering.n_clusters",
            "4",
            "--run.name",
            "x",
        ],
    )
    assert cfg.clustering.beta == 0.95
    assert cfg.clustering.k_max == 6
    assert cfg.clustering.n_clusters == 4
    assert cfg.model.name == "smollm2-135m"
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.run.name == "x"
    assert isinstance(cfg.data.warmup_fraction, float)


def test_round_trip_through_yaml(tmp_path):
    cfg = apply_overrides(Config(), ["--experts.parallel", "false", "--data.max_samples", "100"])
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg
    assert again.experts.parallel is False


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--clustering.betta", "0.9"], "clustering.betta.*did you mean 'clustering.beta'"),
        (["--clusterin.beta", "0.9"], "clusterin"),
        (["--clustering.k_max", "many"], "clustering.k_max: expected an integer"),
        (["--clustering.beta", "high"], "clustering.beta: expected a number"),
        (["--clustering.beta"], "needs a value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_unknown_yaml_key_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("warmup:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'warmup.epoch'"):
        load_config(path)


def test_every_field_has_help():
    lines = help_lines()
    assert any(line.startswith("  --clustering.beta (0.9)") for line in lines)
    assert all(line.split(": ", 1)[1].strip() for line in lines)


def test_example_configs_load():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "docs" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        cfg = load_config(path)
        if path.stem == "paper-mode":  # a mode over the embedded default (or any other config)
            assert cfg.clustering.routability == "off" and not cfg.fallback.enabled
            assert cfg.clustering.null_draws == 0
        else:  # a real model and real data
            assert cfg.model.name != "tiny-llama"


# ------------------------------------------------------------------------ issue 8: load-time checks


def _literal_fields(cls=Config, prefix=""):
    """(key, allowed values) of every choice field, found from the type hints."""
    import dataclasses
    import types
    import typing

    out = []
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            out += _literal_fields(typ, f"{prefix}{f.name}.")
            continue
        union = typing.get_origin(typ) in (typing.Union, types.UnionType)
        for arm in typing.get_args(typ) if union else [typ]:
            if typing.get_origin(arm) is typing.Literal:
                out.append((f"{prefix}{f.name}", typing.get_args(arm)))
    return out


def test_choice_fields_are_literal_types():
    keys = {key for key, _ in _literal_fields()}
    expected = {
        "data.format",
        "data.overflow",
        "model.dtype",
        "model.attn_implementation",
        "warmup.zero_stage",
        "warmup.use_gpu",
        "experts.zero_stage",
        "experts.use_gpu",
        "clustering.k_selection",
        "stage2.transport",
        "run.until",
    }
    assert expected <= keys


@pytest.mark.parametrize("key, allowed", _literal_fields())
def test_every_choice_is_checked_at_load_time(key, allowed):
    for value in allowed:
        section, name = key.split(".")
        cfg = apply_overrides(Config(), [f"--{key}", str(value)])
        assert getattr(getattr(cfg, section), name) == value
    with pytest.raises(ConfigError) as e:
        apply_overrides(Config(), [f"--{key}", "tnue"])
    message = str(e.value)
    assert message.startswith(f"{key}: 'tnue' is not one of ")
    assert all(str(value) in message for value in allowed)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["--clustering.k_selection", "tnue"],
            r"clustering.k_selection: 'tnue' is not one of silhouette \| tune \(did you mean "
            r"'tune'\?\)",
        ),
        (
            ["--run.until", "bogus"],
            r"run.until: 'bogus' is not one of warmup \| tune \| stage2 \| routability \| experts "
            r"\| router \| calibrate \| evaluate \(or None\)",
        ),
        (
            ["--clustering.beta", "1.5"],
            r"clustering.beta: 1.5 is out of range; must be in \[0, 1\)",
        ),
        (["--clustering.beta", "nan"], r"clustering.beta: expected a finite number"),
        (["--clustering.alpha", "0"], r"clustering.alpha: 0 is out of range; must be >= 1"),
        (["--lora.r", "-1"], r"lora.r: -1 is out of range; must be >= 1"),
        (["--lora.alpha", "0"], r"lora.alpha: 0 is out of range; must be > 0"),
        (["--lora.dropout", "1"], r"lora.dropout: 1.0 is out of range; must be in \[0, 1\)"),
        (["--lora.target_modules", "[]"], r"lora.target_modules: must not be empty"),
        (["--warmup.lr", "0"], r"warmup.lr: 0.0 is out of range; must be > 0"),
        (["--experts.epochs", "0"], r"experts.epochs: 0 is out of range; must be >= 1"),
        (["--warmup.batch_size", "0"], r"warmup.batch_size: 0 is out of range"),
        (["--warmup.zero_stage", "3"], r"warmup.zero_stage: 3 is not one of 0 \| 1 \| 2"),
        (["--gradients.batch_size", "-2"], r"gradients.batch_size: -2 is out of range"),
        (
            ["--clustering.variance_thresholds", "[0.8, 1.2]"],
            r"variance_thresholds\[1\]: 1.2 is out of range; must be in \(0, 1\]",
        ),
        (
            ["--clustering.k_min", "6", "--clustering.k_max", "4"],
            r"clustering.k_min \(6\) is larger than clustering.k_max \(4\)",
        ),
        (
            ["--data.test_fraction", "1"],
            r"data.test_fraction: 1.0 is out of range; must be in \[0, 1\)",
        ),
        (
            ["--data.warmup_fraction", "0"],
            r"data.warmup_fraction: 0.0 is out of range; must be in \(0, 1\)",
        ),
        (["--router.holdout_fraction", "-0.1"], r"router.holdout_fraction: -0.1 is out of range"),
        (
            ["--model.device", "gpu"],
            r"model.device: 'gpu' is not allowed; expected auto \| cpu \| cuda",
        ),
        (["--serve.port", "70000"], r"serve.port: 70000 is out of range; must be in \[1, 65535\]"),
        (
            ["--serve.max_new_tokens", "600"],
            r"serve.max_new_tokens \(600\) is larger than serve.max_new_tokens_limit",
        ),
        (["--data.template", "Q: {question}"], r"data.template .* has placeholders \['question'\]"),
        (["--run.seed", "-1"], r"run.seed: -1 is out of range; must be >= 0"),
        (
            ["--stage2.prefer_node_label", "gpu"],
            r"stage2.prefer_node_label: 'gpu' is not allowed; expected key=value",
        ),
        (["--stage2.worker_resource", "a b"], r"stage2.worker_resource: 'a b' is not allowed"),
        (
            ["--stage2.consumers", "gsnr", "--selection.target", "t.jsonl"],
            r"stage2.consumers\[0\]: 'gsnr' is not one of gist \| less \| random",
        ),
        (
            ["--stage2.consumers", "gist"],
            r"stage2.consumers \['gist'\] score .* set selection.target",
        ),
        (
            ["--stage2.consumers", "[gist, gist]", "--selection.target", "t.jsonl"],
            r"stage2.consumers: \['gist'\] listed more than once",
        ),
        (
            [
                "--stage2.consumers",
                "less",
                "--selection.target",
                "t.jsonl",
                "--stage2.transport",
                "partial_sums",
            ],
            r"need stage2.transport: gradients \(got 'partial_sums'\)",
        ),
        (
            ["--experts.init", "generalist", "--fallback.enabled", "false"],
            r"experts.init: generalist needs the run's generalist \(fallback.enabled: true\)",
        ),
        (["--experts.init", "base"], r"experts.init: 'base'.*warmup.*generalist"),
    ],
)
def test_ranges_and_choices_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Config(), overrides)


def test_command_line_values_parse_as_the_field_type(tmp_path):
    cfg = apply_overrides(
        Config(),
        [
            "--lora.r",
            "8",
            "--run.name",
            "007",
            "--clustering.tol",
            "1e-4",
            "--run.until",
            "None",
            "--warmup.use_gpu",
            "TRUE",
            "--experts.use_gpu",
            "false",
            "--model.device",
            "cuda:1",
            "--clustering.n_clusters",
            "null",
        ],
    )
    assert cfg.lora.r == 8 and cfg.run.name == "007" and cfg.clustering.tol == 1e-4
    assert cfg.run.until is None and cfg.clustering.n_clusters is None
    assert (cfg.warmup.use_gpu, cfg.experts.use_gpu) == ("true", "false")
    assert cfg.model.device == "cuda:1"
    # In YAML a quoted number is a string, and a string where an integer is wanted is an error.
    path = tmp_path / "q.yaml"
    path.write_text("lora:\n  r: '8'\n")
    with pytest.raises(ConfigError, match=r"q.yaml: lora.r: expected an integer, got '8'"):
        load_config(path)
    path.write_text("warmup:\n  use_gpu: true\nrun:\n  until: stage2\n")
    cfg = load_config(path)
    assert cfg.warmup.use_gpu == "true" and cfg.run.until == "stage2"


def test_a_config_built_in_python_is_checked_by_validate():
    cfg = Config()
    assert validate(cfg) == cfg
    cfg.clustering.k_selection = "tnue"
    with pytest.raises(ConfigError, match="clustering.k_selection: 'tnue'"):
        validate(cfg)


def test_config_file_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
