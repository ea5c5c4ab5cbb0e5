"""The run directory: the contract between stages.

Every stage reads its inputs from and writes its outputs to one folder, so that any stage can be
re-run, resumed or inspected on its own::

    manifest.json             config (secrets left out) and its SHA-256, versions, seed, data
                              counts and fingerprint, per-stage status and timings, resumes
    config.yaml               the resolved configuration (secrets left out)
    data/samples.jsonl        one line per sample: id, split, domain, n_tokens (no text)
    base_model/               tiny-llama only: the random-init base model and its tokenizer
    warmup/adapter/           Stage I LoRA adapter (peft format)
    ray_train/                Ray Train's runs (warmup, expert_<k>, generalist): their checkpoints
    stage2/k_selection.json   the K table (threshold, n_components, K, silhouette) and the SVD
    stage2/centroids.npy      final centroids (K, d), float32
    stage2/param_names.json   gradient layout: parameter names, shapes, offsets
    stage2/assignments.jsonl  one line per sample: id, split, cluster, domain
    stage2/checkpoint/        centroid-actor checkpoints (resume; deleted once Stage II is done)
    stage2/routability.json   clusters merged so that a router can follow them (mapping, why)
    experts/expert_<k>/       Stage III LoRA experts (peft format)
    experts/generalist/       the generalist fallback: one LoRA on all training rows
    selection/<name>/         a selection consumer's outputs (gist | less | random, or its own
                              name): scores.jsonl (id, score, rank; best first), summary.json,
                              and from gs-ray select ranked.jsonl / selected.jsonl (the input
                              records, best first / the budget's top)
    router/                   the router head and its settings (and features_train.npy,
                              features_calibration.npy: the encoder's features of the prompts)
    router/fallback.json      the router's calibration: temperature, confidence threshold
    eval/eval.json            gs-ray eval: every method's held-out numbers (and partitions.json,
                              adapters/seed<i>/<method>/... with train.json, routers/<method>/,
                              features_prompts.npy: the encoder's features of the prompts)
    ray_train_eval/           Ray Train's runs of gs-ray eval's baselines
    metrics.json              metrics gathered by all stages
    tracking.json             tracking.mlflow: the MLflow store, experiment, parent run and each
                              stage's nested run (a resume and gs-ray eval continue that run)
    report/report.html        the report: every table and figure in one file (and report.json)
    plots/*.png               figures
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from gs_ray.config import Config, ConfigError, config_from_dict
from gs_ray.errors import RunDirError, UserError
from gs_ray.io import atomic_write_text, write_json, write_jsonl

WARMUP = "warmup"  # the Stage I stage, its folder and its adapter's name
EXPERT_PREFIX = "expert_"
EXPERT_RECORD = "expert.json"  # an expert's (or the generalist's) training record
TRAIN_RECORD = "train.json"  # a gs-ray eval adapter's training record
GENERALIST = "generalist"  # the fallback adapter: its folder, training run and peft name
LOCK_FILE = ".lock"  # held (flock) by the process that runs the run's stages
EVAL_SEED_PREFIX = "seed"  # gs-ray eval's folders per seed: adapters/seed<i>/, routers/seed<i>/
_HELD_LOCKS: dict[str, Any] = {}  # run path -> the open lock file of this process
# Config fields never written into a run directory (manifest.json, config.yaml, and so the
# report): stored as null. Serving such a run takes the key from GS_RAY_API_KEY or
# --serve.api_key again.
SECRET_FIELDS = (("serve", "api_key"),)
# A sample's cluster label besides 0..K-1 (Stage II's labels and stage2/assignments.jsonl):
UNASSIGNED = -1  # not reached by the final pass (a bug if it survives)
SKIPPED = -2  # left out: non-finite gradient under stage2.nonfinite: skip (cluster null)


def expert_name(c: int) -> str:
    """The name of cluster c's expert: its folder, its training run and its peft adapter."""
    return f"{EXPERT_PREFIX}{c}"


ADAPTER_CONFIG = "adapter_config.json"  # peft's files in an adapter folder
ADAPTER_WEIGHTS = "adapter_model.*"
ADAPTER_SHA256 = "adapter_sha256"  # key of an adapter record (expert.json): adapter_digest


def adapter_complete(folder: Path) -> bool:
    """A peft adapter folder with its config and its weights (a finished export)."""
    return (folder / ADAPTER_CONFIG).exists() and any(folder.glob(ADAPTER_WEIGHTS))


def adapter_digest(folder: Path) -> str:
    """SHA-256 over an adapter folder's peft files (config and weights, by name, in order): what
    a resume keeps is what was trained there (``RunDir.check_adapter``)."""
    h = hashlib.sha256()
    for path in [folder / ADAPTER_CONFIG, *sorted(folder.glob(ADAPTER_WEIGHTS))]:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _check_digest(folder: Path, want: str | None, where: str, remedy: str) -> None:
    """RunDirError when the adapter in ``folder`` is not the one whose digest ``where`` kept
    (None: nothing kept, an older gs-ray: taken as it is)."""
    if want is not None and adapter_digest(folder) != want:
        raise RunDirError(
            f"{folder}: its adapter files differ from those gs-ray trained there ({where} "
            f"{ADAPTER_SHA256}); restore them, {remedy}"
        )


def stored_config(cfg: Config) -> tuple[dict[str, Any], list[str]]:
    """The config as a run directory keeps it: a plain dict with every ``SECRET_FIELDS`` value
    set to None, and the keys that had one (``serve.api_key``)."""
    data = cfg.to_dict()
    redacted = []
    for section, key in SECRET_FIELDS:
        if data.get(section, {}).get(key) is not None:
            data[section][key] = None
            redacted.append(f"{section}.{key}")
    return data, redacted


def config_hash(data: dict[str, Any]) -> str:
    """SHA-256 of a stored config (canonical JSON): the manifest's ``config_sha256``."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def versions() -> dict[str, str]:
    """Versions of the stack, for the manifest. DeepSpeed's is read from its package metadata:
    importing it takes a second here, and it imports MLflow where that is installed (its
    autotuner), which a run with tracking off must not (docs/tracking.md)."""
    from importlib.metadata import version

    out = {"python": platform.python_version()}
    for name in ("gs_ray", "torch", "ray", "transformers", "peft", "deepspeed", "sklearn", "numpy"):
        try:
            if name == "deepspeed":
                out[name] = version(name)
                continue
            module = __import__(name)
            out[name] = getattr(module, "__version__", "?")
        except Exception:  # an optional stack piece may be missing here
            out[name] = "missing"
    return out


class RunDir:
    """A run directory (see module docstring)."""

    def __init__(self, path: str | Path):
        # Absolute: Ray workers (Train, Tune, Serve) run in other working directories.
        self.path = Path(path).expanduser().resolve()
        self.created = False  # made by this process (``create``): a failed start may remove it

    @classmethod
    def create(cls, cfg: Config) -> RunDir:
        """A new run directory under cfg.run.output_dir, named cfg.run.name or by time, created
        exclusively: a name that exists is an error (continue it with ``--resume``), and two
        runs started in the same second get ``run-TIME``, ``run-TIME-2``, ..."""
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        if cfg.run.name:
            path = out / cfg.run.name
            try:
                path.mkdir()
            except FileExistsError:
                raise UserError(
                    f"run directory {path} exists: continue it with --resume {path}, or choose "
                    "another --run.name"
                ) from None
        else:
            stamp = time.strftime("run-%Y%m%d-%H%M%S")
            for i in itertools.count(1):
                path = out / (stamp if i == 1 else f"{stamp}-{i}")
                try:
                    path.mkdir()
                    break
                except FileExistsError:
                    continue
        run = cls(path)
        run.created = True
        run.hold_lock()
        stored, redacted = stored_config(cfg)
        write_json(
            run.manifest_path,
            {
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "seed": cfg.run.seed,
                "versions": versions(),
                "config": stored,
                "config_sha256": config_hash(stored),
                "redacted": redacted,
                "stages": {},
            },
        )
        run._write_config_yaml(stored)
        return run

    def _write_config_yaml(self, stored: dict[str, Any]) -> None:
        atomic_write_text(self.config_yaml, yaml.safe_dump(stored, sort_keys=False))

    def hold_lock(self) -> None:
        """Hold the run's lock (``.lock``, an exclusive ``flock``) until this process ends, so
        that two processes never write one run directory. Raises ``UserError`` naming the
        holder where another process has it; a process holding it already keeps it."""
        key = str(self.path)
        if key in _HELD_LOCKS:
            return
        f = (self.path / LOCK_FILE).open("a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(
                f"run directory {self.path} is in use by another gs-ray process ({holder}); wait "
                "for it to finish, or stop it"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        _HELD_LOCKS[key] = f

    def release_lock(self) -> None:
        """Let go of the lock (the process ends, or a failed start removes the directory)."""
        f = _HELD_LOCKS.pop(str(self.path), None)
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    # ------------------------------------------------------------------ paths

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def config_yaml(self) -> Path:
        return self.path / "config.yaml"

    def sub(self, *parts: str) -> Path:
        """A path inside the run directory (parent folders created)."""
        p = self.path.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def base_model(self) -> Path:
        return self.path / "base_model"

    @property
    def warmup_adapter(self) -> Path:
        return self.path / WARMUP / "adapter"

    @property
    def warmup_losses(self) -> Path:
        return self.path / WARMUP / "losses.json"

    @property
    def ray_train(self) -> Path:
        """Ray Train's runs (``warmup``, ``expert_<k>``, ``generalist``) and their checkpoints."""
        return self.path / "ray_train"

    @property
    def stage2(self) -> Path:
        return self.path / "stage2"

    @property
    def param_names_json(self) -> Path:
        """Stage II's gradient layout: parameter names, shapes, offsets."""
        return self.stage2 / "param_names.json"

    @property
    def assignments_path(self) -> Path:
        return self.stage2 / "assignments.jsonl"

    @property
    def checkpoint_dir(self) -> Path:
        return self.stage2 / "checkpoint"

    @property
    def experts_dir(self) -> Path:
        return self.path / "experts"

    def expert(self, k: int) -> Path:
        return self.experts_dir / expert_name(k)

    def expert_complete(self, k: int) -> bool:
        """An expert folder that a resume may keep: the peft files and gs-ray's record."""
        return adapter_complete(self.expert(k)) and (self.expert(k) / EXPERT_RECORD).exists()

    def expert_records(self) -> list[dict[str, Any]]:
        """Every expert's ``expert.json``, by cluster."""
        records = [
            json.loads(p.read_text())
            for p in self.experts_dir.glob(f"{EXPERT_PREFIX}*/{EXPERT_RECORD}")
        ]
        return sorted(records, key=lambda r: r.get("cluster", 0))

    def write_expert_record(self, k: int, record: dict[str, Any]) -> None:
        self.write_adapter_record(self.expert(k), {"cluster": k, **record})

    def write_adapter_record(self, folder: Path, record: dict[str, Any]) -> None:
        """An adapter's ``expert.json``, with the digest of the files it describes."""
        write_json(folder / EXPERT_RECORD, {**record, ADAPTER_SHA256: adapter_digest(folder)})

    def adapter_record(self, folder: Path) -> dict[str, Any] | None:
        """An adapter's ``expert.json`` (None where there is none)."""
        path = folder / EXPERT_RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def check_adapter(self, folder: Path) -> None:
        """Refuse to keep an adapter whose files are not those its record was written for (a
        file replaced or edited by hand, a copy from another run): a resume would build the
        router, the calibration and the evaluation on it. A record without a digest (an older
        gs-ray) is taken as it is."""
        want = json.loads((folder / EXPERT_RECORD).read_text()).get(ADAPTER_SHA256)
        _check_digest(
            folder,
            want,
            EXPERT_RECORD,
            f"delete {folder} to train it again, or resume with --redo experts",
        )

    def check_warmup_adapter(self) -> None:
        """``check_adapter`` for the warm-up adapter, whose digest is in the manifest's warm-up
        stage (Stage II's gradients are taken with it)."""
        stage = self.manifest().get("stages", {}).get("warmup", {})
        _check_digest(
            self.warmup_adapter,
            stage.get(ADAPTER_SHA256),
            "manifest.json's warmup",
            "or resume with --redo warmup",
        )

    @property
    def generalist(self) -> Path:
        """The generalist fallback adapter (``fallback.enabled``)."""
        return self.experts_dir / GENERALIST

    def generalist_complete(self) -> bool:
        return adapter_complete(self.generalist) and (self.generalist / EXPERT_RECORD).exists()

    @property
    def routability_json(self) -> Path:
        """The routability step's record: Stage II cluster -> merged cluster, and why."""
        return self.stage2 / "routability.json"

    @property
    def centroids_path(self) -> Path:
        return self.stage2 / "centroids.npy"

    @property
    def tune_results_json(self) -> Path:
        """``clustering.k_selection: tune``'s table K -> silhouette -> routed loss."""
        return self.path / "tune" / "results.json"

    @property
    def k_selection_json(self) -> Path:
        return self.stage2 / "k_selection.json"

    @property
    def fallback_json(self) -> Path:
        """The router's calibration on held-out training rows and the fallback threshold."""
        return self.router / "fallback.json"

    def discard_experts(self) -> None:
        shutil.rmtree(self.experts_dir, ignore_errors=True)

    def discard_stage2_checkpoint(self) -> None:
        """Delete the centroid actor's checkpoint (stale once Stage II is done or invalidated;
        it holds about 1,500 gradient rows: 393 MB at d = 65,536, docs/scaling.md)."""
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)

    def selection(self, name: str) -> Path:
        """A selection consumer's folder (``gs_ray.selection``), named by the consumer."""
        return self.path / "selection" / name

    def selection_scores(self, name: str) -> Path:
        return self.selection(name) / "scores.jsonl"

    def selection_summary(self, name: str) -> Path:
        return self.selection(name) / "summary.json"

    def selection_ranked(self, name: str) -> Path:
        """``gs-ray select``: the whole pool's input records, best first."""
        return self.selection(name) / "ranked.jsonl"

    def selection_selected(self, name: str) -> Path:
        """``gs-ray select``: the records within the budget, best first."""
        return self.selection(name) / "selected.jsonl"

    @property
    def router(self) -> Path:
        return self.path / "router"

    @property
    def router_features(self) -> Path:
        """The router encoder's features of the training prompts (``router.kind encoder``)."""
        return self.router / "features_train.npy"

    @property
    def calibration_features(self) -> Path:
        """... and of the calibration prompts (the routability step's held-out check)."""
        return self.router / "features_calibration.npy"

    @property
    def eval_dir(self) -> Path:
        """``gs-ray eval``'s outputs: eval.json, partitions.json, the baselines' adapters."""
        return self.path / "eval"

    @property
    def eval_json(self) -> Path:
        return self.eval_dir / "eval.json"

    @property
    def eval_ray_train(self) -> Path:
        """Ray Train's runs of ``gs-ray eval``'s baselines (apart from the run's own)."""
        return self.path / "ray_train_eval"

    @property
    def eval_prompt_features(self) -> Path:
        """The router encoder's features of the training prompts, cached by ``gs-ray eval``."""
        return self.eval_dir / "features_prompts.npy"

    @property
    def eval_partitions(self) -> Path:
        return self.eval_dir / "partitions.json"

    def eval_adapter(self, seed_index: int, method: str, name: str) -> Path:
        """A baseline's adapter trained by ``gs-ray eval`` (``name``: an expert or "single")."""
        return self.eval_dir / "adapters" / f"{EVAL_SEED_PREFIX}{seed_index}" / method / name

    def eval_train_records(self) -> Iterator[tuple[int, str, str, Path]]:
        """(seed index, method, adapter name, its train.json) of every baseline adapter that
        ``gs-ray eval`` trained (``eval_adapter``'s layout)."""
        pattern = f"{EVAL_SEED_PREFIX}*/*/*/{TRAIN_RECORD}"
        for path in sorted((self.eval_dir / "adapters").glob(pattern)):
            seed, method, name = path.parts[-4:-1]
            yield int(seed.removeprefix(EVAL_SEED_PREFIX)), method, name, path

    def eval_router(self, method: str, seed_index: int = 0) -> Path:
        return self.eval_dir / "routers" / f"{EVAL_SEED_PREFIX}{seed_index}" / method

    @property
    def report_html(self) -> Path:
        """The self-contained HTML report (``evaluation/report.py``)."""
        return self.path / "report" / "report.html"

    @property
    def report_json(self) -> Path:
        return self.path / "report" / "report.json"

    @property
    def metrics_path(self) -> Path:
        """metrics.json: what every stage measured (``add_metrics``)."""
        return self.path / "metrics.json"

    @property
    def tracking_json(self) -> Path:
        """The run's MLflow ids (``gs_ray.tracking``): store, experiment, parent and stage runs."""
        return self.path / "tracking.json"

    @property
    def plots(self) -> Path:
        p = self.path / "plots"
        p.mkdir(parents=True, exist_ok=True)
        return p

    # ------------------------------------------------------------------ manifest

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        """An existing run directory; RunDirError if it is missing or its manifest unreadable."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunDirError(f"{run.path}: no such run directory")
        run.manifest()
        return run

    def manifest(self) -> dict[str, Any]:
        """manifest.json; RunDirError (naming the file) if it is missing or not a JSON object."""
        try:
            m = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise RunDirError(
                f"{self.path} is not a gs-ray run directory (no manifest.json)"
            ) from None
        except (ValueError, OSError) as e:  # half-written JSON, bad bytes, unreadable
            raise RunDirError(f"{self.manifest_path}: unreadable or half-written ({e})") from e
        if not isinstance(m, dict):
            raise RunDirError(f"{self.manifest_path}: expected a JSON object")
        return m

    def update_manifest(self, **fields: Any) -> None:
        m = self.manifest()
        m.update(fields)
        write_json(self.manifest_path, m)

    def config(self) -> Config:
        """The run's configuration, from its manifest (checked as on loading)."""
        m = self.manifest()
        if "config" not in m:
            raise RunDirError(f"{self.manifest_path}: has no 'config'")
        try:
            return config_from_dict(m["config"])
        except ConfigError as e:
            raise RunDirError(f"{self.manifest_path}: config: {e}") from e

    def stage_done(self, stage: str) -> bool:
        return self.manifest().get("stages", {}).get(stage, {}).get("status") == "done"

    def mark_stage(self, stage: str, seconds: float, **info: Any) -> None:
        """Record a finished stage and its wall time."""
        m = self.manifest()
        m.setdefault("stages", {})[stage] = {"status": "done", "seconds": round(seconds, 3), **info}
        write_json(self.manifest_path, m)

    def invalidate(self, *stages: str) -> None:
        """Forget that these stages are done (something they depend on was redone)."""
        m = self.manifest()
        for stage in stages:
            m.get("stages", {}).pop(stage, None)
        write_json(self.manifest_path, m)

    def record_resume(
        self,
        cfg: Config,
        changed: dict[str, tuple[Any, Any]],
        invalidate: Iterable[str],
        redo: Iterable[str] = (),
    ) -> dict[str, Any]:
        """One manifest write for a resume: forget the ``invalidate`` stages, keep ``cfg`` as the
        run's config (secrets left out; config.yaml too) with its hash, and append to
        ``resumes`` when, what changed (``overrides``: key -> new value, ``previous``: key ->
        old value), the ``redo`` asked for and the finished stages it invalidated. Returns the
        entry."""
        m = self.manifest()
        stages = m.setdefault("stages", {})
        done = [s for s in invalidate if stages.get(s, {}).get("status") == "done"]
        for stage in invalidate:
            stages.pop(stage, None)
        stored, redacted = stored_config(cfg)
        entry = {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "overrides": {key: new for key, (_, new) in changed.items()},
            "previous": {key: old for key, (old, _) in changed.items()},
            "redo": list(redo),
            "invalidated": done,
        }
        m.setdefault("resumes", []).append(entry)
        m["config"], m["config_sha256"] = stored, config_hash(stored)
        m["redacted"] = sorted(set(m.get("redacted", [])) | set(redacted))
        write_json(self.manifest_path, m)
        self._write_config_yaml(stored)
        return entry

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict[str, Any]]:
        """``with run.stage("warmup") as info:`` times the block and, if it finishes, marks
        the stage done with whatever the block put into ``info``."""
        start = time.perf_counter()
        info: dict[str, Any] = {}
        yield info
        self.mark_stage(name, time.perf_counter() - start, **info)

    def add_metrics(self, **metrics: Any) -> None:
        path = self.metrics_path
        current = json.loads(path.read_text()) if path.exists() else {}
        current.update(metrics)
        write_json(path, current)

    def metrics(self) -> dict[str, Any]:
        path = self.metrics_path
        return json.loads(path.read_text()) if path.exists() else {}

    # ------------------------------------------------------------------ tables

    def write_jsonl(self, path: Path, rows: Iterable[dict[str, Any]]) -> None:
        write_jsonl(path, rows)

    @staticmethod
    def read_jsonl(path: Path) -> list[dict[str, Any]]:
        """Rows of a JSONL table; RunDirError naming file and line for a corrupt one."""
        rows = []
        with path.open() as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise RunDirError(f"{path}:{lineno}: corrupt line ({e})") from e
        return rows

    def assignments(self) -> list[dict[str, Any]]:
        """Rows of stage2/assignments.jsonl: id, split, cluster, domain."""
        return self.read_jsonl(self.assignments_path)

    def stage2_labels(self, sample_ids: list[str]) -> tuple[np.ndarray, int]:
        """(cluster per sample, K) exactly as Stage II wrote them (``SKIPPED`` where it left a
        sample out), checked against the run's samples, in order."""
        rows = self.assignments()
        if [r["id"] for r in rows] != list(sample_ids):
            raise RuntimeError(f"{self.assignments_path} does not match the data: re-run stage 2")
        labels = np.array([SKIPPED if r["cluster"] is None else r["cluster"] for r in rows])
        chosen = json.loads(self.k_selection_json.read_text())["chosen"]
        return labels.astype(np.int64), int(chosen["k"])


# --------------------------------------------------------------------------- selection outputs
# Folders named on the command line (not run directories); their layouts are defined here too.

MEMBER_PREFIX = "member_"


def member_name(m: int) -> str:
    """The name of G-SNR ensemble member m: its folder and its training run."""
    return f"{MEMBER_PREFIX}{m}"


class SpectraDir:
    """``gs-ray spectra --out DIR``::

    spectra.jsonl        one line per sample: id, subset, n_tokens, loss, and per projection the
                         nuclear norm and effective rank of every layer (lists in layer order)
    spectra.csv          the same in long form: one row per (sample, layer, projection)
    summary.json         per subset, projection and layer: mean and std of both metrics; the
                         B - A gaps; throughput (samples/s)
    layer_curves.png     mean metric per layer, one line per subset (the two-subset comparison)
    distributions.png    per-sample metric averaged over layers, one histogram per subset
    base_model/          tiny-llama only: the base model measured (it exists nowhere else)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def jsonl(self) -> Path:
        return self.path / "spectra.jsonl"

    @property
    def csv(self) -> Path:
        return self.path / "spectra.csv"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def layer_curves(self) -> Path:
        return self.path / "layer_curves.png"

    @property
    def distributions(self) -> Path:
        return self.path / "distributions.png"

    @property
    def base_model(self) -> Path:
        return self.path / "base_model"


class EnsembleDir:
    """The G-SNR ensemble's work folder::

    members/member_<m>/  the member's LoRA adapter (peft format)
    ray_train/           Ray Train's run folders (absolute path: every node must reach it)
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).absolute()

    def member(self, m: int) -> Path:
        return self.path / "members" / member_name(m)

    @property
    def storage(self) -> Path:
        return self.path / "ray_train"
