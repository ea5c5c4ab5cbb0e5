"""Every self-contained benchmark's smoke mode runs to the end and writes its JSON, so that an
import or API change breaks the build, not the next measurement. (The benchmarks that need a
finished run or a server run beside the fixtures that have one: gradient_throughput in
test_benchmarks_gradient.py, serve_throughput and serve_abuse in test_serving.py,
pipeline_stages in test_pipeline.py, stage2_checkpoint in test_benchmarks_stage2_checkpoint.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# script -> keys its JSON must have (what the docs' tables are built from)
SMOKE = {
    "k_selection_planted.py": ("rows",),
    "clustering_memory.py": ("rows",),
    "stage2_scaling.py": ("actor_seconds_per_batch", "collective_7b", "collective_step_seconds_7b"),
    "selection_demo.py": ("base_rate", "rows"),
    "gsnr_planted.py": ("results", "seconds", "member_final_loss"),
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_mode_runs_and_writes_its_json(script, tmp_path):
    out = tmp_path / "out.json"
    extra = ["--out", str(tmp_path / "work")] if script == "selection_demo.py" else []
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in SMOKE[script]:
        assert key in data, (script, key)
    rows = data.get("rows")
    assert rows is None or len(rows) > 0
