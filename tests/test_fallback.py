"""The generalist fallback (gs_ray.routing.fallback): calibration and the never-worse rule."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from gs_ray.routing.fallback import Fallback, calibrate_proba, choose_fallback, fit_temperature


def _case(rng, n=200, k=4, signal=1.0):
    labels = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k)) + signal * 3 * np.eye(k)[labels]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expert = rng.gamma(2.0, 0.5, size=(k, n)) + 1.0
    expert[labels, np.arange(n)] -= 0.6 * signal  # the right expert is better
    generalist = rng.gamma(2.0, 0.5, size=n) + 0.8
    return proba, labels, expert, generalist


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("signal", [0.0, 0.5, 2.0])
def test_never_worse_than_the_generalist_on_calibration_rows(seed, signal):
    rng = np.random.default_rng(seed)
    proba, labels, expert, generalist = _case(rng, signal=signal)
    fb = choose_fallback(proba, labels, expert, generalist, n_thresholds=9)
    _, _, back = fb.route(proba)
    routed = calibrate_proba(proba, fb.temperature).argmax(1)
    loss = np.where(back, generalist, expert[routed, np.arange(len(generalist))]).mean()
    assert loss <= generalist.mean() + 1e-12
    assert loss == pytest.approx(fb.summary["loss_chosen"])
    assert loss == pytest.approx(min(r["loss"] for r in fb.table))
    rules = [r["rule"] for r in fb.table]
    assert rules[0] == "never" and rules[-1] == "always"


def test_no_signal_falls_back_and_strong_signal_routes():
    rng = np.random.default_rng(0)
    proba, labels, expert, generalist = _case(rng, n=400, signal=0.0)
    expert += 1.0  # experts worse everywhere: always the generalist
    assert choose_fallback(proba, labels, expert, generalist).rule == "always"
    proba, labels, expert, generalist = _case(rng, n=400, signal=3.0)
    generalist += 2.0  # generalist worse everywhere: never fall back
    assert choose_fallback(proba, labels, expert, generalist).rule == "never"


def test_temperature_matches_a_continuous_optimiser():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(2000, 4))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(4, p=p) for p in proba])  # calibrated by construction
    proba = proba**3 / (proba**3).sum(1, keepdims=True)  # made overconfident

    def nll(log_t):
        p = calibrate_proba(proba, np.exp(log_t))
        return -np.log(p[np.arange(len(labels)), labels]).mean()

    ref = np.exp(minimize_scalar(nll, bounds=(np.log(0.05), np.log(20)), method="bounded").x)
    assert fit_temperature(proba, labels) == pytest.approx(ref, rel=0.05)
    assert 2.0 < ref < 4.5  # an overconfident router is cooled (by about 3)


def test_rule_round_trip_and_bad_rule(tmp_path):
    fb = Fallback(temperature=2.0, rule="threshold", threshold=0.6)
    fb.save(tmp_path / "f.json")
    back = Fallback.load(tmp_path / "f.json")
    assert back == fb
    assert list(back.falls_back(np.array([0.5, 0.6, 0.9]))) == [True, False, False]
    assert "below" in back.reason(0.5, True)
    with pytest.raises(ValueError, match="rule"):
        Fallback.from_dict({"temperature": 1, "rule": "sometimes", "threshold": 0})
