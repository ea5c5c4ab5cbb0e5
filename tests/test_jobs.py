"""The job entry point under `ray job submit`, and cluster.yaml against Ray's own schema."""

from __future__ import annotations

import json
import subprocess
import sys
import time
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


def test_cluster_yaml_schema_check_is_not_vacuous():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    config["available_node_types"]["worker.gpu"]["min_workerz"] = 1
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):
        validate_config(prepare_config(config))


def _ray_cli() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.mark.slow
@pytest.mark.ray
def test_ray_job_submit_embedded_default(ray_session, tmp_path):
    """`ray job submit` of the embedded-default job against a `ray start --head` cluster."""
    out_dir = tmp_path / "runs"
    job_id = f"gs-ray-test-{int(time.time())}"
    cmd = [
        _ray_cli(), "job", "submit", "--address", ray_session.dashboard_url,
        "--working-dir", str(ROOT), "--submission-id", job_id,
        "--", "python", "jobs/gradientspace.py", "--output-dir", str(out_dir),
        "--run.name", "job",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=ray_session.env(), capture_output=True, text=True, timeout=1500)
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(ray_session.dashboard_url)
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    run_dir = out_dir / "job"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["stage2"]["executor"] == "ray"
    assert manifest["stages"]["stage2"]["workers"] == 2  # one per CPU of the 2-CPU cluster
    rows = [json.loads(line) for line in (run_dir / "stage2" / "assignments.jsonl").open()]
    assert len(rows) == manifest["data"]["used"] >= 2000
    assert {r["cluster"] for r in rows} == set(range(manifest["stages"]["stage2"]["k"]))
