"""The command line: every user error is one plain message naming the file or key, exit status
2, no traceback (unless --verbose), and nothing started or created (issue 8)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gs_ray.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _good_rows(n: int = 8) -> list[dict]:
    return [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(n)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run_fails(capsys, out: Path, *args: str) -> str:
    """`gs-ray run ...` in this process: exit 2, one message on stderr, nothing created, no Ray."""
    ray = pytest.importorskip("ray")
    was_up = ray.is_initialized()
    code = main(["run", "--run.output_dir", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
    if not was_up:
        assert not ray.is_initialized()
    return err


@pytest.mark.parametrize(
    "override, words",
    [
        (
            ["--clustering.k_selection", "tnue"],
            ["clustering.k_selection", "'tnue'", "silhouette", "tune"],
        ),
        (["--clustering.beta", "1.5"], ["clustering.beta", "1.5", "[0, 1)"]),
        (["--lora.r", "-1"], ["lora.r", "-1", ">= 1"]),
        (["--run.until", "bogus"], ["run.until", "'bogus'", "warmup", "evaluate"]),
    ],
)
def test_bad_config_value_is_one_message(tmp_path, capsys, override, words):
    err = _run_fails(capsys, tmp_path / "runs", *override)
    assert err.startswith("gs-ray: config error: ")
    for word in words:
        assert word in err


def test_non_utf8_data_names_file_and_line(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "bad.jsonl", _good_rows())
    path.write_bytes(
        path.read_bytes() + '{"prompt": "na\u00efve", "response": "x"}\n'.encode("cp1252")
    )
    err = _run_fails(capsys, tmp_path / "runs", "--data.source", str(path))
    assert f"data error: {path}:9: not UTF-8" in err


def test_directory_named_like_a_data_file(tmp_path, capsys):
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    err = _run_fails(capsys, tmp_path / "runs", "--data.source", str(folder))
    assert f"{folder}: is a directory" in err


def test_prompt_response_row_missing_response(tmp_path, capsys):
    rows = _good_rows()
    rows[4] = {"prompt": "what now?"}
    path = _write_jsonl(tmp_path / "pr.jsonl", rows)
    err = _run_fails(capsys, tmp_path / "runs", "--data.source", str(path), "--local")
    assert f"{path}:5: missing field 'response'" in err


def test_yaml_config_error_names_the_file(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("clustering:\n  k_max: '8'\n")
    err = _run_fails(capsys, tmp_path / "runs", "--config", str(cfg))
    assert f"{cfg}: clustering.k_max: expected an integer, got '8'" in err


def _corrupt_run(tmp_path: Path) -> Path:
    run = tmp_path / "run-1"
    run.mkdir()
    (run / "manifest.json").write_text('{"created": "2026-11-23T10:00:00", "seed": 0, "sta')
    return run


def test_show_reports_a_missing_or_corrupt_run_directory(tmp_path, capsys):
    run = _corrupt_run(tmp_path)
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"run directory error: {run / 'manifest.json'}: unreadable or half-written" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert main(["show", str(tmp_path / "nope")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["show", str(empty)]) == 2
    assert "not a gs-ray run directory (no manifest.json)" in capsys.readouterr().err


def test_resume_of_a_corrupt_or_missing_run_directory(tmp_path, capsys):
    run = _corrupt_run(tmp_path)
    assert main(["run", "--resume", str(run)]) == 2
    assert f"{run / 'manifest.json'}: unreadable" in capsys.readouterr().err
    missing = tmp_path / "gone"
    assert main(["run", "--resume", str(missing)]) == 2
    assert f"{missing}: no such run directory" in capsys.readouterr().err
    assert not missing.exists()


def test_verbose_shows_the_traceback_and_logs_debug(tmp_path, capsys):
    root = logging.getLogger()
    level = root.level
    try:
        code = main(["--verbose", "run", "--run.output_dir", str(tmp_path), "--lora.r", "0"])
        err = capsys.readouterr().err
        assert code == 2
        assert "Traceback" in err and err.strip().endswith(
            "lora.r: 0 is out of range; must be >= 1"
        )
        assert root.level == logging.DEBUG
        assert main(["run", "--verbose", "--run.output_dir", str(tmp_path), "--lora.r", "0"]) == 2
        assert "Traceback" in capsys.readouterr().err
    finally:
        root.setLevel(level)


def test_console_script_exit_status_and_speed(tmp_path):
    """The real process: status 2, one line, no traceback, in seconds (no Ray, no torch)."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "gs_ray.cli",
        "run",
        "--data.source",
        str(path),
        "--run.output_dir",
        str(tmp_path / "runs"),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"gs-ray: data error: {path}:2: malformed JSON")
    assert not (tmp_path / "runs").exists()
    assert seconds < 30, seconds  # importing torch alone takes longer than the check here
    verbose = subprocess.run(
        [*cmd, "--verbose"], capture_output=True, text=True, env=env, timeout=120
    )
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


def test_show_reports_a_half_written_table(tmp_path, capsys):
    run = tmp_path / "run-2"
    (run / "stage2").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"created": "x", "seed": 0, "stages": {}}))
    row = {"id": "a", "split": "train", "cluster": 0, "domain": None}
    (run / "stage2" / "assignments.jsonl").write_text(json.dumps(row) + '\n{"id": "b", "spl')
    assert main(["show", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"run directory error: {run / 'stage2' / 'assignments.jsonl'}:2: corrupt line" in err
