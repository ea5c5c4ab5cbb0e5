"""cluster.yaml against Ray's own schema (the `ray job submit` test is in test_pipeline.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    types = config["available_node_types"]
    gpu = types["worker.gpu"]
    assert gpu["resources"]["GPU"] >= 1 and gpu["min_workers"] < gpu["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert config["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "gs-ray" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head  # job submission = code


def test_cluster_yaml_runs_every_node_with_token_auth():
    """Every ray start has token auth on; the head makes the token private (0600, umask 077)
    and the workers take it from the shared mount with the same mode; the header says so."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
        assert not any("RAY_AUTH_MODE=disabled" in c for c in config[key])
    head = " ".join(config["head_setup_commands"])
    assert (
        "umask 077" in head
        and "secrets.token_hex(32)" in head
        and "chmod 600 ~/.ray/auth_token" in head
    )
    assert "install -m 600 ~/.ray/auth_token" in head and "install -d -m 700" in head
    take = config["worker_setup_commands"][0]
    assert "install -m 600" in take and take.endswith("~/.ray/auth_token")
    text = (ROOT / "cluster.yaml").read_text()
    assert "token authentication (RAY_AUTH_MODE=token)" in text
    assert "mutual TLS (RAY_USE_TLS=1)" in text
    assert "loopback only" not in text.split("token authentication")[0]  # the old claim is gone


def test_cluster_yaml_runs_every_node_with_mutual_tls():
    """Every ray start has Ray's TLS on with the node's own certificate; the head makes the CA
    and leaves it (0600) beside the token; every node makes its certificate before ray start, in
    its setup, and its shells get the same settings."""
    from gs_ray.cluster_tls import ray_env

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    tls = ray_env("$HOME/.gs-ray-tls")
    for kind in ("head", "worker"):
        starts = [c for c in config[f"{kind}_start_ray_commands"] if "ray start" in c]
        assert starts and all(f"{k}={v}" in c for c in starts for k, v in tls.items()), kind
        setup = config[f"{kind}_setup_commands"]
        node = [i for i, c in enumerate(setup) if "gs_ray.cluster_tls node $HOME/.gs-ray-tls" in c]
        shell = [c for c in setup if ">> ~/.bashrc" in c and "RAY_USE_TLS=1" in c]
        assert len(node) == 1 and len(shell) == 1, kind
    head = config["head_setup_commands"]
    ca = [i for i, c in enumerate(head) if "gs_ray.cluster_tls ca $HOME/.gs-ray-tls" in c]
    assert (
        len(ca) == 1
        and "install -m 600" in head[ca[0]]
        and "/mnt/shared/.gs-ray-auth/" in head[ca[0]]
    )
    assert ca[0] < next(i for i, c in enumerate(head) if "cluster_tls node" in c)
    workers = config["worker_setup_commands"]
    take = next(i for i, c in enumerate(workers) if "/mnt/shared/.gs-ray-auth/ca.key" in c)
    assert "install -m 600" in workers[take] and "install -d -m 700" in workers[take]
    assert take < next(i for i, c in enumerate(workers) if "cluster_tls node" in c)


def test_cluster_yaml_schema_check_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["worker.gpu"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):
        validate_config(prepare_config(config))


def test_cluster_yaml_is_the_rendering_of_the_one_spec():
    """cluster.yaml is generated (python -m gs_ray.cluster_config --write), never hand-edited."""
    from gs_ray.cluster_config import CLUSTER_YAML, main, render_aws

    assert CLUSTER_YAML == ROOT / "cluster.yaml"
    assert CLUSTER_YAML.read_text() == render_aws()
    assert main(["--check"]) == 0


def test_fake_config_scales_the_same_node_types():
    from ray.autoscaler._private.util import validate_config

    from gs_ray.cluster_config import FAKE_GPU, FAKE_HEAD_TYPE, SPEC, render_fake

    fake = render_fake(gcs_address="127.0.0.1:1234", max_workers=2)
    validate_config(fake)  # prepare_config would read a defaults file this wheel lacks
    real = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    fake_types, real_types = fake["available_node_types"], real["available_node_types"]
    assert set(fake_types) - {FAKE_HEAD_TYPE} == set(real_types) - {real["head_node_type"]}
    for w in SPEC.workers:
        assert fake_types[w.name]["resources"][FAKE_GPU] == real_types[w.name]["resources"]["GPU"]
        assert fake_types[w.name]["min_workers"] == real_types[w.name]["min_workers"]
        assert fake_types[w.name]["max_workers"] == min(2, real_types[w.name]["max_workers"])
    assert fake["provider"]["type"] == "fake_multinode"
    assert fake["provider"]["gcs_address"] == "127.0.0.1:1234"
    assert fake["upscaling_speed"] == real["upscaling_speed"]
