"""The generalist fallback: never worse than one LoRA on the calibration rows, by construction.

Beside the K experts the run trains one generalist adapter (one LoRA on all training rows). The
router's probabilities are calibrated by temperature scaling on rows held out of every training
(``Prepared.calibration_rows``), and a confidence threshold is chosen on the same rows: a prompt
whose calibrated confidence ``max_k p(k | x)`` is below it goes to the generalist. The grid of
rules always holds "never fall back" (the paper's routing) and "always the generalist" (one
LoRA), so the chosen rule's calibration loss is at most the generalist's.

Pure NumPy; the ``calibrate`` stage (routing/stage.py) computes the losses it needs, serving and
``gs-ray eval`` apply the rule with ``Fallback.route``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gs_ray.io import write_json

Rule = Literal["never", "threshold", "always"]
_EPS = 1e-12
TEMPERATURES = np.exp(np.linspace(np.log(0.05), np.log(20.0), 121))  # the temperature grid


def calibrate_proba(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row: temperature scaling of probabilities (a router's
    logits up to a constant per row); zero probabilities stay zero."""
    logp = np.log(np.maximum(np.asarray(proba, dtype=np.float64), _EPS)) / temperature
    logp -= logp.max(axis=1, keepdims=True)
    out = np.exp(logp) * (np.asarray(proba) > 0)
    return out / np.maximum(out.sum(axis=1, keepdims=True), _EPS)


def fit_temperature(proba: np.ndarray, labels: np.ndarray) -> float:
    """The temperature (on a log grid from 0.05 to 20) that minimises the negative
    log-likelihood of ``labels`` under the calibrated probabilities; 1.0 with no rows."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) == 0:
        return 1.0
    rows = np.arange(len(labels))
    nll = [
        -np.log(np.maximum(calibrate_proba(proba, t)[rows, labels], _EPS)).mean()
        for t in TEMPERATURES
    ]
    return float(TEMPERATURES[int(np.argmin(nll))])


@dataclass
class Fallback:
    """A calibrated router's fallback rule: temperature, rule and threshold (see ``route``)."""

    temperature: float = 1.0
    rule: Rule = "never"
    threshold: float = 0.0
    table: list[dict[str, Any]] = field(default_factory=list)  # every candidate rule's loss
    summary: dict[str, Any] = field(default_factory=dict)  # calibration figures

    def route(self, proba: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(expert per prompt, calibrated confidence, whether it goes to the generalist)."""
        cal = calibrate_proba(np.atleast_2d(proba), self.temperature)
        conf = cal.max(axis=1)
        to_generalist = self.falls_back(conf)
        return cal.argmax(axis=1), conf, to_generalist

    def falls_back(self, confidence: np.ndarray) -> np.ndarray:
        confidence = np.asarray(confidence, dtype=np.float64)
        if self.rule == "always":
            return np.ones(confidence.shape, dtype=bool)
        if self.rule == "never":
            return np.zeros(confidence.shape, dtype=bool)
        return confidence < self.threshold

    def reason(self, confidence: float, to_generalist: bool) -> str:
        """Why one prompt went where it went, in words (``/v1/route``)."""
        if self.rule == "always":
            return "the calibration rows were served best by the generalist alone"
        if self.rule == "never":
            return "routed: on the calibration rows the experts beat falling back at any threshold"
        side = "below" if to_generalist else "at or above"
        return (
            f"calibrated router confidence {confidence:.3f} is {side} the threshold "
            f"{self.threshold:.3f}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Fallback:
        if d.get("rule") not in ("never", "threshold", "always"):
            raise ValueError(
                f"fallback rule {d.get('rule')!r}: expected never | threshold | always"
            )
        return cls(
            float(d["temperature"]),
            d["rule"],
            float(d["threshold"]),
            list(d.get("table") or []),
            dict(d.get("summary") or {}),
        )

    def save(self, path: str | Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Fallback:
        import json

        return cls.from_dict(json.loads(Path(path).read_text()))


def choose_fallback(
    proba: np.ndarray,
    labels: np.ndarray,
    expert_losses: np.ndarray,
    generalist_loss: np.ndarray,
    n_thresholds: int = 9,
) -> Fallback:
    """Calibrate and pick the rule with the lowest mean loss on the calibration rows.

    ``proba``: the router's p(k | x) (n, K); ``labels``: the rows' clusters (for the
    temperature); ``expert_losses``: (K, n) each expert's loss on each row; ``generalist_loss``:
    (n,). Candidates: never fall back, fall back below each of ``n_thresholds`` quantiles of the
    calibrated confidence, always the generalist. Ties go to the rule listed first (never, then
    lower thresholds, then always), so routing is kept unless falling back helps."""
    proba = np.atleast_2d(np.asarray(proba, dtype=np.float64))
    expert_losses = np.asarray(expert_losses, dtype=np.float64)
    generalist_loss = np.asarray(generalist_loss, dtype=np.float64)
    n = len(generalist_loss)
    temperature = fit_temperature(proba, labels)
    cal = calibrate_proba(proba, temperature)
    conf, routed = cal.max(axis=1), cal.argmax(axis=1)
    expert = expert_losses[routed, np.arange(n)] if n else np.zeros(0)
    quantiles = np.quantile(conf, np.linspace(0, 1, n_thresholds + 2)[1:-1]) if n else []
    candidates: list[tuple[Rule, float]] = [("never", 0.0)]
    candidates += [("threshold", float(q)) for q in np.unique(np.round(quantiles, 6))]
    candidates += [("always", 0.0)]
    table, best = [], None
    for rule, thr in candidates:
        fb = Fallback(temperature, rule, thr)
        back = fb.falls_back(conf)
        loss = float(np.where(back, generalist_loss, expert).mean()) if n else 0.0
        table.append(
            {
                "rule": rule,
                "threshold": thr,
                "loss": loss,
                "generalist_share": float(back.mean()) if n else 0.0,
            }
        )
        if best is None or loss < best[0] - 1e-12:
            best = (loss, fb)
    assert best is not None
    chosen = best[1]
    back = chosen.falls_back(conf)
    chosen.table = table
    chosen.summary = {
        "n_calibration": n,
        "loss_generalist": float(generalist_loss.mean()) if n else None,
        "loss_routed": float(expert.mean()) if n else None,
        "loss_chosen": best[0] if n else None,
        "loss_oracle": float(expert_losses[np.asarray(labels, dtype=np.int64), np.arange(n)].mean())
        if n
        else None,
        "generalist_share": float(back.mean()) if n else 0.0,
        "router_accuracy": float((routed == np.asarray(labels)).mean()) if n else None,
    }
    return chosen
