"""Targeted selection (GIST, LESS-style, random) and the consumers of the Stage II gradient
stream: planted gradients for the algorithms, the local executor for "one gradient pass, many
consumers" and resuming, and ``gs-ray select`` end to end on a tiny demo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gs_ray.config import Config, SelectionConfig
from gs_ray.data import Sample
from gs_ray.rundir import RunDir
from gs_ray.selection.baselines import random_scores
from gs_ray.selection.consumers import (
    GistSelector,
    LessSelector,
    RandomSelector,
    make_selector,
)
from gs_ray.selection.gist import fit_subspace, storage_bytes
from gs_ray.selection.ranking import budget_count, rank
from gs_ray.stage2 import CentroidHost, ConsumerSet, Stage2Plan, make_clusterer, run_stage2_local
from gs_ray.stage2.batch import check_finite
from gs_ray.stage2.consumers import GradientConsumer, split_rows
from gs_ray.stage2.plan import FINAL

D = 300


def planted_target(m: int = 40, rank_: int = 3, seed: int = 0, noise: float = 0.01):
    """Target gradients in a rank-``rank_`` subspace (plus a little noise) and its basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(D, rank_)))[0]  # (D, r) orthonormal
    scales = np.array([5.0, 3.0, 2.0])[:rank_]
    T = (rng.normal(size=(m, rank_)) * scales) @ basis.T + noise * rng.normal(size=(m, D))
    return T.astype(np.float32), basis


def planted_pool(basis: np.ndarray, n: int = 60, seed: int = 1):
    """Half the pool from the target subspace, half orthogonal to it; norms over 2 decades."""
    rng = np.random.default_rng(seed)
    inside = rng.normal(size=(n // 2, basis.shape[1])) @ basis.T
    outside = rng.normal(size=(n // 2, D))
    outside -= outside @ basis @ basis.T
    G = np.concatenate([inside, outside]) + 0.02 * rng.normal(size=(n, D))
    G = G / np.linalg.norm(G, axis=1, keepdims=True) * 10 ** rng.uniform(-1, 1, (n, 1))
    return G.astype(np.float32), np.arange(n) < n // 2


# --------------------------------------------------------------------------- the algorithms


def test_gist_scores_target_subspace_above_orthogonal():
    T, basis = planted_target()
    G, inside = planted_pool(basis)
    sub = fit_subspace(T, energy=0.99)
    assert sub.k == 3 and sub.energy >= 0.99
    scores = sub.score(*sub.project(G))
    assert scores[inside].min() > scores[~inside].max()
    assert scores[~inside].max() < 1e-3 < 0.03 < scores[inside].min()
    top = rank([f"p{i}" for i in range(len(G))], scores)[: inside.sum()]
    assert inside[top].all()


def test_gist_subspace_by_energy_or_fixed_rank():
    T, _ = planted_target()
    assert fit_subspace(T, energy=0.5).k == 1  # s1^2 = 25 of 38 of the energy
    assert fit_subspace(T, rank=2).k == 2
    assert fit_subspace(T, rank=500).k <= len(T)  # never more than the live directions
    sub = fit_subspace(T, rank=2)
    assert np.allclose(sub.basis.T @ sub.basis, np.eye(2), atol=1e-5)
    assert math.isclose(sub.weights.sum(), 1.0)
    with pytest.raises(ValueError, match="all zero"):
        fit_subspace(np.zeros((3, D)))


def test_storage_gist_vs_less():
    out = storage_bytes(n_pool=10_000, k=16, dim=65_536)
    assert out["less_8192_bytes"] == 10_000 * 8192 * 4
    assert out["gist_bytes"] == 10_000 * 17 * 4 + 65_536 * 16 * 4
    assert out["gist_over_less"] < 0.02


def test_budget_and_ranking():
    assert budget_count("5%", 100) == 5
    assert budget_count("5%", 30) == 2  # rounded up
    assert budget_count("0.1%", 10) == 1  # at least one
    assert budget_count("7", 100) == 7 and budget_count("700", 100) == 100
    for bad in ("0%", "150%", "abc", "2.5"):
        with pytest.raises(ValueError, match="budget"):
            budget_count(bad, 100)
    assert rank(["b", "a", "c"], np.array([1.0, 1.0, 2.0])).tolist() == [2, 1, 0]


def batches_of(G: np.ndarray, size: int = 16):
    """Stream batches (phase final) of gradient rows, sample ids p<i>."""
    for t, start in enumerate(range(0, len(G), size)):
        idx = np.arange(start, min(start + size, len(G)))
        yield t, idx, check_finite(G[idx], [f"p{i}" for i in idx], "fail")


def feed_all(selector: GradientConsumer, G: np.ndarray, size: int = 16) -> None:
    consumers = ConsumerSet([selector])
    consumers.set_layout(CountingComputer(G).layout())
    for t, idx, b in batches_of(G, size):
        consumers.feed(FINAL, 0, t, idx, b.G, b.skipped, b.ids)


def test_less_and_random_share_the_interface():
    T, basis = planted_target()
    T = T + 30 * basis[:, 0]  # a target whose gradients share a mean direction
    G, inside = planted_pool(basis)
    G[inside] = T[: inside.sum()]  # the pool's first half: copies of target gradients
    cfg = SelectionConfig(less_dim=512)
    less = make_selector("less", T, cfg, seed=0)
    feed_all(less, G)
    ids, scores = less.ranking()
    assert set(ids[: inside.sum()]) == {f"p{i}" for i in np.flatnonzero(inside)}
    assert less.stored_bytes() == len(G) * 512 * 4
    rnd = make_selector("random", T, cfg, seed=3)
    feed_all(rnd, G, size=7)  # batch order and size do not matter
    assert np.allclose(rnd.scores(), random_scores([f"p{i}" for i in range(len(G))], 3))
    assert isinstance(make_selector("gist", T, cfg, 0), GistSelector)
    with pytest.raises(ValueError, match="selection.method"):
        make_selector("oracle", T, cfg, 0)


def test_split_rows_cuts_by_the_layout():
    layout = {
        "param_names": ["a", "b"],
        "shapes": [[2, 3], [4, 1]],
        "offsets": [0, 6, 10],
        "dim": 10,
        "projection_dim": None,
    }
    rows = np.arange(20, dtype=np.float32).reshape(2, 10)
    parts = split_rows(rows, layout)
    assert parts["a"].shape == (2, 2, 3) and parts["b"].shape == (2, 4, 1)
    assert parts["b"][1, :, 0].tolist() == [16, 17, 18, 19]
    with pytest.raises(ValueError, match="projected"):
        split_rows(rows, {**layout, "projection_dim": 8})


# --------------------------------------------------------------------------- one pass, many readers

N_POOL = 96


class CountingComputer:
    """Stands in for GradientComputer: sample i's gradient is row i; counts its calls; can fail
    once at a given call (a crash mid-pass)."""

    def __init__(self, G: np.ndarray, fail_at: int | None = None):
        self.G, self.calls, self.fail_at = G, 0, fail_at

    def batch(self, pairs, ids):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            self.fail_at = None
            raise RuntimeError("worker lost")
        return check_finite(self.G[[p[0][0] for p in pairs]], ids, "fail")

    def layout(self):
        return {
            "param_names": ["w"],
            "shapes": [[D]],
            "offsets": [0, D],
            "dim": D,
            "projection_dim": None,
        }


class LayerNorms(GradientConsumer):
    """A consumer that asks for layers: the squared norm of every sample's ``w`` piece."""

    name, wants_layers = "layer_norms", True

    def __init__(self):
        self.sums_: dict[str, float] = {}

    def consume(self, batch):
        for i, w in zip(batch.kept()[0], batch.layers()["w"]):
            self.sums_[i] = float((w.astype(np.float64) ** 2).sum())

    def state(self):
        return {"sums": dict(self.sums_)}

    def load_state(self, state):
        self.sums_ = dict(state["sums"])

    def write(self, run):
        return {"n": len(self.sums_)}


def stage2_setup():
    """A clusterable pool (3 planted directions) that also holds the target's subspace."""
    T, basis = planted_target()
    G, _ = planted_pool(basis, n=N_POOL)
    cfg = Config()
    cfg.clustering.batch_size, cfg.clustering.max_epochs, cfg.clustering.k_max = 16, 2, 4
    rng = np.random.default_rng(0)
    online = [list(np.array_split(rng.permutation(N_POOL), 6)) for _ in range(2)]
    plan = Stage2Plan(
        val=[np.arange(32), np.arange(32, 64)],
        online=online,
        final=list(np.array_split(np.arange(N_POOL), 6)),
    )
    samples = [Sample(id=f"p{i}", input_ids=[i], labels=[i]) for i in range(N_POOL)]
    return T, G, cfg, plan, samples


def selectors(T: np.ndarray) -> list:
    cfg = SelectionConfig(less_dim=256)
    return [make_selector(m, T, cfg, seed=0) for m in ("gist", "less", "random")] + [LayerNorms()]


def test_consumers_with_the_clusterer_equal_each_alone_in_one_gradient_pass():
    T, G, cfg, plan, samples = stage2_setup()
    alone = CountingComputer(G)
    ref = run_stage2_local(plan, samples, alone, CentroidHost(make_clusterer(cfg), N_POOL))
    solo = selectors(T)
    for consumer in solo:  # each consumer alone, fed the final pass directly
        feed_all(consumer, G[np.concatenate(plan.final)], size=16)
    both = CountingComputer(G)
    res = run_stage2_local(
        plan, samples, both, CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T))
    )
    assert both.calls == alone.calls == 2 + 2 * 6 + 6  # val + online epochs + final, once each
    assert np.array_equal(res.labels, ref.labels)
    assert np.allclose(res.clusterer.cluster_centers_, ref.clusterer.cluster_centers_)
    assert [c.name for c in res.consumers] == ["gist", "less", "random", "layer_norms"]
    for got, want in zip(res.consumers[:3], solo[:3]):
        assert got.ids_ == [f"p{i}" for i in range(N_POOL)]  # every sample once, final pass
        assert got.ranking()[0] == want.ranking()[0]
        assert np.allclose(got.ranking()[1], want.ranking()[1])
    assert res.consumers[3].sums_ == pytest.approx(solo[3].sums_)


def test_the_clusterer_is_a_consumer_like_the_others(tmp_path):
    """The host feeds the clusterer through the same interface as the selectors: it is the
    stream's first consumer; its state is what the checkpoint keeps; restored from a checkpoint
    taken after the online epochs and fed the final pass outside any host (as ``gs-ray select``
    feeds a selector), it assigns every sample as the whole Stage II did."""
    from gs_ray.stage2.consumers import ClusteringConsumer

    T, G, cfg, plan, samples = stage2_setup()
    whole = run_stage2_local(
        plan,
        samples,
        CountingComputer(G),
        CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T)),
    )
    host = CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T))
    first = host.stream.consumers[0]
    assert isinstance(first, ClusteringConsumer) and isinstance(first, GradientConsumer)
    assert [c.name for c in host.stream] == ["clustering", "gist", "less", "random", "layer_norms"]
    with pytest.raises(ValueError, match="unique"):
        CentroidHost(make_clusterer(cfg), N_POOL, consumers=[RandomSelector(0, "clustering")])
    first_final = 2 + 2 * 6 + 1  # after the validation batches and both online epochs
    with pytest.raises(RuntimeError, match="worker lost"):
        run_stage2_local(plan, samples, CountingComputer(G, fail_at=first_final), host)
    assert host.position == ("online", 1, 5) and host.done_epochs == 2
    host.save_checkpoint(tmp_path)

    from gs_ray.statefile import load_state

    state = load_state(tmp_path, "centroids")
    clustering = ClusteringConsumer(make_clusterer(cfg), N_POOL)
    clustering.load_state(state)  # the checkpoint's top level is the clusterer's state
    assert (clustering.labels_ == -1).all()
    stream = ConsumerSet([clustering])
    for t, idx in enumerate(plan.final):
        b = CountingComputer(G).batch([samples[i].pair for i in idx], [samples[i].id for i in idx])
        stream.feed(FINAL, 0, t, idx, b.G, b.skipped, b.ids)
    assert np.array_equal(clustering.labels_, whole.labels)
    summary = clustering.write(RunDir(tmp_path / "run"))
    assert summary["k"] == whole.k
    assert np.allclose(
        np.load(tmp_path / "run" / "stage2" / "centroids.npy"), whole.clusterer.cluster_centers_
    )


def test_consumer_resumes_from_a_stage2_checkpoint(tmp_path):
    T, G, cfg, plan, samples = stage2_setup()
    whole = run_stage2_local(
        plan,
        samples,
        CountingComputer(G),
        CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T)),
    )
    crash_at = 2 + 2 * 6 + 3  # the third batch of the final pass
    host = CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T))
    with pytest.raises(RuntimeError, match="worker lost"):
        run_stage2_local(plan, samples, CountingComputer(G, fail_at=crash_at), host)
    assert host.position == (FINAL, 0, 1)
    host.save_checkpoint(tmp_path)  # what the Ray driver does every stage2.checkpoint_every
    fresh = CentroidHost(make_clusterer(cfg), N_POOL, consumers=selectors(T))
    assert fresh.load_checkpoint(tmp_path)
    assert len(fresh.consumers.consumers[0].ids_) == 2 * 16  # GIST's projections came back
    late = CentroidHost(
        make_clusterer(cfg), N_POOL, consumers=[*selectors(T), RandomSelector(1, "late")]
    )
    with pytest.raises(RuntimeError, match="no state for consumer 'late'"):
        late.load_checkpoint(tmp_path)  # joining mid-pass would miss batches
    rest = CountingComputer(G)
    res = run_stage2_local(plan, samples, rest, fresh)
    assert rest.calls == 4  # only the final batches not applied before the crash
    assert np.array_equal(res.labels, whole.labels)
    for got, want in zip(res.consumers, whole.consumers):
        if hasattr(want, "ranking"):
            assert got.ranking()[0] == want.ranking()[0]
            assert np.allclose(got.ranking()[1], want.ranking()[1])
    assert res.consumers[3].sums_ == pytest.approx(whole.consumers[3].sums_)


def test_consumer_outputs_land_in_the_run_directory(tmp_path):
    T, G, *_ = stage2_setup()
    run = RunDir(tmp_path)
    gist = GistSelector.from_target(T, SelectionConfig(gist_rank=3), seed=0)
    feed_all(gist, G)
    summary = ConsumerSet([gist, RandomSelector(0)]).write(run)
    rows = [json.loads(line) for line in run.selection_scores("gist").read_text().splitlines()]
    assert [r["rank"] for r in rows] == list(range(len(G)))
    assert rows[0]["score"] >= rows[-1]["score"]
    assert summary["gist"]["k"] == 3 and summary["gist"]["stored_bytes"] == len(G) * 4 * 4
    assert json.loads(run.selection_summary("gist").read_text())["less_8192_bytes"] == (
        len(G) * 8192 * 4
    )
    assert run.selection_scores("random").exists()


def test_layers_of_projected_gradients_are_refused_before_the_pass():
    consumers = ConsumerSet([LayerNorms()])
    with pytest.raises(ValueError, match="projected"):
        consumers.set_layout(
            {
                "param_names": ["w"],
                "shapes": [[D]],
                "offsets": [0, D],
                "dim": 64,
                "projection_dim": 64,
            }
        )
    with pytest.raises(ValueError, match="unique"):
        ConsumerSet([RandomSelector(0), RandomSelector(1)])
    assert isinstance(LessSelector(np.ones(4) / 2, D, 0).k, int)


# --------------------------------------------------------------------------- gs-ray select


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--method", "oracle"], "selection.method"),
        (["--budget", "150%"], "selection.budget"),
        (["--budget", "five"], "selection.budget"),
        (["--target", "missing.jsonl"], "missing.jsonl"),
    ],
)
def test_select_user_errors_are_one_message_before_any_model(tmp_path, capsys, args, words):
    from gs_ray.cli import main

    target = tmp_path / "t.jsonl"
    target.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    argv = [
        "select",
        "--target",
        str(target),
        "--output-dir",
        str(tmp_path / "runs"),
        "--data.demo_size",
        "8",
        *args,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was made


TINY = [
    "--data.demo_size",
    "64",
    "--data.n_val",
    "8",
    "--data.max_length",
    "160",
    "--model.tiny_hidden_size",
    "32",
    "--model.tiny_num_layers",
    "1",
    "--model.tiny_vocab_size",
    "2048",
    "--lora.r",
    "4",
    "--lora.alpha",
    "8",
    "--warmup.epochs",
    "1",
    "--gradients.batch_size",
    "16",
    "--model.tiny_pretrain_steps",
    "0",
]


@pytest.mark.slow
def test_select_end_to_end_on_the_demo(tmp_path, capsys):
    from gs_ray.cli import main
    from gs_ray.data.demo import build_demo_corpus

    target = tmp_path / "target.jsonl"
    records = [r for r in build_demo_corpus(n_samples=200, seed=7) if r["domain"] == "math"]
    target.write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    assert (
        main(["select", "--target", str(target), "--output-dir", str(tmp_path / "runs"), *TINY])
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = RunDir.open(out["run_dir"])
    ranked = RunDir.read_jsonl(run.selection_ranked("gist"))
    selected = RunDir.read_jsonl(run.selection_selected("gist"))
    pool = build_demo_corpus(n_samples=64, seed=0)
    assert len(ranked) == len(pool) and len(selected) == math.ceil(0.05 * len(pool))
    assert selected == ranked[: len(selected)]
    assert set(selected[0]) == set(pool[0])  # the input's own record format
    assert {r["id"] for r in ranked} == {r["id"] for r in pool}
    summary = json.loads(run.selection_summary("gist").read_text())
    assert summary["n_target"] == 12 and summary["gist_bytes"] < summary["less_8192_bytes"]
    assert run.stage_done("warmup") and run.stage_done("select")
    warmup_seconds = run.manifest()["stages"]["warmup"]["seconds"]

    # Reuse the run's warm-up adapter with another method and budget: no new warm-up.
    assert (
        main(
            [
                "select",
                "--target",
                str(target),
                "--run-dir",
                str(run.path),
                "--method",
                "random",
                "--budget",
                "10",
            ]
        )
        == 0
    )
    assert len(RunDir.read_jsonl(run.selection_selected("random"))) == 10
    assert run.manifest()["stages"]["warmup"]["seconds"] == warmup_seconds
    calls = json.loads(run.selection_summary("random").read_text())["engine_calls"]
    assert calls == 1 + math.ceil(len(pool) / 16)  # the target once, the pool once

    # The pipeline's switch (stage2.consumers): GIST and random ride Stage II's final pass on the
    # same run; GIST's scores equal those of gs-ray select alone (same adapter, same target).
    from gs_ray.config import apply_overrides
    from gs_ray.pipeline import run_local

    cfg = apply_overrides(
        run.config(),
        [
            "--clustering.max_epochs",
            "1",
            "--clustering.k_max",
            "3",
            "--stage2.consumers",
            "[gist, random]",
            "--selection.target",
            str(target),
        ],
    )
    alone = {r["id"]: r["score"] for r in RunDir.read_jsonl(run.selection_scores("gist"))}
    run.selection_selected("gist").unlink()  # so that the switch's outputs are new
    run_local(cfg, resume=str(run.path))
    assert run.stage_done("stage2") and run.assignments_path.exists()
    riding = {r["id"]: r["score"] for r in RunDir.read_jsonl(run.selection_scores("gist"))}
    assert riding.keys() == alone.keys()  # every sample once
    ids = sorted(alone)
    assert np.allclose([riding[i] for i in ids], [alone[i] for i in ids], rtol=1e-4, atol=1e-7)
    summary = json.loads(run.selection_summary("gist").read_text())
    assert summary["pool"].startswith("stage2") and summary["n_selected"] == len(selected)
    assert RunDir.read_jsonl(run.selection_selected("gist"))[0]["id"] in alone
    assert len(RunDir.read_jsonl(run.selection_selected("random"))) == len(selected)
    assert set(run.metrics()["consumers"]) == {"gist", "random"}


def test_select_gsnr_ranks_by_the_ensemble_scores(tmp_path, capsys, monkeypatch):
    """gs-ray select --method gsnr: no target, no warm-up; the pool ranked by its G-SNR (the
    ensemble itself is tested in test_spectra_gsnr.py; here its scores are given), a sample
    with a non-finite score last, the records in the input's format."""
    from gs_ray.cli import main
    from gs_ray.selection import gsnr

    seen = {}

    def fake_scores(cfg, samples, base_path, pad_id, work_dir, train_samples=None):
        seen["n"], seen["work_dir"] = len(samples), str(work_dir)
        scores = np.arange(len(samples), dtype=np.float64)  # the last sample best ...
        scores[-1] = np.nan  # ... unless it has no finite score
        return gsnr.GSNRScores(scores, "energy", ["m0", "m1"], {}, {"training": 1.0})

    monkeypatch.setattr(gsnr, "gsnr_scores", fake_scores)
    assert (
        main(
            [
                "select",
                "--target",
                str(tmp_path / "missing.jsonl"),
                "--method",
                "gist",
                "--output-dir",
                str(tmp_path / "r0"),
                *TINY,
            ]
        )
        == 2
    )
    assert main(["select", "--method", "gist", "--output-dir", str(tmp_path / "r1"), *TINY]) == 2
    assert "selection.target" in capsys.readouterr().err
    assert (
        main(
            [
                "select",
                "--method",
                "gsnr",
                "--budget",
                "5",
                "--output-dir",
                str(tmp_path / "runs"),
                *TINY,
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    run = RunDir.open(out["run_dir"])
    assert not run.stage_done("warmup") and run.stage_done("select")
    ranked = RunDir.read_jsonl(run.selection_ranked("gsnr"))
    n = seen["n"]
    assert len(ranked) == n and seen["work_dir"].startswith(str(run.selection("gsnr")))
    scores = RunDir.read_jsonl(run.selection_scores("gsnr"))
    assert [r["score"] for r in scores[:3]] == [n - 2, n - 3, n - 4]
    assert scores[-1]["score"] is None  # not a number: JSON null, ranked last
    assert RunDir.read_jsonl(run.selection_selected("gsnr")) == ranked[:5]
    summary = json.loads(run.selection_summary("gsnr").read_text())
    assert summary["members"] == 2 and summary["target"] is None


def test_stage2_consumers_check_their_target_before_anything_runs(tmp_path):
    """gs-ray run with stage2.consumers reads the target set in check_inputs (before Ray or a
    run directory): a missing file or a bad line is named there."""
    from gs_ray.config import apply_overrides
    from gs_ray.data import check_inputs
    from gs_ray.errors import DataError

    def cfg(target):
        return apply_overrides(
            Config(),
            [
                "--stage2.consumers",
                "gist",
                "--selection.target",
                str(target),
                "--data.demo_size",
                "8",
            ],
        )

    with pytest.raises(DataError, match="missing.jsonl"):
        check_inputs(cfg(tmp_path / "missing.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r"}\n{"prompt": "p"\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        check_inputs(cfg(bad))
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "p", "response": "r"}\n')
    assert check_inputs(cfg(good)).rows_read == 8  # the report is the pool's
