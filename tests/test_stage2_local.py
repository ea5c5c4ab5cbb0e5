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
from gs_ray.stage2.batch import check_finite
from gs_ray.stage2.result import SKIPPED
from gs_ray.stage2.rows import RowStore
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
        self.rows = 0  # rows computed

    def batch(self, pairs, ids):
        self.calls += 1
        self.rows += len(pairs)
        return check_finite(self.G[[p[0][0] for p in pairs]], ids, self.nonfinite)

    def layout(self):
        return {"dim": self.G.shape[1], "projection_dim": None}


def planted(n: int = 240, seed: int = 0, noise: float = 0.15) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    directions = np.linalg.qr(rng.normal(size=(D, K_TRUE)))[0].T  # orthonormal
    truth = rng.integers(0, K_TRUE, size=n)
    norms = 10 ** rng.uniform(-1, 1, size=(n, 1))
    G = norms * (directions[truth] + noise * rng.normal(size=(n, D)) / np.sqrt(D))
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


def _held_out_plan(n: int, n_train: int, seed: int = 0) -> Stage2Plan:
    """plan_for, but the online epochs see the first ``n_train`` samples only and the final
    pass all ``n`` (the rest stand for the test split, whose rows no online epoch computes)."""
    rng = np.random.default_rng(seed)
    online = [np.array_split(rng.permutation(n_train), n_train // 16) for _ in range(3)]
    final = np.array_split(rng.permutation(n), n // 16)
    return Stage2Plan(val=[np.arange(32), np.arange(32, 64)], online=online, final=final)


@pytest.mark.parametrize("poison", [(), (70, 133)])
def test_kept_rows_give_the_same_clusters_and_only_new_rows_are_computed(poison, caplog):
    """stage2.keep_rows_mb: the later online epochs and the final pass take the training rows
    the first epoch computed; a run that keeps them ends exactly where one that recomputes every
    pass ends (planted rows do not depend on their batch), and computes only the validation
    rows, one epoch's rows and the final pass's test rows. Skipped rows stay skipped."""
    G, _ = planted(noise=5.0)  # overlapping clusters: three online epochs move samples
    n, n_train = len(G), 200
    plan = _held_out_plan(n, n_train)
    cfg = config(max_epochs=3, tol=0.0, n_clusters=3)
    results, computed = [], []
    for budget in (0, 1024):
        computer = PlantedComputer(G, nonfinite="skip", poison=poison)
        rows = RowStore.of_plan(plan, n, budget)
        host = CentroidHost(make_clusterer(cfg), n, rows=rows)
        caplog.clear()
        with caplog.at_level("INFO", logger="gs_ray.stage2.rows"):
            results.append(run_stage2_local(plan, samples(n), computer, host))
        said = [r.message for r in caplog.records if "training rows" in r.message]
        assert said == ([f"stage2: {rows.decision}"] if budget else [])  # said once, if kept
        computed.append(computer.rows)
        assert host.status()["rows_kept_bytes"] == (n_train * D * 4 if budget else 0)
    streamed, kept = results
    assert (streamed.info["rows_kept_bytes"], kept.info["rows_kept_bytes"]) == (0, n_train * D * 4)
    np.testing.assert_array_equal(kept.labels, streamed.labels)
    np.testing.assert_array_equal(
        kept.clusterer.cluster_centers_, streamed.clusterer.cluster_centers_
    )
    history = kept.clusterer.changed_share_history_
    assert history == streamed.clusterer.changed_share_history_
    assert len(history) == 3 and min(history) > 0  # every epoch ran, and moved samples
    assert computed == [64 + 3 * n_train + n, 64 + n_train + (n - n_train)]
    assert sorted(kept.skipped.tolist()) == list(poison)


def test_row_store_keeps_nothing_over_its_budget_and_refuses_rows_it_lacks():
    G, _ = planted(n=64)
    idx = np.arange(16)
    batch = PlantedComputer(G).batch([([j], [j]) for j in idx], [str(j) for j in idx])
    small = RowStore(np.arange(64), 64, budget_mb=64 * D * 4 / 2**20 - 1e-3)  # one byte short
    small.keep(idx, batch)
    assert small.held() is None and small.nbytes == 0 and not small.enabled
    assert "over stage2.keep_rows_mb" in small.decision
    store = RowStore(np.arange(32), 64, budget_mb=1)
    batch.G.flags.writeable = False  # as a batch arrives on Ray: a view of the object store
    store.keep(idx, batch)
    assert store.blocks[0] is batch.G  # kept by reference, not copied
    assert store.held() is None  # 16 of 32 rows: a batch cannot be assembled yet
    with pytest.raises(RuntimeError, match="neither kept nor computed"):
        store.assemble(idx, [str(j) for j in idx], None)
    store.keep(idx + 16, PlantedComputer(G).batch([([j], [j]) for j in idx + 16], list("x" * 16)))
    held = store.held()
    assert held.sum() == 32 and held[:32].all()
    assert store.nbytes == 32 * D * 4  # the kept rows' bytes
    # A batch that meets rows already held (a pass after a resume) adds a copy of its new rows
    # only: the store never holds more than its rows.
    again = RowStore(np.arange(32), 64, budget_mb=1)
    again.keep(idx, batch)
    overlap = np.arange(8, 24)  # 8 rows held, 8 new
    again.keep(overlap, PlantedComputer(G).batch([([j], [j]) for j in overlap], list("y" * 16)))
    assert again.nbytes == 24 * D * 4 and again.blocks[1].shape == (8, D)
    np.testing.assert_array_equal(again.blocks[1], G[16:24])
    rest = np.arange(24, 32)
    again.keep(rest, PlantedComputer(G).batch([([j], [j]) for j in rest], list("z" * 8)))
    spread = np.array([30, 2, 17, 9, 23])  # rows from all three blocks
    np.testing.assert_array_equal(again.assemble(spread, list("abcde"), None).G, G[spread])
    assert "keeps the 32 training rows" in store.decision
    mixed = np.array([3, 40, 17])  # sample 40 is not kept: one computed row fills its place
    part = PlantedComputer(G).batch([([40], [40])], ["s40"])
    out = store.assemble(mixed, ["s3", "s40", "s17"], part)
    np.testing.assert_array_equal(out.G, G[mixed])
    with pytest.raises(RuntimeError, match="2 computed rows for 1"):
        store.assemble(mixed, ["a", "b", "c"], PlantedComputer(G).batch([([1], [1])] * 2, "ab"))


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
        "centroid_busy_cpu_seconds",
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


class _HeldRows:
    """The partial-sums worker side (``PartialSumsWorker``) without Ray or a model: the batches
    this rank reduced are in its memo; a batch it does not hold is recomputed from ``G``."""

    def __new__(cls, G: np.ndarray):
        from gs_ray.stage2.transports import PartialSumsWorker

        class Worker(PartialSumsWorker):
            def raw_gradients(self, pairs):
                return G[[p[0][0] for p in pairs]]

        w = Worker()
        w._init_partial_sums(reconstructed=False)
        return w


def test_partial_sums_host_in_two_halves_equals_the_exact_host_and_never_mixes_shares():
    """The centroid actor books a batch (``enter_sums``), each of two workers sums its share of
    the evicted rows (``evicted_share``: the batches it holds, and unknown ones by rank), then
    ``finish_sums`` updates: the same labels and centroids as the exact cache, batch after
    batch; no checkpoint between the halves; a replay changes nothing."""
    from gs_ray.core.cosine import normalize_rows
    from gs_ray.stage2.transports import assign_and_sum

    G, _ = planted(n=240)
    exact = CentroidHost(make_clusterer(config(alpha=1)), len(G))
    sums = config(alpha=1)
    sums.stage2.transport = "partial_sums"
    ext = CentroidHost(make_clusterer(sums), len(G))
    val = np.arange(64)
    for host in (exact, ext):
        host.apply("val", 0, 0, val, check_finite(G[val], [str(i) for i in val], "fail"))
        host.initialize()
    workers = [_HeldRows(G), _HeldRows(G)]
    order = np.random.default_rng(1).permutation(len(G))
    shares_seen = 0
    for t in range(30):  # two passes over the rows: the caches (alpha 1) evict many times
        idx = order[np.arange(16 * t, 16 * (t + 1)) % len(G)]
        pairs = [([int(i)], [int(i)]) for i in idx]
        exact.apply("online", 0, t, idx, check_finite(G[idx], [str(i) for i in idx], "fail"))
        rank = t % 2
        Xn, norms = normalize_rows(G[idx])
        if t != 5:  # batch 5's holder restarts and loses it: recomputed when evicted
            workers[rank].memo[t] = (Xn, norms > 1e-12)
        state = ext.online_state()
        out = assign_and_sum(Xn, norms > 1e-12, state["centers"], state["start_centers"])
        plan = ext.enter_sums(t, 0, t, out, pairs, rank if t != 3 else None)  # 3: by its rank
        with pytest.raises(RuntimeError, match="entered but not finished"):
            ext.state()
        parts = [w.evicted_share(plan, r, 2) for r, w in enumerate(workers)]
        shares_seen += sum(p is not None for p in parts)
        ext.finish_sums(t, 0, *parts)
        np.testing.assert_array_equal(exact.clusterer.last_labels_, out["labels"])
        np.testing.assert_allclose(
            exact.clusterer.cluster_centers_, ext.clusterer.cluster_centers_, atol=1e-5
        )
    assert shares_seen > 10
    assert workers[0].recomputed == 0 and workers[1].recomputed >= 1  # only batch 5
    before = ext.clusterer.cluster_centers_.copy()
    replay = ext.enter_sums(29, 0, 29, out, pairs, 1)
    assert replay["evictions"] == {}
    ext.finish_sums(29, 0, None)
    np.testing.assert_array_equal(before, ext.clusterer.cluster_centers_)


PRIORITY_SCRIPT = """
import os, threading
from gs_ray.stage2.worker import lower_priority, scheduling_policy
go, seen = threading.Event(), {}
def look(name):
    seen[name] = (os.getpriority(os.PRIO_PROCESS, 0), scheduling_policy())
def earlier():
    go.wait()
    look("earlier")
t = threading.Thread(target=earlier)
t.start()
base = os.getpriority(os.PRIO_PROCESS, 0)
lower_priority(5, True)
look("main")
t2 = threading.Thread(target=look, args=("later",))
t2.start(); t2.join(); go.set(); t.join()
print(base, sorted(seen.items()))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "SCHED_IDLE"), reason="Linux scheduling")
def test_lower_priority_reaches_the_threads_already_running_and_those_started_later():
    """stage2.worker_nice / worker_idle: Linux sets both per thread, so a worker that lowered
    only the thread of its constructor would leave a thread started before it (e.g. Ray's
    executor of its compute calls) at full priority."""
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", PRIORITY_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.split(" ", 1)
    base, seen = int(out[0]), out[1].strip()
    want = (min(19, base + 5), "idle")
    assert seen == str(sorted({n: want for n in ("earlier", "main", "later")}.items()))
