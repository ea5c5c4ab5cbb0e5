"""Typed configuration: YAML, command-line overrides, unknown keys, defaults from the paper."""

from __future__ import annotations

import pytest

from gs_ray.config import Config, ConfigError, apply_overrides, help_lines, load_config


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
        assert cfg.model.name != "tiny-llama"
