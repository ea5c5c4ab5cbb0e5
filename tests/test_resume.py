"""Resume checks what it resumes (issue 24, item 7 and two low items): the config's hash is
kept, every resume and its overrides are recorded, a change that would invalidate a finished
stage is refused (naming the keys) unless the stages are redone deliberately (--redo), the
invalidated stages' outputs and checkpoints go (Stage II's also once it is done), a stage is
never marked done while its dependents still are, and secrets never reach the run directory.
None of these needs a model or Ray."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from gs_ray import pipeline
from gs_ray.config import Config, apply_overrides, load_config
from gs_ray.errors import RunDirError, UserError
from gs_ray.rundir import RunDir, config_hash

FINISHED = ("warmup", "stage2", "routability", "experts", "router", "calibrate", "evaluate")


def _run(tmp_path, *more: str, finished=FINISHED) -> tuple[RunDir, Config]:
    """A run directory whose stages ``finished`` are marked done (no outputs but the ones a
    test puts there); this process holds its lock until the test ends."""
    cfg = load_config(None, ["--run.output_dir", str(tmp_path), "--run.name", "r", *more])
    run = RunDir.create(cfg)
    for stage in finished:
        run.mark_stage(stage, 1.0)
    return run, cfg


def _with(cfg: Config, *overrides: str) -> Config:
    return apply_overrides(cfg, list(overrides))


def test_a_resume_is_recorded_with_its_overrides_and_the_config_hash(tmp_path):
    run, cfg = _run(tmp_path)
    m = run.manifest()
    assert m["config_sha256"] == config_hash(m["config"]) and len(m["config_sha256"]) == 64
    assert "resumes" not in m
    # nothing changed: recorded all the same, nothing invalidated
    plan = pipeline.resume_run(run, cfg)
    assert plan.changed == {} and plan.invalidate == ()
    # keys that change how, not what (machines, parallelism, where to stop): kept stages
    how = _with(
        cfg,
        "--stage2.num_workers",
        "3",
        "--experts.cpus_per_worker",
        "2",
        "--run.until",
        "experts",
        "--model.device",
        "cpu",
        "--eval.seeds",
        "3",
    )
    plan = pipeline.resume_run(run, how)
    assert plan.invalidate == () and all(run.stage_done(s) for s in FINISHED)
    m = run.manifest()
    assert [r["overrides"] for r in m["resumes"]] == [
        {},
        {
            "model.device": "cpu",
            "experts.cpus_per_worker": 2.0,
            "stage2.num_workers": 3,
            "eval.seeds": 3,
            "run.until": "experts",
        },
    ]
    assert m["resumes"][1]["previous"]["stage2.num_workers"] is None
    assert m["resumes"][1]["invalidated"] == [] and m["resumes"][1]["at"].startswith("20")
    assert m["config"]["stage2"]["num_workers"] == 3  # the run's config is what it runs with
    assert m["config_sha256"] == config_hash(m["config"])
    assert "num_workers: 3" in (run.path / "config.yaml").read_text()


def test_a_change_that_would_invalidate_finished_stages_is_refused_naming_the_keys(tmp_path):
    run, cfg = _run(tmp_path)
    before = run.manifest_path.read_bytes()
    with pytest.raises(UserError) as e:
        pipeline.plan_resume(run, _with(cfg, "--clustering.beta", "0.95", "--lora.dropout", "0.1"))
    msg = str(e.value)
    assert "lora.dropout 0.05 -> 0.1" in msg and "clustering.beta 0.9 -> 0.95" in msg
    assert (
        "invalidate the finished stages warmup, stage2, routability, experts, router, "
        "calibrate, evaluate"
    ) in msg and "--redo warmup" in msg
    with pytest.raises(UserError, match=r"clustering.beta .* stage2, routability.* --redo stage2"):
        pipeline.resume_run(run, _with(cfg, "--clustering.beta", "0.95"))
    # a later stage's key reaches that stage and the ones after it only
    with pytest.raises(
        UserError,
        match=r"fallback.thresholds 9 -> 8 would invalidate the "
        r"finished stages calibrate, evaluate; redo them with "
        r"--redo calibrate",
    ):
        pipeline.resume_run(run, _with(cfg, "--fallback.thresholds", "8"))
    # two stages that do not follow from one another: both named
    with pytest.raises(UserError, match=r"--redo experts,router"):
        pipeline.resume_run(run, _with(cfg, "--fallback.min_calibration", "8"))
    # redoing too little is refused too
    with pytest.raises(UserError, match=r"--redo experts,router"):
        pipeline.resume_run(run, _with(cfg, "--fallback.min_calibration", "8"), redo=["router"])
    assert run.manifest_path.read_bytes() == before  # a refusal writes nothing
    with pytest.raises(UserError, match="--redo stage3: no such stage"):
        pipeline.plan_resume(run, cfg, redo=["stage3"])


def test_a_stage_that_applies_under_neither_config_reads_nothing(tmp_path):
    run, cfg = _run(tmp_path)
    # tune does not apply (k_selection: silhouette): its keys and the experts' keys it would
    # read leave Stage II alone
    plan = pipeline.plan_resume(run, _with(cfg, "--tune.n_samples", "100"))
    assert plan.invalidate == ()
    with pytest.raises(UserError, match=r"--redo experts"):
        pipeline.plan_resume(run, _with(cfg, "--experts.lr", "0.01"))
    # unfinished stages are not protected: their change is simply taken
    run.invalidate("calibrate", "evaluate")
    plan = pipeline.plan_resume(run, _with(cfg, "--fallback.thresholds", "8"))
    assert plan.invalidate == ("calibrate", "evaluate")


def test_redo_invalidates_deliberately_and_drops_outputs_and_checkpoints(tmp_path):
    run, cfg = _run(tmp_path)
    ckpt = run.checkpoint_dir / "centroids.json"
    for path in (
        ckpt,
        run.expert(0) / "adapter_model.safetensors",
        run.ray_train / "expert_0" / "checkpoint_000000" / "state.json",
        run.ray_train / "generalist" / "x",
        run.ray_train / "warmup" / "x",
        run.ray_train / "warmup.gs_ray" / "attempts",
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
    new = _with(cfg, "--clustering.beta", "0.95")
    plan = pipeline.resume_run(run, new, redo=["stage2"])
    assert plan.invalidate == (
        "stage2",
        "routability",
        "experts",
        "router",
        "calibrate",
        "evaluate",
    )
    assert run.stage_done("warmup") and not run.stage_done("stage2")
    assert not run.checkpoint_dir.exists()  # the Stage II checkpoint does not survive
    assert not run.experts_dir.exists()
    assert not (run.ray_train / "expert_0").exists() and not (run.ray_train / "generalist").exists()
    assert (run.ray_train / "warmup" / "x").exists()  # the warm-up is kept
    m = run.manifest()
    entry = m["resumes"][-1]
    assert entry["overrides"] == {"clustering.beta": 0.95}
    assert entry["previous"] == {"clustering.beta": 0.9} and entry["redo"] == ["stage2"]
    assert entry["invalidated"] == list(plan.invalidate)
    assert m["config"]["clustering"]["beta"] == 0.95 and run.config().clustering.beta == 0.95
    # the next resume compares with the recorded config: the same beta is no change
    assert pipeline.plan_resume(run, new).invalidate == ()
    # --redo of a stage alone: it and every stage after it, Ray Train's warm-up run included
    plan = pipeline.resume_run(run, new, redo=["warmup"])
    assert plan.invalidate[0] == "warmup" and not run.stage_done("warmup")
    assert (
        not (run.ray_train / "warmup").exists() and not (run.ray_train / "warmup.gs_ray").exists()
    )


def test_a_manifest_whose_config_was_edited_is_refused(tmp_path):
    run, cfg = _run(tmp_path)
    m = run.manifest()
    m["config"]["clustering"]["beta"] = 0.5  # as if edited by hand after the stages ran
    run.manifest_path.write_text(json.dumps(m))
    with pytest.raises(RunDirError, match="does not match its config_sha256"):
        pipeline.plan_resume(run, cfg)


def test_gs_ray_run_refuses_the_resume_before_ray_and_writes_nothing(tmp_path, capsys):
    from gs_ray.cli import main

    run, _ = _run(tmp_path, "--model.tiny_pretrain_steps", "0")
    run.release_lock()
    before = run.manifest_path.read_bytes()
    code = main(["run", "--resume", str(run.path), "--clustering.alpha", "7"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "clustering.alpha 5 -> 7 would invalidate the finished stages stage2" in err
    assert "--redo stage2" in err and "Traceback" not in err
    assert run.manifest_path.read_bytes() == before
    assert main(["run", "--redo", "router"]) == 2
    assert "--redo needs --resume" in capsys.readouterr().err


def test_a_stage_is_never_marked_done_before_its_dependents_are_invalidated(tmp_path):
    """The router is redone and the process dies right after marking it done: calibrate and
    evaluate, made with the router of before, must not still count as done."""
    run, cfg = _run(tmp_path)
    run.invalidate("router")

    def router_then_killed(p, resume):
        with p.run.stage("router"):
            pass
        raise KeyboardInterrupt("killed right after the router was marked done")

    stages = tuple(
        dataclasses.replace(
            s, complete=None, run=router_then_killed if s.name == "router" else None
        )
        for s in pipeline.STAGES
    )
    p = SimpleNamespace(run=run)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "STAGES", stages)
        with pytest.raises(KeyboardInterrupt):
            pipeline._run_stages(p, cfg, resume=True)
    assert run.stage_done("router")
    assert not run.stage_done("calibrate") and not run.stage_done("evaluate")
    assert run.stage_done("experts")  # not a dependent of the router


def test_the_stage2_checkpoint_is_deleted_once_stage2_is_done(tmp_path, monkeypatch):
    """The executor leaves its checkpoint (it resumes an unfinished Stage II); once the stage
    is done and its outputs written, the checkpoint goes. A failed Stage II keeps it."""
    from gs_ray.stage2 import stage

    run, cfg = _run(tmp_path, finished=("warmup",))
    result = SimpleNamespace(k=2, info={"executor": "ray"})

    def executor(plan, samples, cfg, base, adapter, pad_id, checkpoint_dir, resume, consumers):
        (checkpoint_dir / "centroids.json").parent.mkdir(parents=True, exist_ok=True)
        (checkpoint_dir / "centroids.json").write_text("{}")
        if fail:
            raise RuntimeError("a worker node was lost")
        return result

    monkeypatch.setattr(stage, "run_stage2_ray", executor)
    monkeypatch.setattr(stage, "write_stage2_outputs", lambda p, res: None)
    monkeypatch.setattr(stage.Stage2Plan, "build", staticmethod(lambda *a: None))
    p = SimpleNamespace(
        run=run,
        cfg=cfg,
        lengths=None,
        splits=None,
        samples=[],
        base_path="base",
        pad_id=0,
        calibration_rows=lambda: None,
    )
    fail = True
    with pytest.raises(RuntimeError):
        stage.stage2_ray(p, resume=True)
    assert (run.checkpoint_dir / "centroids.json").exists() and not run.stage_done("stage2")
    fail = False
    assert stage.stage2_ray(p, resume=True) is result
    assert run.stage_done("stage2") and not run.checkpoint_dir.exists()


SECRET = "sk-do-not-store-1234"


def test_secrets_never_reach_the_run_directory(tmp_path, monkeypatch):
    """--serve.api_key given to gs-ray run: manifest.json, config.yaml and the report keep
    null; the run loads, and serving takes the key from GS_RAY_API_KEY or --serve.api_key."""
    run, cfg = _run(tmp_path, "--serve.api_key", SECRET)
    assert cfg.serve.api_key == SECRET  # the running process still has it
    m = run.manifest()
    assert m["config"]["serve"]["api_key"] is None and m["redacted"] == ["serve.api_key"]
    pipeline.resume_run(run, _with(run.config(), "--serve.api_key", SECRET + "-2"))
    from gs_ray.evaluation.report import build_report

    build_report(run.path)
    for path in run.path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(errors="replace"), path
    loaded = RunDir.open(run.path).config()
    assert loaded.serve.api_key is None
    from gs_ray.serving.gate import API_KEY_ENV, client_keys

    assert client_keys(loaded.serve).keys == {}  # no key given again: none
    monkeypatch.setenv(API_KEY_ENV, "from-the-environment")
    assert client_keys(loaded.serve).keys != {}
    monkeypatch.delenv(API_KEY_ENV)
    assert client_keys(_with(loaded, "--serve.api_key", "again").serve).keys != {}


def test_every_config_key_is_classified_for_resume():
    """Every key of the config has an entry in pipeline.READS (a new section or field must say
    which stages read it), and every stage named there exists."""

    def leaves(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    for key in leaves(Config().to_dict()):
        parts = key.split(".")
        assert any(".".join(parts[:n]) in pipeline.READS for n in range(1, len(parts) + 1)), key
    assert {s for v in pipeline.READS.values() for s in v} <= set(pipeline.STAGE_NAMES)
