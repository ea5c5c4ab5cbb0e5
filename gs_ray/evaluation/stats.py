"""Statistics that decide: paired differences of held-out loss with bootstrap intervals, and the
verdict a user reads first (docs/evaluation.md).

Every method of ``gs-ray eval`` is scored on the same test rows, so methods are compared row by
row: ``d_i = loss_A(i) - loss_B(i)``. With several seeds, a row's difference is its mean over the
seeds (seeds pooled, rows resampled). The 95% interval is the percentile interval of the mean
over ``n_boot`` resamples of the rows. A method **pays off** against a reference when the whole
interval lies below zero, **loses** when it lies above, and **ties** otherwise.

Pure NumPy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np

Verdict = Literal["pays off", "ties", "loses"]
N_BOOT = 2000
LEVEL = 0.95


def paired_interval(
    a: np.ndarray, b: np.ndarray, n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL
) -> dict[str, float]:
    """Mean of ``a - b`` per row and its bootstrap interval. ``a``, ``b``: (n_rows,) or
    (n_seeds, n_rows) losses of the same rows; seeds are averaged per row first."""
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, float))
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"paired rows differ: {a.shape[1]} and {b.shape[1]}")
    d = a.mean(axis=0) - b.mean(axis=0)
    n = len(d)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "n": int(n)}


def verdict(interval: Mapping[str, float]) -> Verdict:
    """Pays off (interval below zero: lower loss), loses (above zero) or ties."""
    if interval["hi"] < 0:
        return "pays off"
    if interval["lo"] > 0:
        return "loses"
    return "ties"


def comparisons(
    per_row: Mapping[str, np.ndarray], reference: str, baselines: list[str], seed: int = 0
) -> dict[str, dict[str, Any]]:
    """For every method: the paired difference against ``reference`` and against the best
    other of ``baselines`` (the lowest mean loss, the method itself excluded), each with its
    interval and verdict. ``per_row[m]``: (n_seeds, n_rows) or (n_rows,) losses."""
    mean_loss = {m: float(np.mean(v)) for m, v in per_row.items()}
    out: dict[str, dict[str, Any]] = {}
    for m, losses in per_row.items():
        entry: dict[str, Any] = {}
        if reference in per_row and m != reference:
            iv = paired_interval(losses, per_row[reference], seed=seed)
            entry["vs_reference"] = {"method": reference, **iv, "verdict": verdict(iv)}
        others = [b for b in baselines if b in per_row and b != m]
        if others:
            best = min(others, key=lambda b: mean_loss[b])
            iv = paired_interval(losses, per_row[best], seed=seed)
            entry["vs_best_baseline"] = {"method": best, **iv, "verdict": verdict(iv)}
        out[m] = entry
    return out


def routing_costs(
    expert_losses: np.ndarray, routed: np.ndarray, oracle: np.ndarray, seed: int = 0
) -> dict[str, Any]:
    """How much routing costs on the test rows: the routed - oracle gap (with its interval),
    the router's accuracy per cluster (None where a cluster has no test row), and the misroute
    cost, the mean extra loss of a misrouted row (its routed expert's loss minus its own
    cluster's expert's). ``expert_losses``: (K, n_rows); ``routed``/``oracle``: (n_rows,)."""
    expert_losses = np.asarray(expert_losses, dtype=np.float64)
    routed, oracle = np.asarray(routed, dtype=np.int64), np.asarray(oracle, dtype=np.int64)
    rows = np.arange(len(oracle))
    r_loss, o_loss = expert_losses[routed, rows], expert_losses[oracle, rows]
    wrong = routed != oracle
    k = expert_losses.shape[0]
    per_cluster = [
        float((routed[oracle == c] == c).mean()) if (oracle == c).any() else None for c in range(k)
    ]
    return {
        "routed_minus_oracle": paired_interval(r_loss, o_loss, seed=seed),
        "router_accuracy": float((~wrong).mean()) if len(rows) else None,
        "router_accuracy_per_cluster": per_cluster,
        "misrouted_share": float(wrong.mean()) if len(rows) else None,
        "misroute_cost": float((r_loss - o_loss)[wrong].mean()) if wrong.any() else 0.0,
    }


def headline(method: str, entry: Mapping[str, Any]) -> str:
    """The verdict as the first line of a report: 'GradientSpace pays off against one LoRA:
    -0.031 nats per row (95% interval -0.045 to -0.017)'."""
    v = entry.get("vs_reference")
    if not v:
        return f"{method}: no reference to compare with"
    return (
        f"{method} {v['verdict']} against {v['method']}: {v['mean']:+.4f} nats per row "
        f"(95% interval {v['lo']:+.4f} to {v['hi']:+.4f}, {v['n']} test rows)"
    )
