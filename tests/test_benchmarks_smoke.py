"""Every script in benchmarks/ has a smoke mode (``--smoke``: tiny sizes, seconds) that the suite
runs, so that an import or API change breaks the build, not the next measurement.

* The self-contained ones (``SMOKE``) run here, each in its own process, and their JSON is
  checked.
* The ones that need a finished run or a server (``ELSEWHERE``) run beside the fixture that
  already has one, in the test named there: gradient_throughput in test_benchmarks_gradient.py;
  serve_throughput, serve_latency and serve_abuse on test_serving.py's run and server;
  pipeline_stages and router_latency on test_pipeline.py's end-to-end run; stage2_checkpoint in
  test_benchmarks_stage2_checkpoint.py; gsnr_planted in test_spectra_gsnr.py, on the shared Ray,
  as that module's end-to-end test of the G-SNR ensemble.
* A guard lists benchmarks/*.py and fails for a script without a ``--smoke`` option or without a
  test that runs it (a new benchmark must be added to ``SMOKE`` or ``ELSEWHERE``).
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
TESTS = ROOT / "tests"

# script -> keys its JSON must have (what the docs' tables are built from)
SMOKE = {
    "k_selection_planted.py": ("rows",),
    "clustering_memory.py": ("rows",),
    "stage2_scaling.py": ("actor_seconds_per_batch", "collective_7b", "collective_step_seconds_7b"),
    "selection_demo.py": ("base_rate", "rows"),
    "selection_real.py": ("methods", "heldout_losses", "pool_size", "base_heldout_loss"),
}
TAKES_OUT = {"selection_demo.py", "selection_real.py"}  # their work folder: --out
ON_SHARED_RAY = {"stage2_scaling.py"}  # run on the suite's cluster (RAY_ADDRESS): a Ray lane

# script -> "test file::test function" that runs its smoke mode beside a fixture that has what
# it needs (a finished run, a running server)
ELSEWHERE = {
    "gradient_throughput.py": "test_benchmarks_gradient.py::test_gradient_throughput_smoke",
    "serve_throughput.py": "test_serving.py::test_serve_throughput_benchmark_runs",
    "serve_latency.py": "test_serving.py::test_serve_latency_benchmark_smoke",
    "serve_abuse.py": "test_serving.py::test_serve_abuse_benchmark_smoke",
    "pipeline_stages.py": "test_pipeline.py::test_pipeline_stages_benchmark_smoke_on_this_run",
    "router_latency.py": "test_pipeline.py::test_router_latency_benchmark_smoke_on_this_run",
    "gsnr_planted.py": "test_spectra_gsnr.py::test_gsnr_ensemble_end_to_end_on_ray",
    "stage2_checkpoint.py": "test_benchmarks_stage2_checkpoint.py::test_stage2_checkpoint_smoke",
}


@pytest.mark.parametrize(
    "script",
    [pytest.param(s, marks=[pytest.mark.ray] if s in ON_SHARED_RAY else []) for s in sorted(SMOKE)],
)
def test_benchmark_smoke_mode_runs_and_writes_its_json(script, tmp_path, request):
    out = tmp_path / "out.json"
    extra = ["--out", str(tmp_path / "work")] if script in TAKES_OUT else []
    env = None
    if script in ON_SHARED_RAY:
        cluster = request.getfixturevalue("ray_cluster")
        env = {**cluster.env(), "RAY_ADDRESS": cluster.address}
    proc = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--json", str(out), *extra],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in SMOKE[script]:
        assert key in data, (script, key)
    rows = data.get("rows")
    assert rows is None or len(rows) > 0


def _has_smoke_option(path: Path) -> bool:
    """Whether the script calls ``add_argument("--smoke", ...)`` somewhere."""
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
            and any(isinstance(a, ast.Constant) and a.value == "--smoke" for a in node.args)
        ):
            return True
    return False


def _test_function(test_file: Path, name: str) -> str | None:
    """The source of the module-level function ``name`` in ``test_file``, or None."""
    if not test_file.is_file():
        return None
    source = test_file.read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return ast.get_source_segment(source, node)
    return None


def smoke_problems(benchmarks: Path, tests: Path, smoke: dict, elsewhere: dict) -> list[str]:
    """What keeps a benchmark from being smoke-tested: no ``--smoke`` option, no test that runs
    it (in neither registry, or in both), a named test that does not exist, does not pass
    ``--smoke`` or whose file never names the script, or a registry entry without a script."""
    problems = []
    scripts = sorted(p.name for p in benchmarks.glob("*.py"))
    for script in scripts:
        if not _has_smoke_option(benchmarks / script):
            problems.append(f"{script}: no --smoke option")
        if (script in smoke) == (script in elsewhere):
            where = "both in SMOKE and ELSEWHERE" if script in smoke else "run by no test"
            problems.append(f"{script}: {where} (add it to one of them)")
        if script in elsewhere:
            file, name = elsewhere[script].split("::")
            body = _test_function(tests / file, name)
            if body is None:
                problems.append(f"{script}: {elsewhere[script]} does not exist")
            elif '"--smoke"' not in body:
                problems.append(f"{script}: {elsewhere[script]} does not pass --smoke")
            elif Path(script).stem not in (tests / file).read_text():
                problems.append(f"{script}: {file} never names {Path(script).stem}")
    for script in sorted((set(smoke) | set(elsewhere)) - set(scripts)):
        problems.append(f"{script}: registered, but not in {benchmarks}")
    return problems


def test_every_benchmark_has_a_smoke_mode_that_a_test_runs():
    assert smoke_problems(BENCHMARKS, TESTS, SMOKE, ELSEWHERE) == []


def test_the_guard_fails_for_a_benchmark_without_a_smoke_test(tmp_path):
    """Planted in a copy of benchmarks/: a script with no --smoke option and no test, one with
    the option but no test, and a registered test that does not exist."""
    bench = tmp_path / "benchmarks"
    shutil.copytree(BENCHMARKS, bench, ignore=shutil.ignore_patterns("results", "__pycache__"))
    assert smoke_problems(bench, TESTS, SMOKE, ELSEWHERE) == []
    (bench / "planted_plain.py").write_text("import argparse\nargparse.ArgumentParser()\n")
    (bench / "planted_smoke.py").write_text(
        "import argparse\nargparse.ArgumentParser().add_argument('--smoke', action='store_true')\n"
    )
    elsewhere = {**ELSEWHERE, "serve_latency.py": "test_serving.py::test_no_such_test"}
    assert smoke_problems(bench, TESTS, SMOKE, elsewhere) == [
        "planted_plain.py: no --smoke option",
        "planted_plain.py: run by no test (add it to one of them)",
        "planted_smoke.py: run by no test (add it to one of them)",
        "serve_latency.py: test_serving.py::test_no_such_test does not exist",
    ]
    (bench / "planted_plain.py").unlink()
    (bench / "planted_smoke.py").unlink()
    (bench / "router_latency.py").unlink()
    assert smoke_problems(bench, TESTS, SMOKE, ELSEWHERE) == [
        f"router_latency.py: registered, but not in {bench}"
    ]
