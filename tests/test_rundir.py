"""Run directories never mix (issue 24): names are validated, runs are created exclusively
(reused only with --resume), and one process at a time holds a run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gs_ray.config import ConfigError, load_config
from gs_ray.errors import UserError
from gs_ray.rundir import LOCK_FILE, RunDir


@pytest.mark.parametrize("name", ["..", "../up", "/abs", "a/b", ".hidden", "x" * 129, "sp ace"])
def test_run_names_that_could_escape_or_hide_are_refused(name):
    with pytest.raises(ConfigError, match="run.name"):
        load_config(None, ["--run.name", name])


def test_runs_are_created_exclusively(tmp_path):
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "one"])
    run = RunDir.create(cfg)
    assert run.created and (run.path / "manifest.json").exists()
    with pytest.raises(UserError, match=r"one exists: continue it with --resume .*one"):
        RunDir.create(cfg)
    run.release_lock()
    # timestamp names: runs started in the same second get their own directories
    cfg = load_config(None, ["--run.output_dir", str(tmp_path / "t")])
    runs = [RunDir.create(cfg) for _ in range(3)]
    assert len({r.path for r in runs}) == 3
    assert all(r.path.name.startswith("run-") for r in runs)
    for r in runs:
        r.release_lock()


def test_a_run_in_use_is_refused_to_another_process(tmp_path):
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "busy"])
    run = RunDir.create(cfg)  # this process holds it
    run.hold_lock()  # holding it again in the same process is fine
    code = f"from gs_ray.rundir import RunDir; RunDir({str(run.path)!r}).hold_lock()"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode != 0
    assert "is in use by another gs-ray process (pid" in other.stderr
    run.release_lock()
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    assert (run.path / LOCK_FILE).exists()


def test_a_failed_start_removes_only_its_own_new_directory(tmp_path, monkeypatch):
    from gs_ray import prepare as prep
    from gs_ray.training.pretrain import base_model_for

    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "fails"])

    def boom(*a, **k):
        raise RuntimeError("data could not be read")

    monkeypatch.setattr(prep, "_prepare", boom)
    with pytest.raises(RuntimeError):
        prep.prepare(cfg, base_model=base_model_for)
    assert not (tmp_path / "fails").exists()
    # an existing run is never removed: its name is refused before anything is written
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "precious.txt").write_text("x")
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "kept"])
    with pytest.raises(UserError, match="exists"):
        prep.prepare(cfg, base_model=base_model_for)
    assert (tmp_path / "kept" / "precious.txt").read_text() == "x"


def test_resume_refuses_data_that_changed(tmp_path):
    """A data file edited after a crash (same row count): the resumed run (or its eval) stops
    with the run directory named, instead of mixing old clusters with new rows."""
    import json

    from gs_ray.errors import RunDirError
    from gs_ray.prepare import prepare
    from gs_ray.training.pretrain import base_model_for

    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"say {i}", "output": f"{i} {i}"} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "--data.source",
        str(data),
        "--run.output_dir",
        str(tmp_path / "runs"),
        "--run.name",
        "r",
        "--model.tiny_pretrain_steps",
        "0",
        "--model.tiny_hidden_size",
        "32",
        "--model.tiny_num_layers",
        "1",
        "--data.n_val",
        "8",
    ]
    cfg = load_config(None, args)
    p = prepare(cfg, base_model=base_model_for)
    p.run.release_lock()
    fp = p.run.manifest()["data"]["fingerprint"]
    assert len(fp) == 64
    run = RunDir.open(p.run.path)
    assert (
        prepare(run.config(), run, base_model=base_model_for).run.manifest()["data"]["fingerprint"]
        == fp
    )  # unchanged: ok
    run.release_lock()
    rows[7]["output"] = "edited"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(RunDirError, match=r"runs/r: the data changed since this run started"):
        prepare(run.config(), run, base_model=base_model_for)


def test_an_adapter_changed_by_hand_is_refused_not_kept(tmp_path):
    """An expert's record carries the digest of its peft files: the same files pass, weights or
    a config changed afterwards are refused naming the folder, a record of an older gs-ray
    (no digest) is taken as it is."""
    import json

    from gs_ray.errors import RunDirError
    from gs_ray.rundir import ADAPTER_SHA256, EXPERT_RECORD

    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "r"])
    run = RunDir.create(cfg)
    folder = run.expert(0)
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    run.write_expert_record(0, {"n_train": 3})
    assert run.expert_complete(0)
    run.check_adapter(folder)  # as trained: kept
    record = json.loads((folder / EXPERT_RECORD).read_text())
    assert record["cluster"] == 0 and len(record[ADAPTER_SHA256]) == 64

    (folder / "adapter_model.safetensors").write_bytes(b"weightz" * 100)  # same size
    with pytest.raises(RunDirError, match="expert_0: its adapter files differ"):
        run.check_adapter(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"weights" * 100)
    (folder / "adapter_config.json").write_text('{"r": 16}')
    with pytest.raises(RunDirError, match="--redo experts"):
        run.check_adapter(folder)
    del record[ADAPTER_SHA256]  # an older gs-ray's record
    (folder / EXPERT_RECORD).write_text(json.dumps(record))
    run.check_adapter(folder)
    run.release_lock()


def test_a_warmup_adapter_changed_by_hand_is_refused(tmp_path):
    """The warm-up stage keeps its adapter's digest in the manifest; Stage II on a resume would
    take its gradients with that adapter, so another one is refused."""
    from gs_ray.errors import RunDirError
    from gs_ray.rundir import ADAPTER_SHA256, adapter_digest

    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "w"])
    run = RunDir.create(cfg)
    folder = run.warmup_adapter
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text('{"r": 8}')
    (folder / "adapter_model.safetensors").write_bytes(b"warm" * 50)
    run.check_warmup_adapter()  # no warm-up recorded yet: nothing to compare
    run.mark_stage("warmup", 1.0, **{ADAPTER_SHA256: adapter_digest(folder)})
    run.check_warmup_adapter()
    (folder / "adapter_model.safetensors").write_bytes(b"cold" * 50)
    with pytest.raises(RunDirError, match=r"adapter: its adapter files differ.*--redo warmup"):
        run.check_warmup_adapter()
    run.release_lock()
