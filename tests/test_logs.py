"""The quiet console: gs-ray's lines on the console, everything else in the run's log file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, os, sys
    from gs_ray import logs
    quiet = sys.argv[2] == "quiet"
    with logs.capture(quiet=quiet):
        logging.getLogger("gs_ray.pipeline").info("stage line one")
        logging.getLogger("ray.train").warning("Failed to query Ray Train Controller")
        os.write(2, b"core_worker.cc: PreemptionWatcher noise\\n")
        print("Loading weights: 100%")
        logs.attach_run(sys.argv[1])
        logging.getLogger("gs_ray.pipeline").info("stage line two")
        os.write(1, b"worker chatter after attach\\n")
    print('{"run_dir": "x"}')
    """
)
NOISE = ("Failed to query", "PreemptionWatcher", "Loading weights", "worker chatter")


def _run(tmp_path, mode):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), mode],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_quiet_console_shows_gs_ray_lines_and_sends_the_rest_to_the_run_log(tmp_path):
    out = _run(tmp_path, "quiet")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '{"run_dir": "x"}'  # the result reaches stdout, alone
    assert "stage line one" in out.stderr and "stage line two" in out.stderr
    assert "gs-ray.log" in out.stderr  # the console says where the full log is
    for noise in NOISE:
        assert noise not in out.stderr + out.stdout
    log = (tmp_path / "logs" / "gs-ray.log").read_text()
    for line in ("stage line one", "stage line two", *NOISE):
        assert line in log, line


def test_verbose_keeps_everything_on_the_console(tmp_path):
    out = _run(tmp_path, "verbose")
    assert out.returncode == 0, out.stderr
    both = out.stdout + out.stderr
    for line in ("stage line one", "stage line two", *NOISE):
        assert line in both, line
    assert not (tmp_path / "logs").exists()


FAILING = textwrap.dedent(
    """
    import os, sys
    from gs_ray import logs
    with logs.capture(quiet=True):
        if sys.argv[1] == "noisy":
            os.write(2, b"worker chatter before the failure\\n")
        raise SystemExit(3)
    """
)


def test_a_failure_keeps_its_log_only_where_something_was_logged(tmp_path):
    """A command that fails before attaching a run keeps its temporary log and names it; one
    that logged nothing leaves no empty file behind (they piled up in /tmp)."""
    for mode in ("noisy", "silent"):
        tmp = tmp_path / mode
        tmp.mkdir()
        out = subprocess.run(
            [sys.executable, "-c", FAILING, mode],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "TMPDIR": str(tmp)},
        )
        assert out.returncode == 3, out.stderr
        left = list(tmp.glob("gs-ray-*.log"))
        if mode == "noisy":
            assert len(left) == 1 and f"the full log is {left[0]}" in out.stderr
            assert "worker chatter before the failure" in left[0].read_text()
        else:
            assert left == [] and "full log" not in out.stderr
