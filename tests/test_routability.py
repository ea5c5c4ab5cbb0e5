"""Partitions a router can follow (gs_ray.routing.routability): planted cases with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from gs_ray.config import RouterConfig
from gs_ray.routing.routability import cv_probabilities, fold_indices, merge_for_routability

WORDS = {
    "finance": "stock bond yield dividend equity market revenue profit interest loan",
    "code": "python function list loop variable return class import string integer",
    "story": "dragon castle princess forest wizard journey village river night king",
    "math": "apples sum total minus times divided fraction number equals percent",
}


def prompts(domain: str, n: int, rng: np.random.Generator) -> list[str]:
    words = WORDS[domain].split()
    return [" ".join(rng.choice(words, size=8)) + f" item {rng.integers(1000)}" for _ in range(n)]


@pytest.fixture(scope="module")
def planted():
    """Four domains visible in the prompts; finance split in two by a hidden label (a coin flip
    the prompt does not show: as a one-token answer splits a short-answer task's gradients)."""
    rng = np.random.default_rng(0)
    texts, labels = [], []
    for c, domain in enumerate(["code", "story", "math"]):
        texts += prompts(domain, 60, rng)
        labels += [c + 1] * 60
    fin = prompts("finance", 120, rng)
    hidden = rng.integers(0, 2, size=120)
    texts += fin
    labels += [0 if h == 0 else 4 for h in hidden]
    return texts, np.array(labels)


def test_folds_partition_the_rows():
    folds = fold_indices(23, 5, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(23))
    assert len(folds) == 5


def test_hidden_label_split_is_merged_and_visible_clusters_stay(planted):
    texts, labels = planted
    res = merge_for_routability(texts, labels, 5, RouterConfig(kind="tfidf"), target=0.95, seed=0)
    merged = res.labels(labels)
    assert res.k_after == 4
    assert res.mapping[0] == res.mapping[4]  # the hidden split is undone
    assert len({res.mapping[c] for c in (0, 1, 2, 3)}) == 4  # visible domains stay apart
    assert res.agreement_before < 0.95 <= res.agreement_after
    assert [sorted(s.to_dict()["merged"]) for s in res.steps] == [[0, 4]]
    assert set(np.unique(merged)) == {0, 1, 2, 3}


def test_routable_partition_is_kept(planted):
    texts, labels = planted
    visible = np.where(labels == 4, 0, labels)
    res = merge_for_routability(texts, visible, 4, RouterConfig(kind="tfidf"), target=0.95)
    assert res.k_after == 4 and not res.steps
    assert (res.mapping == np.arange(4)).all()


def test_unroutable_partition_goes_to_one_cluster():
    rng = np.random.default_rng(3)
    texts = prompts("story", 90, rng)
    labels = rng.integers(0, 3, size=90)  # nothing in the prompt predicts it
    res = merge_for_routability(texts, labels, 3, RouterConfig(kind="tfidf"), target=0.95)
    assert res.k_after == 1 and (res.mapping == 0).all()
    assert res.to_dict()["met"]


def test_splits_inside_a_domain_are_merged_with_centroids_given():
    """Two domains, each split at random in two: each domain's halves are merged (centroids given,
    as the pipeline passes Stage II's), never halves of different domains."""
    rng = np.random.default_rng(5)
    texts = prompts("code", 40, rng) + prompts("story", 40, rng)
    labels = np.array([0] * 20 + [1] * 20 + [2] * 20 + [3] * 20)
    cfg = RouterConfig(kind="tfidf")
    proba = cv_probabilities(texts, labels, 4, cfg, seed=0)
    assert proba.shape == (80, 4) and np.allclose(proba.sum(1), 1)
    centroids = np.array([[1.0, 0, 0], [0.9, 0.1, 0], [0, 0, 1.0], [0, 1.0, 0]])
    res = merge_for_routability(texts, labels, 4, cfg, target=0.95, centroids=centroids)
    assert res.mapping[0] == res.mapping[1] and res.mapping[2] == res.mapping[3]
    assert res.k_after == 2


def test_held_out_rows_merge_what_cross_validation_on_the_training_rows_keeps():
    """Four domains whose training rows' clusters follow the prompts (cross-validation: no merge),
    while on held-out rows (clusters assigned to centroids they did not build) code and math
    fall at random into each other's cluster: the held-out check merges those two, and only them.
    Fewer held-out rows than 1 / (1 - target) are not checked."""
    from gs_ray.routing.routability import min_held_rows

    rng = np.random.default_rng(7)
    texts, labels = [], []
    for c, domain in enumerate(["finance", "code", "story", "math"]):
        texts += prompts(domain, 50, rng)
        labels += [c] * 50
    labels = np.array(labels)
    held_texts, held = [], []
    for c, domain in enumerate(["finance", "code", "story", "math"]):
        held_texts += prompts(domain, 15, rng)
        held += [int(rng.choice([1, 3])) if c in (1, 3) else c for _ in range(15)]
    held = np.array(held)
    cfg = RouterConfig(kind="tfidf")
    plain = merge_for_routability(texts, labels, 4, cfg, target=0.95)
    assert plain.k_after == 4 and not plain.steps and plain.to_dict()["n_held"] == 0
    res = merge_for_routability(
        texts, labels, 4, cfg, target=0.95, held_texts=held_texts, held_labels=held
    )
    assert res.n_held == 60 and res.held_agreement_before < 0.9
    assert res.k_after == 3 and res.mapping[1] == res.mapping[3]
    assert len({res.mapping[c] for c in (0, 1, 2)}) == 3  # finance and stories stay apart
    step = res.to_dict()["steps"][0]
    assert step["basis"] == "held-out" and "held-out agreement" in step["why"]
    assert res.held_agreement_after >= 0.95 and res.to_dict()["met"]
    few = min_held_rows(0.95) - 1
    assert few == 19
    small = merge_for_routability(
        texts, labels, 4, cfg, target=0.95, held_texts=held_texts[:few], held_labels=held[:few]
    )
    assert small.k_after == 4 and small.n_held == 0 and small.held_agreement_after is None


def test_encoder_kind_needs_features():
    with pytest.raises(ValueError, match="features"):
        cv_probabilities(["a b", "c d"], np.array([0, 1]), 2, RouterConfig(kind="encoder"))
    feats = np.concatenate([np.eye(2)[[0] * 10 + [1] * 10] + 0.01 * np.arange(20)[:, None]])
    proba = cv_probabilities(
        ["x"] * 20, np.array([0] * 10 + [1] * 10), 2, RouterConfig(kind="encoder"), features=feats
    )
    assert (proba.argmax(1) == np.array([0] * 10 + [1] * 10)).mean() == 1.0


def _prepared(tmp_path, overrides):
    """A Prepared over a hand-made run directory: 40 samples, Stage II's 3 clusters, and a
    routability record that merges clusters 0 and 2."""
    from gs_ray.config import load_config
    from gs_ray.data import Sample, make_splits
    from gs_ray.io import write_json, write_jsonl
    from gs_ray.prepare import Prepared
    from gs_ray.rundir import RunDir

    cfg = load_config(None, ["--data.n_val", "4", *overrides])
    samples = [Sample(f"s{i}", [1, 2], [-100, 2], prompt=f"p{i}") for i in range(40)]
    splits = make_splits(40, cfg.data, 0)
    run = RunDir(tmp_path)
    labels = np.arange(40) % 3
    write_jsonl(
        run.assignments_path, ({"id": s.id, "cluster": int(c)} for s, c in zip(samples, labels))
    )
    write_json(run.k_selection_json, {"chosen": {"k": 3}})
    write_json(run.routability_json, {"mapping": [0, 1, 0], "k_before": 3, "k_after": 2})
    return Prepared(run, cfg, "", None, samples, splits), labels


def test_paper_mode_keeps_stage2_partition_and_all_training_rows(tmp_path):
    """routability off and no fallback: the experts' partition is Stage II's exactly (even with a
    routability record present) and every training row trains; the pipeline skips both steps."""
    from gs_ray.config import load_config
    from gs_ray.pipeline import STAGES

    p, labels = _prepared(
        tmp_path, ["--clustering.routability", "off", "--fallback.enabled", "false"]
    )
    got, k = p.assignments()
    assert k == 3 and (got == labels).all()
    assert len(p.calibration_rows()) == 0 and (p.fit_rows() == p.splits.train).all()
    cfg = load_config("docs/examples/paper-mode.yaml", [])
    applied = [s.name for s in STAGES if s.applies(cfg)]
    assert applied == ["warmup", "stage2", "experts", "router", "evaluate"]


def test_product_mode_applies_the_merge_and_holds_out_calibration_rows(tmp_path):
    p, labels = _prepared(tmp_path, ["--fallback.min_calibration", "2"])
    got, k = p.assignments()
    assert k == 2 and (got == np.array([0, 1, 0])[labels]).all()
    cal = p.calibration_rows()
    assert len(cal) >= 2 and not set(cal) & set(p.splits.warmup)
    assert set(cal) <= set(p.splits.train) and not set(cal) & set(p.fit_rows())
    assert (p.calibration_rows() == cal).all()  # seeded: the same rows every time
    # Stage II builds its centroids without them (validation subset, online epochs) and assigns
    # them in the final pass, as the test rows; nothing else of the plan moves.
    from gs_ray.stage2.plan import Stage2Plan

    whole = Stage2Plan.build(p.lengths, p.splits, p.cfg)
    plan = Stage2Plan.build(p.lengths, p.splits, p.cfg, cal)
    assert (plan.train == np.setdiff1d(p.splits.train, cal)).all()
    assert not set(np.concatenate(plan.val)) & set(cal)
    assert set(np.concatenate(plan.val)) == set(p.splits.val) - set(cal)
    assert all(not set(np.concatenate(epoch)) & set(cal) for epoch in plan.online)
    assert set(np.concatenate(plan.final)) == set(np.concatenate(whole.final))
    assert set(cal) <= set(np.concatenate(plan.final))
    empty = Stage2Plan.build(p.lengths, p.splits, p.cfg, np.zeros(0, dtype=np.int64))
    assert all((a == b).all() for a, b in zip(empty.online[0], whole.online[0]))
