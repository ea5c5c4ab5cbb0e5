"""Experiment tracking with MLflow (``tracking.mlflow``; docs/tracking.md).

A run directory is one MLflow run (the parent) in the experiment ``tracking.experiment``: the
config as its params (secrets left out, as the run directory keeps it), and a nested run per
stage (``warmup``, ``tune``, ``stage2``, ... and ``eval`` for ``gs-ray eval``), with a nested run
per adapter under ``experts`` (``expert_<k>``, ``generalist``) and under ``eval`` (each
baseline's adapters), each with its training loss per optimizer step. At the end the parent gets
the report, the plots, ``k_selection.json`` and the held-out losses. The parent run's id is kept
in the run directory (``RunDir.tracking_json``), so that ``--resume`` and ``gs-ray eval``
continue the same MLflow run; a stage that was done before is logged from the run directory
unless that MLflow run has it already.

What a stage logs is read from the run directory once the stage is done (``STAGE_LOGS``, one
function per stage), in the driver: the per-step losses are the training records' (every step,
across retries), so Ray Train's workers never talk to MLflow. Ray Tune's trials are logged by
Ray's own ``MLflowLoggerCallback`` (in the driver too), nested under the ``tune`` run
(``trial_parent``).

This is the only module that imports MLflow, and only when a tracking URI is set:
``open_tracker`` returns a ``Tracker`` that records nothing otherwise, so a run with tracking off
never imports MLflow. A failed call to the tracking store is logged as a warning and the run goes
on. Free of Ray.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from gs_ray.config import TRACKING_OFF, Config, StageName, TrackingConfig, check_tracking_uri
from gs_ray.errors import ConfigError, UserError
from gs_ray.io import write_json
from gs_ray.rundir import GENERALIST, RunDir, expert_name, stored_config

log = logging.getLogger(__name__)

URI_ENV = "MLFLOW_TRACKING_URI"  # MLflow's own convention: tracking on where it names a store
# MLflow 3 refuses its file store unless this is set; a `file:` URI in gs-ray's config is that
# choice made (set for this process only, where the user has not set it).
FILE_STORE_ENV = "MLFLOW_ALLOW_FILE_STORE"
EVAL = "eval"  # the nested run of gs-ray eval
LOSS = "train_loss"  # the metric of an adapter's loss per optimizer step (steps from 1)
RunStatus = Literal["FINISHED", "FAILED", "KILLED"]  # MLflow's names for a run's end
# MLflow's batch limits (log_batch): metrics, params and tags per call.
_BATCH = {"metrics": 1000, "params": 100, "tags": 100}
_PARAM_CHARS, _TAG_CHARS = 6000, 5000
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")  # stores that need the full mlflow
_SUPERSEDED = "gs_ray.superseded_by"  # tag of a stage's earlier nested run that a rerun replaced


# --------------------------------------------------------------------------- the URI


def _source(cfg: TrackingConfig) -> tuple[str, str] | None:
    """(URI, where it came from: tracking.mlflow or MLFLOW_TRACKING_URI), or None (off)."""
    if cfg.mlflow == TRACKING_OFF:
        return None
    if cfg.mlflow is not None:
        return cfg.mlflow, "tracking.mlflow"
    uri = os.environ.get(URI_ENV, "").strip()
    return (uri, URI_ENV) if uri else None


def resolve_uri(cfg: TrackingConfig) -> str | None:
    """The run's tracking URI: ``tracking.mlflow``, else MLFLOW_TRACKING_URI, else None (off);
    ``off`` is off. A local folder, ``file:`` or ``sqlite:`` path is made absolute (a resume or
    ``gs-ray eval`` may run elsewhere). Raises ConfigError naming the key or variable."""
    source = _source(cfg)
    if source is None:
        return None
    check_tracking_uri(*source)
    return _absolute(source[0])


def _absolute(uri: str) -> str:
    parts = urlsplit(uri)
    if uri == "databricks":
        return uri
    if len(parts.scheme) <= 1:  # a folder (or a Windows drive letter)
        return Path(uri).expanduser().resolve().as_uri()
    if parts.scheme == "file" and not parts.netloc:
        return Path(unquote(parts.path)).expanduser().resolve().as_uri()
    if parts.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        return f"sqlite:///{path.expanduser().resolve()}" if not path.is_absolute() else uri
    return uri


def check(cfg: Config) -> None:
    """Before Ray starts: the tracking URI (config or environment) is well-formed and the MLflow
    package it needs is installed (looked up, not imported). Raises ConfigError naming the key
    or variable and the fix."""
    uri = resolve_uri(cfg.tracking)
    if uri is None:
        return
    key = _source(cfg.tracking)[1]
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"{key}: tracking to {uri} needs MLflow: pip install 'gs-ray[tracking]' (or set "
            f"--tracking.mlflow {TRACKING_OFF})"
        )
    scheme = urlsplit(uri).scheme.split("+")[0]
    if scheme in _DATABASES and importlib.util.find_spec("sqlalchemy") is None:
        raise ConfigError(
            f"{key}: tracking to a {scheme} database needs the full MLflow package (pip install "
            "mlflow==<the mlflow-skinny version of constraints.txt>); the `tracking` extra "
            "(mlflow-skinny) writes a file: store"
        )


@contextlib.contextmanager
def without_mlflow() -> Iterator[None]:
    """Imports inside see no MLflow, unless it is loaded already: DeepSpeed's autotuner does
    ``try: import mlflow`` when DeepSpeed is imported, which gs-ray's Ray Train workers (which
    never log to MLflow) and a run with tracking off must not pay for."""
    if "mlflow" in sys.modules:
        yield
        return
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError inside
    try:
        yield
    finally:
        if "mlflow" in sys.modules and sys.modules["mlflow"] is None:
            del sys.modules["mlflow"]


# --------------------------------------------------------------------------- the interface


class StageRun:
    """A stage's nested run while the stage runs, for what only the stage has (a text table,
    say). This one records nothing (tracking off)."""

    run_id: str | None = None

    def log_text(self, text: str, artifact_file: str) -> None:
        """``text`` as the artifact ``artifact_file`` of the stage's run."""


class Tracker:
    """What the pipeline, ``gs-ray eval`` and Tune call. This one, tracking off, does nothing
    (``MlflowTracker`` records); use it as a context manager, which closes the parent run."""

    enabled = False

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        status: RunStatus = "FINISHED" if kind is None else "FAILED"
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            status = "KILLED"
        self.close(status)
        return False

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRun]:
        """A stage runs inside: its nested run opens before, and once the stage is done what it
        wrote into the run directory is logged (``STAGE_LOGS``); a failure ends it FAILED."""
        yield StageRun()

    def log_kept(self, name: str) -> None:
        """A stage done before (kept): logged from the run directory, unless this MLflow run
        has it already."""

    def log_done_stages(self) -> None:
        """``log_kept`` for every pipeline stage the run's manifest marks done."""

    def log_outputs(self) -> None:
        """The report, the plots and ``k_selection.json`` as the parent run's artifacts, and
        the held-out losses as its metrics."""

    def close(self, status: RunStatus = "FINISHED") -> None:
        """End the parent run (a resume or ``gs-ray eval`` opens it again)."""


def open_tracker(cfg: Config, run: RunDir) -> Tracker:
    """The tracker of ``run`` under ``cfg``: ``Tracker()`` where no tracking URI is set (MLflow is
    not imported), else an ``MlflowTracker`` on the run's MLflow run, continued where the run
    directory names one in the same store and experiment, started otherwise."""
    uri = resolve_uri(cfg.tracking)
    if uri is None:
        return Tracker()
    try:
        return MlflowTracker(uri, cfg, run)
    except ImportError as e:
        raise UserError(f"tracking to {uri} needs MLflow: pip install 'gs-ray[tracking]'") from e
    except UserError:
        raise
    except Exception as e:  # the store refuses or cannot be reached: say so before any stage
        raise UserError(
            f"tracking: could not open the MLflow run in {uri} ({type(e).__name__}: {e}); "
            f"fix the store, or run without tracking (--tracking.mlflow {TRACKING_OFF})"
        ) from e


@dataclass(frozen=True)
class TrialParent:
    """Where Ray Tune's ``MLflowLoggerCallback`` logs a stage's trials: this store and
    experiment, each trial a run nested under the stage's (``tags``)."""

    uri: str
    experiment: str
    tags: dict[str, str]


_OPEN_STAGES: dict[tuple[str, str], TrialParent] = {}  # (run path, stage) -> while it runs


def trial_parent(run: RunDir, stage: str) -> TrialParent | None:
    """The stage's nested run while this process's tracker has it open (None: tracking off)."""
    return _OPEN_STAGES.get((str(run.path), stage))


# --------------------------------------------------------------------------- MLflow


class MlflowTracker(Tracker):
    """The run directory as one MLflow parent run (see the module docstring). Its ids are kept
    in ``RunDir.tracking_json``: the store (password-free URI), experiment, parent run, and the
    nested run of each stage."""

    enabled = True

    def __init__(self, uri: str, cfg: Config, run: RunDir):
        if urlsplit(uri).scheme == "file":
            os.environ.setdefault(FILE_STORE_ENV, "true")
        from mlflow.tracking import MlflowClient

        self.uri, self.experiment, self.run = uri, cfg.tracking.experiment, run
        self.client = MlflowClient(tracking_uri=uri)
        state = self._state()
        same = state.get("uri") == uri and state.get("experiment") == self.experiment
        if same and self._exists(state.get("parent_run_id")):
            self.state = state
            self.parent = _Run(self.client, state["parent_run_id"])
            self.client.update_run(self.parent.id, status="RUNNING")
            self._continued(cfg)
            log.info("tracking: continuing MLflow run %s in %s", self.parent.id, uri)
        else:
            if state:
                log.warning(
                    "tracking: the run was tracked in %s (experiment %s); a new MLflow run now",
                    state.get("uri"),
                    state.get("experiment"),
                )
            self.parent = self._start(cfg)
            self.state = {
                "uri": uri,
                "experiment": self.experiment,
                "experiment_id": self.experiment_id,
                "parent_run_id": self.parent.id,
                "stages": {},
            }
            self._save()
            log.info("tracking: MLflow run %s in %s (%s)", self.parent.id, uri, self.experiment)

    # ---------------------------------------------------------------- the parent run

    def _state(self) -> dict[str, Any]:
        path = self.run.tracking_json
        return json.loads(path.read_text()) if path.exists() else {}

    def _save(self) -> None:
        write_json(self.run.tracking_json, self.state)

    def _exists(self, run_id: str | None) -> bool:
        if not run_id:
            return False
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except Exception:  # MlflowException: no such run in this store
            return False

    def _finished(self, run_id: str) -> bool:
        return self.client.get_run(run_id).info.status == "FINISHED"

    def _start(self, cfg: Config) -> _Run:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None and found.lifecycle_stage != "active":
            raise UserError(
                f"tracking: the MLflow experiment {self.experiment!r} is deleted in {self.uri}; "
                "restore it, or choose another --tracking.experiment"
            )
        self.experiment_id = (
            found.experiment_id if found else self.client.create_experiment(self.experiment)
        )
        created = self.client.create_run(
            self.experiment_id,
            run_name=self.run.path.name,
            tags={"gs_ray.run_dir": str(self.run.path)},
        )
        parent = _Run(self.client, created.info.run_id)
        parent.params(params_of(cfg))
        return parent

    def _continued(self, cfg: Config) -> None:
        """A continued run: the config keys it has no param for yet become params (MLflow's
        params cannot change), and each resume a tag with what it changed."""
        have = self.client.get_run(self.parent.id).data.params
        self.parent.params({k: v for k, v in params_of(cfg).items() if k not in have})
        resumes = self.run.manifest().get("resumes", [])
        if resumes:
            self.parent.tags(
                {f"gs_ray.resume_{len(resumes)}": json.dumps(resumes[-1].get("overrides", {}))}
            )

    def close(self, status: RunStatus = "FINISHED") -> None:
        _safely("end the run", self.client.set_terminated, self.parent.id, status)

    # ---------------------------------------------------------------- stages

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageRun]:
        child = _safely(f"open the {name} run", self._open_stage, name)
        if child is None:
            yield StageRun()
            return
        key = (str(self.run.path), name)
        _OPEN_STAGES[key] = TrialParent(
            self.uri, self.experiment, {"mlflow.parentRunId": child.id, "gs_ray.stage": name}
        )
        # MLflow's fluent API (Ray's MLflowLoggerCallback uses it) sets MLFLOW_TRACKING_URI in
        # this process's environment: put it back, so that a later run here is tracked only
        # where it asks to be.
        environment = os.environ.get(URI_ENV)
        try:
            yield _MlflowStageRun(child)
        except BaseException as e:
            failed: RunStatus = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
            _safely(f"end the {name} run", child.end, failed)
            raise
        finally:
            _OPEN_STAGES.pop(key, None)
            if environment is None:
                os.environ.pop(URI_ENV, None)
            else:
                os.environ[URI_ENV] = environment
        _safely(f"log the {name} stage", STAGE_LOGS[name], self.run, child)
        _safely(f"end the {name} run", child.end, "FINISHED")

    def _open_stage(self, name: str, kept: bool = False) -> _Run:
        """A nested run for the stage; an earlier one of the same name (a rerun on resume) is
        tagged as superseded by it."""
        child = self.parent.child(name, {"gs_ray.stage": name, "gs_ray.kept": str(kept).lower()})
        earlier = self.state["stages"].get(name)
        if earlier and earlier != child.id:
            _safely("tag the earlier run", self.client.set_tag, earlier, _SUPERSEDED, child.id)
        self.state["stages"][name] = child.id
        self._save()
        return child

    def log_kept(self, name: str) -> None:
        earlier = self.state["stages"].get(name)
        if earlier and _safely("read a run", self._finished, earlier):
            return  # (one left unfinished, by a crash while it was logged, is logged again)
        child = _safely(f"open the {name} run", self._open_stage, name, True)
        if child is not None:
            _safely(f"log the {name} stage", STAGE_LOGS[name], self.run, child)
            _safely(f"end the {name} run", child.end, "FINISHED")

    def log_done_stages(self) -> None:
        for name in get_args(StageName):
            if self.run.stage_done(name):
                self.log_kept(name)

    def log_outputs(self) -> None:
        _safely("log the run's outputs", log_outputs, self.run, self.parent)


class _MlflowStageRun(StageRun):
    def __init__(self, run: _Run):
        self._run, self.run_id = run, run.id

    def log_text(self, text: str, artifact_file: str) -> None:
        _safely(f"log {artifact_file}", self._run.text, text, artifact_file)


def _safely(what: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or None with a warning where the tracking store fails: tracking never
    stops a run."""
    try:
        return fn(*args)
    except Exception as e:  # any store or network error
        log.warning("tracking: could not %s (%s: %s); the run goes on", what, type(e).__name__, e)
        return None


class _Run:
    """One MLflow run being written: batches of metrics, params and tags, artifacts, children."""

    def __init__(self, client: Any, run_id: str):
        self.client, self.id = client, run_id

    def _batch(self, kind: str, items: list[Any]) -> None:
        size = _BATCH[kind]
        for i in range(0, len(items), size):
            self.client.log_batch(self.id, **{kind: items[i : i + size]})

    def metrics(self, values: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._batch("metrics", [Metric(_key(k), v, now, step) for k, v in values.items()])

    def series(self, key: str, values: Iterable[Any], first: int = 1) -> None:
        """One metric over steps ``first``, ``first + 1``, ... (None and non-finite left out)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [
            Metric(_key(key), float(v), now, first + i)
            for i, v in enumerate(values)
            if _number(v) is not None
        ]
        self._batch("metrics", rows)

    def summary(self, data: dict[str, Any], prefix: str = "") -> None:
        """A record's numbers as metrics and its words as tags, nested keys joined by '.'
        (lists left out: their series are logged where they mean steps)."""
        numbers, words = {}, {}
        for key, value in _flat(data, prefix):
            if isinstance(value, str):
                words[key] = value
            elif _number(value) is not None:
                numbers[key] = _number(value)
        self.metrics(numbers)
        self.tags(words)

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        self._batch("params", [Param(_key(k), v[:_PARAM_CHARS]) for k, v in values.items()])

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self._batch("tags", [RunTag(_key(k), v[:_TAG_CHARS]) for k, v in values.items()])

    def artifact(self, path: Path, folder: str | None = None) -> None:
        """A file of the run directory (none: nothing)."""
        if path.is_file():
            self.client.log_artifact(self.id, str(path), folder)

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.id, text, artifact_file)

    def child(self, name: str, tags: dict[str, str] | None = None) -> _Run:
        """A run nested under this one."""
        run = self.client.get_run(self.id)
        created = self.client.create_run(
            run.info.experiment_id,
            run_name=name,
            tags={"mlflow.parentRunId": self.id, **(tags or {})},
        )
        return _Run(self.client, created.info.run_id)

    def end(self, status: RunStatus = "FINISHED") -> None:
        self.client.set_terminated(self.id, status)


def _key(key: str) -> str:
    """A name MLflow takes: letters, digits, _ - . space : / (others become _)."""
    return re.sub(r"[^\w\-. :/]", "_", str(key))


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _flat(data: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def params_of(cfg: Config) -> dict[str, str]:
    """The config as MLflow params: one per leaf key (``section.key``), as the run directory
    keeps it (``rundir.stored_config``: secrets left out); lists as JSON."""
    return {
        key: value if isinstance(value, str) else json.dumps(value)
        for key, value in _flat(stored_config(cfg)[0])
    }


# --------------------------------------------------------------------------- what a stage logs


def _read(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _common(run: RunDir, name: str, out: _Run, section: str | None = "") -> dict[str, Any]:
    """The stage's manifest entry (seconds and what the stage recorded, as ``stage.*``) and its
    ``section`` of metrics.json ("": the stage's name; None: none), numbers as metrics and words
    as tags; returns that section."""
    entry = run.manifest().get("stages", {}).get(name, {})
    out.summary({k: v for k, v in entry.items() if k != "status"}, "stage.")
    values = (run.metrics().get(section or name) or {}) if section is not None else {}
    out.summary(values)
    return values


def _adapter(parent: _Run, name: str, record: dict[str, Any], tags: dict[str, str]) -> None:
    """A nested run for one adapter: its training record's numbers and its loss per step."""
    child = parent.child(name, {"gs_ray.adapter": name, **tags})
    child.summary({k: v for k, v in record.items() if k != "losses"})
    child.series(LOSS, record.get("losses") or [])
    child.end("FINISHED")


def _log_warmup(run: RunDir, out: _Run) -> None:
    _common(run, "warmup", out)
    out.series(LOSS, (_read(run.warmup_losses) or {}).get(LOSS) or [])


def _log_tune(run: RunDir, out: _Run) -> None:
    """The K search's table (K -> routed held-out loss, silhouette) as metrics over K; each
    trial is a nested run of its own, logged by Tune's MLflowLoggerCallback as it ran."""
    _common(run, "tune", out)
    for row in (_read(run.tune_results_json) or {}).get("table", []):
        out.metrics(
            {k: v for k, v in row.items() if k != "k" and _number(v) is not None}, step=row["k"]
        )
    out.artifact(run.tune_results_json, "tune")


def _log_stage2(run: RunDir, out: _Run) -> None:
    """Stage II's summary, the share of samples that changed cluster in each online epoch and
    the centroid shift (steps: epochs from 1), the cluster sizes (steps: clusters from 0), and
    the K-selection table (per variance threshold, the silhouettes over K), k_selection.json."""
    section = _common(run, "stage2", out)
    out.series("changed_share", section.get("changed_share") or [])
    out.series("centroid_shift", section.get("centroid_shift") or [])
    out.series("cluster_size_train", section.get("cluster_sizes_train") or [], first=0)
    table = _read(run.k_selection_json) or {}
    for row in table.get("table", []):
        prefix = f"k_selection.threshold_{row['threshold']:g}."
        out.metrics(
            {
                prefix + k: _number(v)
                for k, v in row.items()
                if k not in ("k", "threshold") and _number(v) is not None
            },
            step=row["k"],
        )
    out.summary(table.get("chosen") or {}, "chosen.")
    out.artifact(run.k_selection_json, "stage2")


def _log_routability(run: RunDir, out: _Run) -> None:
    _common(run, "routability", out)
    out.artifact(run.routability_json, "stage2")


def _log_experts(run: RunDir, out: _Run) -> None:
    """One nested run per adapter (each expert, the generalist) with its loss per step."""
    _common(run, "experts", out, section=None)
    for record in run.expert_records():
        name = expert_name(record["cluster"])
        _adapter(out, name, record, {"gs_ray.cluster": str(record["cluster"])})
    generalist = run.adapter_record(run.generalist)
    if generalist is not None:
        _adapter(out, GENERALIST, generalist, {})


def _log_router(run: RunDir, out: _Run) -> None:
    """The router's accuracies, and per cluster (steps: clusters from 0) on the held-out rows."""
    section = _common(run, "router", out)
    per_cluster = section.get("per_cluster_holdout_accuracy")
    if isinstance(per_cluster, list):
        out.series("per_cluster_holdout_accuracy", per_cluster, first=0)


def _log_calibrate(run: RunDir, out: _Run) -> None:
    _common(run, "calibrate", out, section="fallback")
    out.artifact(run.fallback_json, "router")


def _log_evaluate(run: RunDir, out: _Run) -> None:
    """Held-out losses; each expert's and the warm-up's on its cluster's test rows (steps:
    clusters from 0)."""
    section = _common(run, "evaluate", out, section="evaluation")
    for row in section.get("own_cluster") or []:
        values = {f"own_cluster.{k}": row.get(k) for k in ("expert", "warmup", "n")}
        out.metrics({k: v for k, v in values.items() if _number(v) is not None}, row["cluster"])


def _log_eval(run: RunDir, out: _Run) -> None:
    """``gs-ray eval``: every method's numbers (``<method>.test_loss``, ``.vs_reference.mean``,
    ...), the verdict, eval.json, and a nested run per baseline adapter with its loss per
    step."""
    ev = _read(run.eval_json) or {}
    for method, row in (ev.get("methods") or {}).items():
        out.summary({k: v for k, v in row.items() if k != "per_seed"}, f"{method}.")
    out.summary(ev.get("verdict") or {}, "verdict.")
    out.summary({k: ev.get(k) for k in ("n_test", "n_train", "k", "seconds")})
    out.artifact(run.eval_json, "eval")
    for seed, method, name, path in run.eval_train_records():
        _adapter(out, f"{method}/{name}", _read(path), {"gs_ray.seed_index": str(seed)})


STAGE_LOGS: dict[str, Callable[[RunDir, _Run], None]] = {
    "warmup": _log_warmup,
    "tune": _log_tune,
    "stage2": _log_stage2,
    "routability": _log_routability,
    "experts": _log_experts,
    "router": _log_router,
    "calibrate": _log_calibrate,
    "evaluate": _log_evaluate,
    EVAL: _log_eval,
}
assert set(STAGE_LOGS) == {*get_args(StageName), EVAL}, "a stage without its STAGE_LOGS row"


def log_outputs(run: RunDir, out: _Run) -> None:
    """The parent run's artifacts (report, plots, k_selection.json, metrics.json) and headline
    metrics (the data's counts and splits, held-out losses, K, the eval verdict)."""
    out.summary(run.manifest().get("data") or {}, "data.")
    out.summary(
        {k: v for k, v in (run.metrics().get("evaluation") or {}).items() if k != "own_cluster"}
    )
    chosen = (_read(run.k_selection_json) or {}).get("chosen") or {}
    out.summary({"k": chosen.get("k")})
    out.summary(((_read(run.eval_json) or {}).get("verdict")) or {}, "verdict.")
    for path in (run.report_html, run.report_json):
        out.artifact(path, "report")
    for path in sorted(run.plots.glob("*.png")):
        out.artifact(path, "plots")
    out.artifact(run.k_selection_json, "stage2")
    out.artifact(run.metrics_path)
