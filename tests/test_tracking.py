"""MLflow tracking (gs_ray/tracking.py, docs/tracking.md), offline against a file store read back
with MLflow's own client: the parent run and its params (no secret), a nested run per stage and
per adapter with the losses per step of the run directory's records, artifacts, a resume that
continues the same MLflow run, Tune's trials through Ray's MLflowLoggerCallback, a store that
fails, and a run with tracking off that never imports MLflow. The run directories here are
written by hand in the stages' formats (the end-to-end job of test_pipeline is tracked too)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gs_ray import tracking
from gs_ray.config import ConfigError, config_from_dict, load_config
from gs_ray.io import atomic_write_text, write_json
from gs_ray.rundir import EXPERT_RECORD, TRAIN_RECORD, RunDir

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

SECRET = "s3cret-api-key"
WARMUP_LOSSES = [3.5, 3.0, 2.75, 2.5]
EXPERT_LOSSES = {0: [2.5, 2.25, 2.0], 1: [2.6, 2.4]}
GENERALIST_LOSSES = [2.5, 2.3, 2.2, 2.1, 2.0]
CHANGED_SHARE = [0.4, 0.05, 0.008]


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A file store in tmp_path (MLflow 3 wants its opt-in for one), no URI in the environment."""
    monkeypatch.setenv(tracking.FILE_STORE_ENV, "true")
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    return (tmp_path / "mlruns").as_uri()


def _config(tmp_path: Path, uri: str | None, *more: str):
    args = ["--run.output_dir", str(tmp_path / "runs"), "--run.name", "r"]
    args += ["--serve.api_key", SECRET, *more]
    return load_config(None, args + (["--tracking.mlflow", uri] if uri else []))


def _warmup(run: RunDir) -> None:
    write_json(run.warmup_losses, {"train_loss": WARMUP_LOSSES})
    run.add_metrics(warmup={"steps": 4, "first_loss": 3.5, "engine": "DeepSpeedEngine"})
    run.mark_stage("warmup", 1.25, engine="DeepSpeedEngine", world_size=1)


def _stage2(run: RunDir) -> None:
    silhouettes = {(0.8, 2): 0.0625, (0.8, 3): 0.03125, (0.9, 2): 0.09375, (0.9, 3): 0.046875}
    rows = [
        {"threshold": t, "n_components": 3, "k": k, "silhouette": v, "sizes": [5, 4]}
        for (t, k), v in silhouettes.items()
    ]
    chosen = {"k": 2, "threshold": 0.8, "n_components": 3, "silhouette": 0.0625}
    write_json(run.k_selection_json, {"table": rows, "chosen": chosen})
    run.add_metrics(
        stage2={
            "k": 2,
            "silhouette": 0.07,
            "changed_share": CHANGED_SHARE,
            "cluster_sizes_train": [30, 20],
            "val_variance": {"ratio": 0.9},
        }
    )
    run.mark_stage("stage2", 2.5, k=2)


def _experts(run: RunDir, losses: dict[int, list[float]] = EXPERT_LOSSES) -> None:
    for c, values in losses.items():
        record = {"cluster": c, "n_train": 10 + c, "steps": len(values), "losses": values}
        write_json(run.expert(c) / EXPERT_RECORD, record)  # records only: no adapter files
    record = {"generalist": True, "n_train": 21, "losses": GENERALIST_LOSSES}
    write_json(run.generalist / EXPERT_RECORD, record)
    run.mark_stage("experts", 3.0, trained=sorted(losses), generalist=True)


def _router(run: RunDir) -> None:
    run.add_metrics(
        router={
            "holdout_accuracy": 0.75,
            "chance_accuracy": 0.5,
            "per_cluster_holdout_accuracy": [0.5, 1.0],
        }
    )
    run.mark_stage("router", 0.5)


def _evaluate(run: RunDir) -> None:
    own = [{"cluster": c, "n": 5, "expert": 2.0 + c / 10, "warmup": 2.4} for c in (0, 1)]
    run.add_metrics(
        evaluation={"test_loss_routed": 2.05, "test_loss_warmup": 2.4, "own_cluster": own}
    )
    run.mark_stage("evaluate", 1.0)


STAGES = {
    "warmup": _warmup,
    "stage2": _stage2,
    "experts": _experts,
    "router": _router,
    "evaluate": _evaluate,
}


def _outputs(run: RunDir) -> None:
    atomic_write_text(run.report_html, "<html><body>the report</body></html>")
    (run.plots / "silhouette_vs_k.png").write_bytes(b"\x89PNG fake")


def _tracked_run(tmp_path: Path, uri: str) -> tuple[RunDir, MlflowClient]:
    """A run directory whose stages run inside the tracker, as pipeline._run_stages does."""
    cfg = _config(tmp_path, uri)
    run = RunDir.create(cfg)
    run.update_manifest(data={"used": 120, "splits": {"test": 12}})  # as prepare writes it
    with tracking.open_tracker(cfg, run) as tracker:
        assert tracker.enabled
        for name, write in STAGES.items():
            with tracker.stage(name):
                write(run)
        _outputs(run)
        tracker.log_outputs()
    run.release_lock()
    return run, MlflowClient(uri)


def _ids(run: RunDir) -> dict:
    return json.loads(run.tracking_json.read_text())


def _children(client: MlflowClient, parent_id: str) -> dict[str, list]:
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        f"tags.mlflow.parentRunId = '{parent_id}'",
    )
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.info.run_name, []).append(r)
    return out


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# --------------------------------------------------------------------------- config


def test_the_tracking_section_is_checked_when_the_config_loads():
    cfg = load_config()
    assert cfg.tracking.mlflow is None and cfg.tracking.experiment == "gs-ray"
    assert load_config(None, ["--tracking.mlflow", "off"]).tracking.mlflow == "off"
    cases = [
        (["--tracking.mlflow", "ftp://host/x"], r"tracking.mlflow: 'ftp://host/x': scheme 'ftp'"),
        (["--tracking.mlflow", "https://me:pw@host"], r"tracking.mlflow: the URI holds a password"),
        (["--tracking.experiment", ""], r"tracking.experiment: '' is not allowed"),
        (["--tracking.mlflw", "x"], r"did you mean 'tracking.mlflow'"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config(None, args)
    with pytest.raises(ConfigError, match="tracking.mlflow: empty tracking URI"):
        config_from_dict({"tracking": {"mlflow": " "}})  # as a YAML file may have it


def test_the_uri_comes_from_the_config_else_the_environment_and_is_made_absolute(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(tracking.URI_ENV, raising=False)
    uri = lambda *args: tracking.resolve_uri(load_config(None, list(args)).tracking)  # noqa: E731
    assert uri() is None  # off by default
    assert uri("--tracking.mlflow", "file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert uri("--tracking.mlflow", "store") == (tmp_path / "store").as_uri()
    assert uri("--tracking.mlflow", "sqlite:///m.db") == f"sqlite:///{tmp_path / 'm.db'}"
    assert uri("--tracking.mlflow", "http://host:5000") == "http://host:5000"
    assert uri("--tracking.mlflow", "databricks") == "databricks"
    monkeypatch.setenv(tracking.URI_ENV, "file:./from-env")
    assert uri() == (tmp_path / "from-env").as_uri()  # MLflow's own convention
    assert uri("--tracking.mlflow", "off") is None
    monkeypatch.setenv(tracking.URI_ENV, "gopher://x")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI: 'gopher://x'"):
        uri()


def test_the_preflight_names_the_package_a_store_needs(monkeypatch):
    real = tracking.importlib.util.find_spec
    missing: set[str] = set()
    monkeypatch.setattr(
        tracking.importlib.util, "find_spec", lambda n: None if n in missing else real(n)
    )
    missing.add("sqlalchemy")
    with pytest.raises(ConfigError, match=r"tracking.mlflow: .*sqlite database needs the full"):
        tracking.check(load_config(None, ["--tracking.mlflow", "sqlite:////tmp/m.db"]))
    tracking.check(load_config(None, ["--tracking.mlflow", "file:/tmp/mlruns"]))
    missing.add("mlflow")
    with pytest.raises(ConfigError, match=r"pip install 'gs-ray\[tracking\]'"):
        tracking.check(load_config(None, ["--tracking.mlflow", "file:/tmp/mlruns"]))


# --------------------------------------------------------------------------- tracking off


def test_a_run_with_tracking_off_imports_no_mlflow(tmp_path):
    """In a fresh process: the modules of a run, the tracker-off path through a run directory,
    Tune's callbacks, DeepSpeed as the workers import it; MLflow is installed here, and never
    imported."""
    code = textwrap.dedent(
        f"""
        import os, sys
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        import gs_ray.cli, gs_ray.pipeline, gs_ray.evaluation.baselines
        from gs_ray import tracking
        from gs_ray.config import load_config
        from gs_ray.rundir import RunDir
        from gs_ray.training.tuning import trial_tracking

        cfg = load_config(None, ["--run.output_dir", {str(tmp_path)!r}, "--run.name", "off"])
        tracking.check(cfg)
        run = RunDir.create(cfg)
        with tracking.open_tracker(cfg, run) as tracker:
            assert not tracker.enabled
            with tracker.stage("tune") as stage:
                assert trial_tracking(run) == []
                stage.log_text("x", "x.txt")
            tracker.log_kept("warmup")
            tracker.log_done_stages()
            tracker.log_outputs()
        assert not run.tracking_json.exists()
        # What a Ray Train worker imports (DeepSpeed's autotuner imports MLflow where it can).
        from gs_ray.training.ray_train import import_deepspeed

        import_deepspeed()
        loaded = sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")
        assert not loaded, loaded
        import mlflow  # the guard was only around DeepSpeed's import
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# --------------------------------------------------------------------------- tracking on


def test_a_run_is_one_parent_run_with_a_nested_run_per_stage_and_per_adapter(tmp_path, store):
    run, client = _tracked_run(tmp_path, store)
    ids = _ids(run)
    assert ids["uri"] == store and ids["experiment"] == "gs-ray"
    parent = client.get_run(ids["parent_run_id"])
    assert parent.info.run_name == "r" and parent.info.status == "FINISHED"
    assert parent.data.tags["gs_ray.run_dir"] == str(run.path)
    # The config as params, as the run directory keeps it: the API key never.
    params = parent.data.params
    assert params["clustering.beta"] == "0.9" and params["lora.target_modules"] == json.dumps(
        ["q_proj", "v_proj"]
    )
    assert params["tracking.mlflow"] == store and params["serve.api_key"] == "null"
    assert not [k for k, v in params.items() if SECRET in v]
    assert len(params) == len(tracking.params_of(run.config()))
    # One nested run per stage, finished, each the one tracking.json names.
    stages = _children(client, parent.info.run_id)
    assert set(stages) == set(STAGES) and all(len(v) == 1 for v in stages.values())
    assert {n: v[0].info.run_id for n, v in stages.items()} == ids["stages"]
    assert all(v[0].info.status == "FINISHED" for v in stages.values())
    warmup = stages["warmup"][0]
    assert _history(client, warmup.info.run_id, "train_loss") == list(
        enumerate(WARMUP_LOSSES, start=1)
    )
    assert warmup.data.metrics["stage.seconds"] == 1.25 and warmup.data.metrics["steps"] == 4
    assert warmup.data.tags["engine"] == "DeepSpeedEngine"
    # Stage II: the changed share per epoch, the K-selection table over K per threshold.
    s2 = stages["stage2"][0].info.run_id
    assert _history(client, s2, "changed_share") == list(enumerate(CHANGED_SHARE, start=1))
    assert _history(client, s2, "cluster_size_train") == [(0, 30.0), (1, 20.0)]
    assert _history(client, s2, "k_selection.threshold_0.9.silhouette") == [
        (2, 0.09375),
        (3, 0.046875),
    ]
    assert client.get_run(s2).data.metrics["val_variance.ratio"] == 0.9
    assert [a.path for a in client.list_artifacts(s2, "stage2")] == ["stage2/k_selection.json"]
    # One nested run per adapter under the experts run, with its loss per step.
    adapters = _children(client, stages["experts"][0].info.run_id)
    assert set(adapters) == {"expert_0", "expert_1", "generalist"}
    for c, losses in EXPERT_LOSSES.items():
        expert = adapters[f"expert_{c}"][0]
        assert _history(client, expert.info.run_id, "train_loss") == list(
            enumerate(losses, start=1)
        )
        assert expert.data.metrics["n_train"] == 10 + c
    assert [
        v for _, v in _history(client, adapters["generalist"][0].info.run_id, "train_loss")
    ] == (GENERALIST_LOSSES)
    router = stages["router"][0].info.run_id
    assert client.get_run(router).data.metrics["holdout_accuracy"] == 0.75
    assert _history(client, router, "per_cluster_holdout_accuracy") == [(0, 0.5), (1, 1.0)]
    ev = stages["evaluate"][0].info.run_id
    assert _history(client, ev, "own_cluster.expert") == [(0, 2.0), (1, 2.1)]
    # The parent: held-out losses, K, the report, the plots, k_selection.json, metrics.json.
    assert parent.data.metrics["test_loss_routed"] == 2.05 and parent.data.metrics["k"] == 2
    assert parent.data.metrics["data.used"] == 120 and parent.data.metrics["data.splits.test"] == 12
    artifacts = {
        a.path
        for folder in ("report", "plots", "stage2")
        for a in client.list_artifacts(parent.info.run_id, folder)
    }
    assert artifacts == {
        "report/report.html",
        "plots/silhouette_vs_k.png",
        "stage2/k_selection.json",
    }
    assert "metrics.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    local = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="report/report.html", tracking_uri=store
    )
    assert Path(local).read_text() == run.report_html.read_text()


def test_a_resume_continues_the_same_mlflow_run(tmp_path, store):
    """Kept stages are not logged twice; a stage run again gets a new nested run (the old one
    tagged superseded); new config keys become params, the resume's changes a tag."""
    run, client = _tracked_run(tmp_path, store)
    first = _ids(run)
    cfg = _config(tmp_path, store, "--experts.parallel", "false")
    run.hold_lock()
    run.record_resume(cfg, {"experts.parallel": (True, False)}, ["experts"])
    with tracking.open_tracker(cfg, run) as tracker:
        parent = client.get_run(first["parent_run_id"])
        assert parent.info.status == "RUNNING"  # continued, not a new run
        for name in ("warmup", "stage2"):
            tracker.log_kept(name)
        with tracker.stage("experts"):
            _experts(run, {0: [1.5, 1.25], 1: [1.75]})
    run.release_lock()
    again = _ids(run)
    assert again["parent_run_id"] == first["parent_run_id"]
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert json.loads(parent.data.tags["gs_ray.resume_1"]) == {"experts.parallel": False}
    assert parent.data.params["experts.parallel"] == "true"  # an MLflow param never changes
    stages = _children(client, first["parent_run_id"])
    assert len(stages["warmup"]) == len(stages["stage2"]) == 1  # kept: logged once
    assert len(stages["experts"]) == 2 and again["stages"]["experts"] != first["stages"]["experts"]
    old = client.get_run(first["stages"]["experts"])
    assert old.data.tags[tracking._SUPERSEDED] == again["stages"]["experts"]
    new_expert = _children(client, again["stages"]["experts"])["expert_0"][0]
    assert _history(client, new_expert.info.run_id, "train_loss") == [(1, 1.5), (2, 1.25)]


def test_stages_done_before_tracking_was_on_are_logged_from_the_run_directory(tmp_path, store):
    cfg = _config(tmp_path, store)
    run = RunDir.create(cfg)
    for write in STAGES.values():
        write(run)
    with tracking.open_tracker(cfg, run) as tracker:
        tracker.log_done_stages()
        tracker.log_done_stages()  # twice: nothing new
    run.release_lock()
    client = MlflowClient(store)
    stages = _children(client, _ids(run)["parent_run_id"])
    assert set(stages) == set(STAGES) and all(len(v) == 1 for v in stages.values())
    assert stages["warmup"][0].data.tags["gs_ray.kept"] == "true"
    assert [v for _, v in _history(client, stages["warmup"][0].info.run_id, "train_loss")] == (
        WARMUP_LOSSES
    )
    # A stage's run left RUNNING (the process died while it was logged) is logged again.
    client.update_run(stages["router"][0].info.run_id, status="RUNNING")
    run.hold_lock()
    with tracking.open_tracker(cfg, run) as tracker:
        tracker.log_done_stages()
    run.release_lock()
    again = _children(client, _ids(run)["parent_run_id"])
    assert len(again["router"]) == 2 and len(again["warmup"]) == 1
    assert _ids(run)["stages"]["router"] != stages["router"][0].info.run_id


def test_a_failed_stage_ends_its_run_and_the_parent_failed(tmp_path, store):
    cfg = _config(tmp_path, store)
    run = RunDir.create(cfg)
    with pytest.raises(RuntimeError, match="boom"), tracking.open_tracker(cfg, run) as tracker:
        with tracker.stage("warmup"):
            _warmup(run)
        with tracker.stage("stage2"):
            raise RuntimeError("boom")
    run.release_lock()
    client = MlflowClient(store)
    ids = _ids(run)
    assert client.get_run(ids["parent_run_id"]).info.status == "FAILED"
    assert client.get_run(ids["stages"]["stage2"]).info.status == "FAILED"
    assert client.get_run(ids["stages"]["warmup"]).info.status == "FINISHED"


def test_a_store_that_fails_while_logging_never_stops_the_run(tmp_path, store, caplog):
    cfg = _config(tmp_path, store)
    run = RunDir.create(cfg)
    with tracking.open_tracker(cfg, run) as tracker:

        def refuse(*args, **kwargs):
            raise OSError("disk full")

        tracker.client.log_batch = refuse
        with tracker.stage("warmup"):
            _warmup(run)
        done = True
    run.release_lock()
    assert done and run.stage_done("warmup")
    assert "tracking: could not log the warmup stage (OSError: disk full)" in caplog.text


def test_tune_trials_are_nested_under_the_tune_run_by_rays_mlflow_callback(tmp_path, store):
    """training.tuning.trial_tracking hands Tune Ray's MLflowLoggerCallback while the tune run
    is open; driven here as Tune drives a LoggerCallback (test_tuning runs it inside Tune)."""
    from gs_ray.training.tuning import trial_tracking

    cfg = _config(tmp_path, store)
    run = RunDir.create(cfg)

    class Trial:  # what the callback reads of a Tune trial
        def __init__(self, k: int):
            self.config, self.local_path = {"k": k}, str(tmp_path)

        def __str__(self) -> str:
            return f"k_trial_{self.config['k']}"

    with tracking.open_tracker(cfg, run) as tracker:
        with tracker.stage("tune") as stage:
            (callback,) = trial_tracking(run)
            callback.setup()
            for k, loss in ((1, 2.5), (2, 2.25)):
                trial = Trial(k)
                callback.log_trial_start(trial)
                callback.log_trial_result(1, trial, {"val_loss": loss, "training_iteration": 1})
                callback.log_trial_end(trial)
            tune_id = stage.run_id
        assert trial_tracking(run) == []  # only while the tune run is open
    run.release_lock()
    assert tracking.URI_ENV not in os.environ  # MLflow's fluent API put it back
    client = MlflowClient(store)
    trials = _children(client, tune_id)
    assert set(trials) == {"k_trial_1", "k_trial_2"}
    assert trials["k_trial_2"][0].data.params == {"k": "2"}
    assert trials["k_trial_2"][0].data.metrics["val_loss"] == 2.25
    assert trials["k_trial_1"][0].info.status == "FINISHED"


def test_gs_ray_eval_is_a_nested_run_with_its_table_and_baseline_adapters(tmp_path, store):
    cfg = _config(tmp_path, store)
    run = RunDir.create(cfg)
    for write in STAGES.values():
        write(run)
    methods = {
        "gradientspace": {
            "test_loss": 2.0,
            "test_loss_by_domain": {"math": 1.75},
            "vs_reference": {"mean": -0.125, "lo": -0.25, "hi": -0.0625},
            "per_seed": [{"test_loss": 2.0}],
        },
        "single_lora": {"test_loss": 2.125, "exact_match": None},
    }
    verdict = {"verdict": "pays off", "mean": -0.125, "headline": "GradientSpace pays off"}
    write_json(run.eval_json, {"methods": methods, "verdict": verdict, "n_test": 40, "k": 2})
    single = [2.5, 2.25, 2.125]
    write_json(
        run.eval_adapter(0, "single_lora", "single") / TRAIN_RECORD,
        {"n_train": 50, "steps": 3, "losses": single},
    )
    write_json(
        run.eval_adapter(1, "random_clusters", "expert_0") / TRAIN_RECORD,
        {"n_train": 20, "steps": 1, "losses": [2.75]},
    )
    with tracking.open_tracker(cfg, run) as tracker:
        tracker.log_done_stages()
        with tracker.stage(tracking.EVAL) as stage:
            stage.log_text("method  test loss\n", f"{tracking.EVAL}/eval_table.txt")
        tracker.log_outputs()
    run.release_lock()
    client = MlflowClient(store)
    ids = _ids(run)
    ev = client.get_run(ids["stages"][tracking.EVAL])
    m = ev.data.metrics
    assert m["gradientspace.test_loss"] == 2.0 and m["single_lora.test_loss"] == 2.125
    assert m["gradientspace.vs_reference.mean"] == -0.125
    assert m["gradientspace.test_loss_by_domain.math"] == 1.75 and m["n_test"] == 40
    assert ev.data.tags["verdict.verdict"] == "pays off"
    assert {a.path for a in client.list_artifacts(ev.info.run_id, "eval")} == {
        "eval/eval.json",
        "eval/eval_table.txt",
    }
    adapters = _children(client, ev.info.run_id)
    assert set(adapters) == {"single_lora/single", "random_clusters/expert_0"}
    first = adapters["single_lora/single"][0]
    assert _history(client, first.info.run_id, "train_loss") == list(enumerate(single, start=1))
    assert adapters["random_clusters/expert_0"][0].data.tags["gs_ray.seed_index"] == "1"
    parent = client.get_run(ids["parent_run_id"]).data
    assert parent.metrics["verdict.mean"] == -0.125
    assert set(_children(client, ids["parent_run_id"])) == {*STAGES, tracking.EVAL}
