"""The methods ``gs-ray eval`` compares, one object each (docs/evaluation.md says what they are).

A ``Method`` answers four questions, and the controller (``baselines.py``) asks them in order:

* ``partition(ev, seed)`` - its clusters of the training samples, if it has its own (labels over
  the run's samples, -1 outside the training rows); its K experts are then trained by gs-ray eval;
* ``routed`` - whether gs-ray eval fits a router on that partition (the run's own kind);
* ``uses(ev, seed)`` - the adapters its plan needs (``Adapter`` keys), which decide what is trained
  and what the scorer loads;
* ``plan(ev, seed, routes)`` - how it answers each test query (``Plan``: adapters and weights);
* ``cost(ev)`` - the optimizer steps and seconds of its trainings (first seed).

``Adapter`` is the one key of an adapter, wherever it comes from (the warm-up, the run's experts
and generalist, an adapter gs-ray eval trains, a merge the scorer builds): its folder and its
peft name come from it, never from a name parsed back. ``METHODS`` holds one object per
``config.EvalMethod``; ``KAblation`` is the K ablation's partition (the paper's Fig. 6), a
method that is a row of the ablation table instead of the comparison.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from gs_ray.config import EvalMethod
from gs_ray.core.cosine import unit_rows
from gs_ray.core.seeds import eval_seed, expert_seed
from gs_ray.evaluation.analyses import Gradients, ablation_ks, gradients
from gs_ray.evaluation.compare import random_partition
from gs_ray.prepare import Prepared
from gs_ray.rundir import (
    EVAL_SEED_PREFIX,
    EXPERT_RECORD,
    GENERALIST,
    TRAIN_RECORD,
    WARMUP,
    RunDir,
    expert_name,
)

SINGLE = "single"  # the name of one LoRA on everything among an eval seed's adapters

AdapterSource = Literal["warmup", "expert", "generalist", "eval", "merged"]


@dataclasses.dataclass(frozen=True, order=True)
class Adapter:
    """One adapter a plan uses: the run's warm-up adapter, its expert ``cluster``, its
    generalist, one that gs-ray eval trains (``seed``, ``method``, ``cluster``; cluster None:
    one LoRA on all the training rows) or the merge of a seed's GradientSpace experts that the
    scorer builds (``merged``, ``seed``)."""

    source: AdapterSource
    seed: int = 0
    method: str = ""
    cluster: int | None = None

    @property
    def name(self) -> str:
        """Its peft adapter name in the scorer (and in logs)."""
        if self.source == "warmup":
            return WARMUP
        if self.source == "generalist":
            return GENERALIST
        if self.source == "expert":
            return expert_name(self.cluster)
        if self.source == "merged":
            return f"{EVAL_SEED_PREFIX}{self.seed}/merged"
        return f"{EVAL_SEED_PREFIX}{self.seed}/{self.method}/{self.leaf}"

    @property
    def job_name(self) -> str:
        """The Ray Train job that trains an eval adapter (its folder under ``eval_ray_train``:
        a resumed eval continues it)."""
        return f"eval-s{self.seed}-{self.method}-{self.leaf}"

    @property
    def leaf(self) -> str:
        """An eval adapter's folder name: ``expert_<c>``, or ``single``."""
        return SINGLE if self.cluster is None else expert_name(self.cluster)

    def path(self, run: RunDir) -> Path:
        """Where it lives in the run directory (a merge lives nowhere: the scorer builds it)."""
        if self.source == "warmup":
            return run.warmup_adapter
        if self.source == "generalist":
            return run.generalist
        if self.source == "expert":
            return run.expert(self.cluster)
        if self.source == "eval":
            return run.eval_adapter(self.seed, self.method, self.leaf)
        raise ValueError(f"{self.name} is built by the scorer, it has no folder")


@dataclasses.dataclass
class Plan:
    """How one method answers each test query: adapters (None: the base model) and weights
    (n_test, len(adapters)); its cost in forward passes (``gradient_passes`` of them are a
    query gradient, whose time is ``extra_ms``, as is the router's); whether it can be deployed
    (an oracle needs the answer)."""

    adapters: list[Adapter | None]
    weights: np.ndarray
    forward_passes: int
    extra_ms: float = 0.0
    deployable: bool = True
    gradient_passes: int = 0

    def latency_ms(self, forward_ms: float) -> float | None:
        """Milliseconds per query: the extra work and each model forward (None: an oracle)."""
        if not self.deployable:
            return None
        return self.extra_ms + forward_ms * (self.forward_passes - self.gradient_passes)


def one_hot(index: np.ndarray, k: int) -> np.ndarray:
    out = np.zeros((len(index), k))
    out[np.arange(len(index)), index] = 1.0
    return out


def on_train(n: int, train: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Labels over all ``n`` samples: ``values`` on the training rows, -1 elsewhere."""
    out = np.full(n, -1, dtype=np.int64)
    out[train] = values
    return out


def kmeans(x: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    """K-means in cosine geometry, ``n_init`` runs (``clustering.kmeans_n_init``)."""
    from sklearn.cluster import KMeans

    x = unit_rows(x)  # cosine geometry
    return KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit_predict(x).astype(np.int64)


def _encode_task(texts, router_cfg, cache_path):
    from gs_ray.routing.encoder import encode_cached

    return encode_cached(texts, router_cfg.encoder, cache_path, router_cfg.max_length)


def _train_record(folder: Path) -> dict:
    path = folder / TRAIN_RECORD
    return json.loads(path.read_text()) if path.exists() else {}


def _record(ev: Evaluation, adapter: Adapter) -> dict:
    """An adapter's training record: the run's generalist's, or one gs-ray eval trained."""
    if adapter.source == "generalist":
        return json.loads((ev.run.generalist / EXPERT_RECORD).read_text())
    return _train_record(adapter.path(ev.run))


def _cost(records: list[dict]) -> dict[str, Any]:
    return {
        "train_steps": sum(r.get("steps", 0) or 0 for r in records),
        "train_seconds": sum(r.get("seconds", 0) or 0 for r in records),
    }


class Evaluation:
    """What every method reads: the run, the rows they all share (the training rows less the
    calibration rows, which no adapter of the run was trained on; the test rows), K, each
    seed's partitions, and the analysis pass (computed once, on first use)."""

    def __init__(self, p: Prepared):
        self.p, self.run, self.cfg = p, p.run, p.cfg
        labels, k = p.assignments()
        train, test = p.fit_rows(), p.splits.test
        self.labels, self.k = labels, k
        self.train, self.test = train[labels[train] >= 0], test[labels[test] >= 0]
        # The run deploys the generalist fallback (calibrated by its ``calibrate`` stage).
        self.fallback = (
            p.cfg.fallback.enabled and p.run.fallback_json.exists() and p.run.generalist_complete()
        )
        self.parts: dict[int, dict[str, np.ndarray]] = {}  # seed -> method -> labels
        self.extra: dict[int, dict[str, Any]] = {}  # seed -> what a method's plan needs
        self._gradients: Gradients | None = None

    @property
    def n(self) -> int:
        return len(self.p.samples)

    def seed(self, seed_index: int) -> int:
        return eval_seed(self.cfg.run.seed, seed_index)

    def gradients(self) -> Gradients:
        """The analysis pass (``analyses.gradients``): the same warm-up adapter for every seed."""
        if self._gradients is None:
            ks = ablation_ks(self.cfg, self.k)
            self._gradients = gradients(self.p, self.train, self.test, self.labels[self.train], ks)
        return self._gradients

    @property
    def has_gradients(self) -> bool:
        return self._gradients is not None

    def generalist(self, seed_index: int) -> Adapter:
        """One LoRA on everything for a seed: the run's generalist (first seed), else trained
        here."""
        if seed_index == 0 and self.run.generalist_complete():
            return Adapter("generalist")
        return Adapter("eval", seed_index, "single_lora", None)

    def experts(self, method: str, seed_index: int, k: int | None = None) -> list[Adapter]:
        """A partitioned method's ``k`` experts (default the run's K); GradientSpace's are the
        run's own for the first seed and retrained ones after."""
        k = self.k if k is None else k
        if method == GradientSpace.family and seed_index == 0:
            return [Adapter("expert", cluster=c) for c in range(k)]
        return [Adapter("eval", seed_index, method, c) for c in range(k)]

    def expert_init(self, seed_index: int) -> Adapter:
        """Where a seed's experts (of any method) start: where the run's experts start
        (``Config.expert_start``): the seed's one LoRA on everything, or the warm-up adapter."""
        if self.cfg.expert_start == "generalist":
            return self.generalist(seed_index)
        return Adapter("warmup")

    def init_of(self, adapter: Adapter) -> Adapter:
        """Where an adapter gs-ray eval trains starts: an expert at ``expert_init``, one LoRA on
        everything at the warm-up adapter."""
        return Adapter("warmup") if adapter.cluster is None else self.expert_init(adapter.seed)

    def rows(self, adapter: Adapter) -> np.ndarray:
        """The training rows of an adapter gs-ray eval trains."""
        if adapter.cluster is None:
            return self.train
        part = self.parts[adapter.seed][adapter.method]
        return self.train[part[self.train] == adapter.cluster]

    def training_seed(self, adapter: Adapter) -> int:
        base = self.seed(adapter.seed)
        return base if adapter.cluster is None else expert_seed(base, adapter.cluster)


@dataclasses.dataclass
class Routes:
    """Each fitted router's p(k | prompt) on the test prompts and its latency (ms per prompt);
    keys from ``Routes.key`` (the run's router: GradientSpace's, for every seed)."""

    probs: dict[str, np.ndarray]
    ms: dict[str, float]

    @staticmethod
    def key(method: str, seed_index: int) -> str:
        if method == GradientSpace.family:
            return method
        return f"{method}@{seed_index}"

    def of(self, method: str, seed_index: int) -> tuple[np.ndarray, float]:
        key = self.key(method, seed_index)
        return self.probs[key], self.ms[key]


class Method:
    """One row of the comparison (see the module docstring)."""

    name: str
    routed: ClassVar[bool] = False  # gs-ray eval fits a router on its partition
    whole: ClassVar[bool] = False  # its experts train on every row: the K experts' step limit

    @property
    def family(self) -> str:
        """Whose partition, experts and router it uses (GradientSpace's variants share them)."""
        return self.name

    def partition(self, ev: Evaluation, seed_index: int) -> np.ndarray | None:
        return None

    def uses(self, ev: Evaluation, seed_index: int) -> list[Adapter]:
        raise NotImplementedError

    def plan(self, ev: Evaluation, seed_index: int, routes: Routes) -> Plan:
        raise NotImplementedError

    def cost(self, ev: Evaluation) -> dict[str, Any]:
        return {"train_steps": 0, "train_seconds": 0.0}

    def merges(self, ev: Evaluation, seed_index: int) -> dict[Adapter, list[Adapter]]:
        """Adapters the scorer builds for this method from others."""
        return {}


def _single(ev: Evaluation, adapters: list[Adapter | None]) -> Plan:
    return Plan(adapters, np.ones((len(ev.test), 1)), 1)


class Base(Method):
    name = "base"

    def uses(self, ev, seed_index):
        return []

    def plan(self, ev, seed_index, routes):
        return _single(ev, [None])


class Warmup(Method):
    name = "warmup"

    def uses(self, ev, seed_index):
        return [Adapter("warmup")]

    def plan(self, ev, seed_index, routes):
        return _single(ev, [Adapter("warmup")])


def _init_records(ev: Evaluation) -> list[dict]:
    """The training record of what the first seed's experts started from, where that is one
    LoRA on everything (``Evaluation.expert_init``): part of their cost."""
    adapter = ev.expert_init(0)
    return [] if adapter.source == "warmup" else [_record(ev, adapter)]


class SingleLora(Method):
    """One LoRA on all the training data: the run's generalist for the first seed."""

    name = "single_lora"

    def uses(self, ev, seed_index):
        return [ev.generalist(seed_index)]

    def plan(self, ev, seed_index, routes):
        return _single(ev, [ev.generalist(seed_index)])

    def cost(self, ev):
        return _cost([_record(ev, ev.generalist(0))])


class Merged(Method):
    """The seed's GradientSpace experts averaged into one adapter (built by the scorer)."""

    name = "merged"

    def uses(self, ev, seed_index):
        return ev.experts(GradientSpace.family, seed_index)

    def merges(self, ev, seed_index):
        return {Adapter("merged", seed_index): ev.experts(GradientSpace.family, seed_index)}

    def plan(self, ev, seed_index, routes):
        return _single(ev, [Adapter("merged", seed_index)])


class Partitioned(Method):
    """K experts of its own partition, trained by gs-ray eval (and routed by its own router
    where ``routed``)."""

    routed = True

    def uses(self, ev, seed_index):
        return ev.experts(self.name, seed_index)

    def plan(self, ev, seed_index, routes):
        probs, ms = routes.of(self.name, seed_index)
        return Plan(ev.experts(self.name, seed_index), one_hot(probs.argmax(1), ev.k), 1, ms)

    def cost(self, ev):
        return _cost(
            [_train_record(a.path(ev.run)) for a in ev.experts(self.name, 0)] + _init_records(ev)
        )


class SingleLoraMatched(Partitioned):
    """One LoRA on everything with the product's budget: one "expert" of a one-cluster partition,
    so it starts where the run's experts start (``Config.expert_start``; from the generalist it
    is the generalist trained on for the experts' epochs over every row: the passes of the
    generalist and the K experts together) and, with ``experts.max_steps``, gets the K experts'
    steps. With experts from the warm-up adapter it is one LoRA like ``single_lora``, another
    seed."""

    name = "single_lora_matched"
    routed = False
    whole = True

    def partition(self, ev, seed_index):
        return on_train(ev.n, ev.train, np.zeros(len(ev.train), dtype=np.int64))

    def uses(self, ev, seed_index):
        return ev.experts(self.name, seed_index, k=1)

    def plan(self, ev, seed_index, routes):
        return _single(ev, ev.experts(self.name, seed_index, k=1))

    def cost(self, ev):
        records = [_train_record(a.path(ev.run)) for a in ev.experts(self.name, 0, k=1)]
        return _cost(records + _init_records(ev))


class RandomClusters(Partitioned):
    """The run's cluster sizes, samples dealt at random."""

    name = "random_clusters"

    def partition(self, ev, seed_index):
        return random_partition(ev.parts[seed_index][GradientSpace.family], ev.seed(seed_index))


class EmbeddingKMeans(Partitioned):
    """K-means (K of the run) on the router encoder's prompt embeddings ("Mixture of LoRA")."""

    name = "embedding_kmeans"

    def partition(self, ev, seed_index):
        import ray

        from gs_ray.ray_utils import task_resources

        cfg = ev.cfg
        prompts = [ev.p.samples[i].prompt for i in ev.train]
        task = ray.remote(_encode_task).options(**task_resources())
        feats = ray.get(task.remote(prompts, cfg.router, str(ev.run.eval_prompt_features)))
        labels = kmeans(feats, ev.k, ev.seed(seed_index), cfg.clustering.kmeans_n_init)
        return on_train(ev.n, ev.train, labels)


class Elrea(Partitioned):
    """K-means on randomly projected gradients; at inference all K experts, weighted by the
    softmax of the query's gradient similarity to each cluster."""

    name = "elrea"
    routed = False

    def partition(self, ev, seed_index):
        from gs_ray.core.ensemble import gradient_similarity_probs

        grads, k = ev.gradients(), ev.k
        part = kmeans(grads.train, k, ev.seed(seed_index), ev.cfg.clustering.kmeans_n_init)
        # A cluster's inference centroid: the mean unit prompt-gradient of its members, so that
        # queries (prompts only) are compared with what they can be compared with.
        unit = unit_rows(grads.queries)
        centroids = np.stack([unit[: len(ev.train)][part == c].mean(0) for c in range(k)])
        ev.extra[seed_index]["elrea_weights"] = gradient_similarity_probs(
            grads.queries[len(ev.train) :], centroids, ev.cfg.eval.elrea_temperature
        )
        return on_train(ev.n, ev.train, part)

    def plan(self, ev, seed_index, routes):
        weights = ev.extra[seed_index]["elrea_weights"]
        ms = ev.gradients().query_ms
        return Plan(ev.experts(self.name, seed_index), weights, ev.k + 1, ms, gradient_passes=1)


class GradientSpace(Method):
    """What the run deploys: the router's expert, or the generalist where the calibrated router
    is unsure (the router alone where the run has no fallback)."""

    name = "gradientspace"
    family: ClassVar[str] = "gradientspace"  # the variants share it
    falls_back: ClassVar[bool] = True  # to the run's generalist (its cost counts the generalist's)

    def partition(self, ev, seed_index):
        return on_train(ev.n, ev.train, ev.labels[ev.train])

    def uses(self, ev, seed_index):
        experts = ev.experts(self.family, seed_index)
        return experts + ([ev.generalist(seed_index)] if self._fallback(ev) else [])

    def _fallback(self, ev: Evaluation) -> bool:
        """This method falls back, and the run has a calibrated generalist to fall back to."""
        return self.falls_back and ev.fallback

    def plan(self, ev, seed_index, routes):
        probs, ms = routes.of(self.family, seed_index)
        if not self._fallback(ev):  # the router's expert always
            return Plan(ev.experts(self.family, seed_index), one_hot(probs.argmax(1), ev.k), 1, ms)
        from gs_ray.routing.fallback import Fallback

        _, _, back = Fallback.load(ev.run.fallback_json).route(probs)
        adapters = ev.experts(self.family, seed_index) + [ev.generalist(seed_index)]
        return Plan(adapters, one_hot(np.where(back, ev.k, probs.argmax(1)), ev.k + 1), 1, ms)

    def cost(self, ev):
        records = ev.run.expert_records()
        if self.falls_back and ev.run.generalist_complete():
            records.append(_record(ev, Adapter("generalist")))
        elif not self.falls_back:
            records += _init_records(ev)
        return _cost(records)


class GradientSpaceNoFallback(GradientSpace):
    """The router's expert always."""

    name = "gradientspace_nofallback"
    falls_back = False


class GradientSpaceOracle(GradientSpaceNoFallback):
    """Routed by the gradient assignment, which needs the answer: a bound, not deployable."""

    name = "gradientspace_oracle"

    def plan(self, ev, seed_index, routes):
        weights = one_hot(ev.labels[ev.test], ev.k)
        return Plan(ev.experts(self.family, seed_index), weights, 1, deployable=False)

    def cost(self, ev):
        return Method.cost(self, ev)


class GradientSpaceEnsemble(GradientSpaceNoFallback):
    """All K experts weighted by the router's probabilities."""

    name = "gradientspace_ensemble"

    def plan(self, ev, seed_index, routes):
        probs, ms = routes.of(self.family, seed_index)
        return Plan(ev.experts(self.family, seed_index), probs, ev.k, ms)


class KAblation(Partitioned):
    """The K ablation's partition with ``k`` clusters (first seed only): GradientSpace's own
    estimator with K fixed on the analysis pass's full-dimensional training gradients, its
    experts routed by its own router, and by the test rows' gradient assignment (oracle)."""

    def __init__(self, k: int):
        self.k = k
        self.name = f"k{k}"  # an instance's name, like a method's

    def fit(self, ev: Evaluation) -> dict[str, Any]:
        return ev.gradients().ablation[self.k]

    def partition(self, ev, seed_index):
        return on_train(ev.n, ev.train, self.fit(ev)["train"])

    def uses(self, ev, seed_index):
        return ev.experts(self.name, seed_index, self.k)

    def plan(self, ev, seed_index, routes):
        probs, _ = routes.of(self.name, seed_index)
        return Plan(ev.experts(self.name, seed_index, self.k), one_hot(probs.argmax(1), self.k), 1)

    def oracle(self, ev: Evaluation) -> Plan:
        weights = one_hot(self.fit(ev)["test"], self.k)
        return Plan(ev.experts(self.name, 0, self.k), weights, 1, deployable=False)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Base(),
        Warmup(),
        SingleLora(),
        SingleLoraMatched(),
        RandomClusters(),
        EmbeddingKMeans(),
        Merged(),
        Elrea(),
        GradientSpace(),
        GradientSpaceNoFallback(),
        GradientSpaceOracle(),
        GradientSpaceEnsemble(),
    )
}
assert list(METHODS) == list(typing.get_args(EvalMethod)), "config.EvalMethod and METHODS differ"
