"""Statistics of gs-ray eval (gs_ray.evaluation.stats) against independent references."""

from __future__ import annotations

import numpy as np
import pytest

from gs_ray.evaluation.stats import comparisons, paired_interval, routing_costs, verdict


def test_bootstrap_interval_matches_the_normal_interval_on_many_rows():
    rng = np.random.default_rng(0)
    a = rng.normal(2.0, 1.0, size=4000)
    b = a + rng.normal(0.05, 0.3, size=4000)  # b is worse by 0.05 on average
    iv = paired_interval(a, b, n_boot=4000)
    d = a - b
    se = d.std(ddof=1) / np.sqrt(len(d))
    assert iv["mean"] == pytest.approx(d.mean())
    assert iv["lo"] == pytest.approx(d.mean() - 1.96 * se, abs=0.2 * se)
    assert iv["hi"] == pytest.approx(d.mean() + 1.96 * se, abs=0.2 * se)
    assert verdict(iv) == "pays off"
    assert verdict(paired_interval(b, a)) == "loses"


def test_seeds_are_averaged_per_row_and_equal_methods_tie():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, 200))
    iv = paired_interval(a, a.mean(axis=0))
    assert iv["mean"] == pytest.approx(0) and iv["lo"] == pytest.approx(0)
    assert verdict(iv) == "ties"
    noisy = paired_interval(rng.normal(size=50), rng.normal(size=50))
    assert noisy["lo"] < 0 < noisy["hi"] and verdict(noisy) == "ties"
    with pytest.raises(ValueError, match="paired rows"):
        paired_interval(np.zeros(3), np.zeros(4))


def test_comparisons_pick_the_best_other_baseline():
    rows = np.linspace(1, 2, 100)
    per_row = {
        "single_lora": rows,
        "embedding_kmeans": rows - 0.1,
        "random_clusters": rows + 0.2,
        "gradientspace": rows - 0.05,
    }
    out = comparisons(
        per_row, "single_lora", ["single_lora", "embedding_kmeans", "random_clusters"]
    )
    gs = out["gradientspace"]
    assert gs["vs_reference"]["mean"] == pytest.approx(-0.05)
    assert gs["vs_reference"]["verdict"] == "pays off"
    assert gs["vs_best_baseline"]["method"] == "embedding_kmeans"
    assert gs["vs_best_baseline"]["verdict"] == "loses"
    assert out["embedding_kmeans"]["vs_best_baseline"]["method"] == "single_lora"
    assert "vs_reference" not in out["single_lora"]


def test_routing_costs_by_hand():
    losses = np.array([[1.0, 5.0, 1.0, 4.0], [3.0, 2.0, 2.0, 2.0]])  # (K=2, 4 rows)
    oracle = np.array([0, 1, 0, 1])
    routed = np.array([0, 0, 1, 1])  # rows 1 and 2 misrouted
    out = routing_costs(losses, routed, oracle)
    assert out["router_accuracy"] == 0.5
    assert out["router_accuracy_per_cluster"] == [0.5, 0.5]
    assert out["misroute_cost"] == pytest.approx(((5 - 2) + (2 - 1)) / 2)
    assert out["routed_minus_oracle"]["mean"] == pytest.approx((0 + 3 + 1 + 0) / 4)


def test_report_stage_table_reads_the_manifests_status():
    """The "What ran" table showed every stage as "not done" (it read a key the manifest does
    not have)."""
    from gs_ray.evaluation.report import _stages

    page = _stages(
        {
            "stages": {
                "warmup": {"status": "done", "seconds": 3.5, "engine": "ds"},
                "stage2": {"status": "running"},
                "router": {},
            }
        }
    )
    rows = page.split("<tr>")[2:]
    assert "<td>warmup</td><td>done</td><td>3.5" in rows[0].replace("\n", "")
    assert "<td>running</td>" in rows[1] and "<td>not done</td>" in rows[2]
    assert "status" not in rows[0]  # the details column leaves the status out


def test_report_escapes_what_a_run_directory_says(tmp_path):
    """A run directory is outside input: every field the report shows from it is HTML-escaped
    (numbers included: a crafted k_selection.json or tune results must not inject markup)."""
    import json

    from gs_ray.evaluation.report import build_report
    from gs_ray.rundir import RunDir

    bad = "<script>alert(1)</script>"
    run = tmp_path / "run-x"
    (run / "stage2").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"stages": {"prepare": {"status": "done"}}}))
    (run / "stage2" / "k_selection.json").write_text(
        json.dumps(
            {
                "chosen": {"k": bad, "silhouette": bad, "n_components": bad, "threshold": bad},
                "routability": {
                    "k_before": bad,
                    "k_after": bad,
                    "agreement_before": bad,
                    "agreement_after": bad,
                    "target": bad,
                    "merges": [bad],
                },
                "structure": {"verdict": bad},
            }
        )
    )
    tune = RunDir.open(run).tune_results_json
    tune.parent.mkdir(parents=True, exist_ok=True)
    tune.write_text(
        json.dumps(
            {
                "best_k": bad,
                "rule": bad,
                "best_silhouette_k": bad,
                "weak_structure": True,
                "structure_verdict": bad,
                "table": [{"k": bad, "k_routed": bad, "val_loss": bad, "silhouette": bad}],
            }
        )
    )
    page = build_report(run).read_text()
    assert "<script>" not in page and page.count("&lt;script&gt;") >= 14


def test_training_loss_is_drawn_smoothed_and_the_silhouette_with_its_floor():
    """The report's figures: a per-step loss is drawn with its moving average (bias-corrected:
    it starts at the first value, keeps a constant, and follows a trend with less noise); the
    silhouette-vs-K figure draws the structureless reference and the clear level from
    k_selection.json."""
    from gs_ray.evaluation.plots import smoothed, structureless_floor

    assert smoothed([]).size == 0
    np.testing.assert_allclose(smoothed([2.0] * 50), 2.0)
    rng = np.random.default_rng(0)
    trend = np.linspace(3.0, 2.0, 400)
    noisy = trend + rng.normal(0, 0.3, 400)
    s = smoothed(noisy, span=20)
    assert s[0] == noisy[0]
    assert np.abs(s - trend)[40:].mean() < 0.4 * np.abs(noisy - trend)[40:].mean()
    assert structureless_floor(None) is None and structureless_floor({"per_k": []}) is None
    per_k = [
        {"k": 3, "null_silhouette": 0.04, "null_std": 0.01, "silhouette_cosine": 0.05},
        {"k": 2, "null_silhouette": 0.06, "null_std": 0.005, "silhouette_cosine": 0.03},
    ]
    ks, mean, clear, own = structureless_floor({"null_margin": 4.0, "per_k": per_k})
    assert ks == [2, 3] and mean == [0.06, 0.04] and own == [0.03, 0.05]
    np.testing.assert_allclose(clear, [0.08, 0.08])


def test_the_report_says_what_to_deploy_and_what_to_run_next():
    from gs_ray.evaluation.report import deploy_advice

    def ev(word):
        return {"verdict": {"verdict": word, "headline": f"GradientSpace {word} (interval)"}}

    advice, nxt = deploy_advice("runs/r", ev("pays off"), None, None)
    assert advice.startswith("Deploy GradientSpace") and nxt.startswith("gs-ray serve runs/r")
    for word in ("ties", "loses"):
        advice, nxt = deploy_advice("runs/r", ev(word), None, None)
        assert advice.startswith("Deploy the generalist") and "gs-ray/generalist" in nxt
    held = {"test_loss_deployed": 2.05, "test_loss_generalist": 2.06, "test_loss_warmup": 2.3}
    advice, nxt = deploy_advice("runs/r", None, held, {"structure": {"weak": True, "k": 1}})
    assert advice.startswith("Not decided yet: the gradient structure is weak")
    assert "2.0500 as deployed against 2.0600 for the generalist (-0.0100" in advice
    assert nxt == "gs-ray eval runs/r"
    advice, _ = deploy_advice(
        "runs/r",
        None,
        {"test_loss_routed": 2.1, "test_loss_warmup": 2.3},
        {"structure": {"weak": False, "k": 4}},
    )
    assert "clear at K = 4" in advice and "for the warm-up adapter" in advice
