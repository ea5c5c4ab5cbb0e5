"""Stage II's pieces without Ray or a model: the plan walked by the local executor over planted
gradients, the non-finite policy, the transports registry and the run directory's stage
bookkeeping."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from gs_ray.config import Config, Transport
from gs_ray.data import Sample
from gs_ray.stage2 import (
    CentroidHost,
    NonFiniteGradientError,
    Stage2Plan,
    make_clusterer,
    run_stage2_local,
)
from gs_ray.stage2.computer import check_finite
from gs_ray.stage2.result import SKIPPED
from gs_ray.stage2.transports import TRANSPORTS, make_transport

D, K_TRUE = 400, 3


class PlantedComputer:
    """Stands in for GradientComputer: sample i's gradient is a fixed row of a planted mixture
    (the sample's input_ids[0] is its row); ``poison`` rows are NaN."""

    def __init__(self, G: np.ndarray, nonfinite: str = "fail", poison: tuple[int, ...] = ()):
        self.G = G.copy()
        self.G[list(poison)] = np.nan
        self.nonfinite = nonfinite
        self.calls = 0

    def batch(self, pairs, ids):
        self.calls += 1
        return check_finite(self.G[[p[0][0] for p in pairs]], ids, self.nonfinite)

    def layout(self):
        return {"dim": self.G.shape[1], "projection_dim": None}


def planted(n: int = 240, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(D, K_TRUE)))[0].T  # orthonormal
    truth = rng.integers(0, K_TRUE, size=n)
    norms = 10 ** rng.uniform(-1, 1, size=(n, 1))
    G = norms * (directions[truth] + 0.15 * rng.normal(size=(n, D)) / np.sqrt(D))
    return G.astype(np.float32), truth


def plan_for(n: int, batch: int = 16, epochs: int = 3, seed: int = 0) -> Stage2Plan:
    rng = np.random.default_rng(seed)
    val = np.arange(0, 64)
    train = np.arange(n)
    online = [
        [b for b in np.array_split(rng.permutation(train), n // batch)] for _ in range(epochs)
    ]
    final = np.array_split(np.arange(n), n // batch)
    return Stage2Plan(val=[val[:32], val[32:]], online=online, final=final)


def config(**clustering) -> Config:
    cfg = Config()
    cfg.clustering.batch_size = 16
    cfg.clustering.max_epochs = 3
    for key, value in clustering.items():
        setattr(cfg.clustering, key, value)
    return cfg


def samples(n: int) -> list[Sample]:
    return [Sample(id=f"s{i}", input_ids=[i], labels=[i]) for i in range(n)]


def test_local_executor_recovers_planted_clusters():
    G, truth = planted()
    cfg = config()
    computer = PlantedComputer(G)
    res = run_stage2_local(
        plan_for(len(G)), samples(len(G)), computer, CentroidHost(make_clusterer(cfg), len(G))
    )
    assert res.k == K_TRUE
    assert adjusted_rand_score(truth, res.labels) == 1.0
    assert res.val_grads.shape == (64, D)
    assert res.info["executor"] == "local"
    assert not hasattr(res.clusterer, "cache_")  # travels without its caches
    summary = res.clusterer.summary()
    assert summary["k"] == K_TRUE


def test_nonfinite_gradient_fails_naming_the_sample():
    G, _ = planted()
    computer = PlantedComputer(G, poison=(70,))
    host = CentroidHost(make_clusterer(config()), len(G))
    with pytest.raises(NonFiniteGradientError, match=r"s70\b"):
        run_stage2_local(plan_for(len(G)), samples(len(G)), computer, host)


def test_nonfinite_gradient_skipped_and_counted_under_skip_policy():
    G, truth = planted()
    poison = (5, 70, 133)  # one in the validation subset, two in training
    computer = PlantedComputer(G, nonfinite="skip", poison=poison)
    res = run_stage2_local(
        plan_for(len(G)), samples(len(G)), computer, CentroidHost(make_clusterer(config()), len(G))
    )
    assert sorted(res.skipped.tolist()) == list(poison)
    assert (res.labels[list(poison)] == SKIPPED).all()
    assert res.info["n_skipped"] == len(poison)
    assert res.val_grads.shape == (63, D)  # the poisoned validation row is left out
    keep = np.setdiff1d(np.arange(len(G)), poison)
    assert np.isfinite(res.clusterer.cluster_centers_).all()
    assert adjusted_rand_score(truth[keep], res.labels[keep]) == 1.0


def test_check_finite_names_every_bad_row():
    G = np.ones((4, 3), dtype=np.float32)
    G[1, 2], G[3, 0] = np.inf, np.nan
    with pytest.raises(NonFiniteGradientError) as err:
        check_finite(G, ["a", "b", "c", "d"], "fail")
    assert err.value.ids == ["b", "d"]
    batch = check_finite(G, ["a", "b", "c", "d"], "skip")
    assert batch.skipped.tolist() == [False, True, False, True]
    assert np.isfinite(batch.G).all() and batch.kept().shape == (2, 3)


def test_transports_registry_matches_the_config_choices():
    assert set(TRANSPORTS) == set(get_args(Transport))
    for name in TRANSPORTS:
        assert make_transport(name).name == name
    with pytest.raises(ValueError, match="stage2.transport"):
        make_transport("carrier_pigeon")


def test_replayed_batches_are_skipped_and_gaps_are_errors():
    G, _ = planted(n=64)
    host = CentroidHost(make_clusterer(config()), len(G))
    computer = PlantedComputer(G)
    idx = np.arange(16)
    b = computer.batch([([j], [j]) for j in idx], [str(j) for j in idx])
    assert host.apply("val", 0, 0, idx, b) is True
    assert host.apply("val", 0, 0, idx, b) is False  # replay after a restart
    with pytest.raises(RuntimeError, match="a gap"):
        host.apply("val", 0, 2, idx, b)


def test_run_stage_context_marks_done_only_on_success(tmp_path):
    from gs_ray.rundir import RunDir

    cfg = Config()
    cfg.run.output_dir, cfg.run.name = str(tmp_path), "r"
    run = RunDir.create(cfg)
    with run.stage("warmup") as info:
        info["engine"] = "torch"
    assert run.stage_done("warmup")
    assert run.manifest()["stages"]["warmup"]["engine"] == "torch"
    with pytest.raises(ZeroDivisionError), run.stage("stage2"):
        _ = 1 / 0
    assert not run.stage_done("stage2")
    run.invalidate("warmup")
    assert not run.stage_done("warmup")


def test_periodic_checkpoints_keep_to_their_share_of_the_time(tmp_path, monkeypatch):
    """stage2.checkpoint_max_share: a periodic checkpoint is skipped until the time since the
    last one is at least its write time * (1 / share - 1); phase-end ones are always written;
    share 1 writes every one (the old behaviour)."""
    import gs_ray.stage2.host as host_module

    clock = {"now": 100.0}
    monkeypatch.setattr(host_module.time, "monotonic", lambda: clock["now"])
    G, _ = planted(n=64)
    host = CentroidHost(make_clusterer(config()), len(G), checkpoint_max_share=0.05)
    assert host.save_checkpoint(tmp_path, periodic=True)  # the first: always
    took = host._last_checkpoint[1]
    assert took > 0 and host.status()["checkpoint_seconds"] == pytest.approx(took)
    clock["now"] += took * 19 - 0.01  # (1 / 0.05 - 1) * took, minus a little
    assert host.save_checkpoint(tmp_path, periodic=True) is None
    assert host.status()["checkpoints_skipped"] == 1
    assert host.save_checkpoint(tmp_path)  # a phase end: written whatever the budget
    clock["now"] += host._last_checkpoint[1] * 19  # the budget counts from the newest
    assert host.save_checkpoint(tmp_path, periodic=True)
    every = CentroidHost(make_clusterer(config()), len(G), checkpoint_max_share=1.0)
    assert all(every.save_checkpoint(tmp_path / "b", periodic=True) for _ in range(3))
    assert every.status()["checkpoints_skipped"] == 0


def test_phase_end_closes_each_pass_then_checkpoints_then_records(tmp_path):
    """PhaseEnd, every executor's end of a pass: K after the validation pass, the epoch's close
    after an online one, then the checkpoint, then the pass's record of what the host's status
    says changed; without ``status`` (the local executor) no record."""
    from gs_ray.stage2.phase_end import PhaseEnd

    G, _ = planted()
    plan = plan_for(len(G))
    host = CentroidHost(make_clusterer(config()), len(G))
    computer = PlantedComputer(G)
    saved = []

    def checkpoint(phase):
        saved.append((phase, host.status()["position"], host.initialized))
        host.save_checkpoint(tmp_path)

    end = PhaseEnd(host.initialize, host.end_epoch, checkpoint, host.status)
    for phase, epoch, batches in list(plan.phases())[:2]:  # validation, online epoch 0
        end.begin(host.status())
        for t, idx in enumerate(batches):
            host.apply(phase, epoch, t, idx, computer.batch([([i], [i]) for i in idx], list(idx)))
        assert end(phase, epoch, batches, 0.12345) == host.status()
    assert host.initialized and host.done_epochs == 1
    assert [(p, i) for p, _, i in saved] == [("val", True), ("online", True)]
    val, online = end.passes
    assert set(val) == {
        "phase",
        "epoch",
        "seconds",
        "samples",
        "centroid_busy_seconds",
        "centroid_checkpoint_seconds",
        "checkpoints_skipped",
        "bytes_in",
    }
    assert (val["phase"], val["samples"], val["seconds"]) == ("val", 64, 0.123)
    assert online["samples"] == len(G) and online["bytes_in"] == G.nbytes
    assert val["centroid_checkpoint_seconds"] > 0 and val["checkpoints_skipped"] == 0
    # the collective executor's records: seconds of the whole pass, the batches' apart
    whole = PhaseEnd(host.initialize, host.end_epoch, None, host.status, whole_pass_seconds=True)
    whole.begin(host.status())
    whole("final", 0, plan.final, 0.5)
    assert whole.passes[0]["wall_seconds"] == 0.5 and whole.passes[0]["seconds"] < 0.5
    assert PhaseEnd(host.initialize, host.end_epoch)("final", 0, plan.final, 0.5) is None
