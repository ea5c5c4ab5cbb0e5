"""Ranking a scored pool and cutting it to a budget (pure)."""

from __future__ import annotations

import math
import re

import numpy as np

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%?)\s*$")


def budget_count(budget: str, n: int) -> int:
    """How many of ``n`` samples a budget keeps: ``"5%"`` (a share, rounded up, at least one)
    or ``"120"`` (a count, at most n)."""
    m = _BUDGET.match(str(budget))
    if not m:
        raise ValueError(f"budget: expected a percentage such as 5% or a count, got {budget!r}")
    value, percent = float(m.group(1)), m.group(2)
    if percent:
        if not 0 < value <= 100:
            raise ValueError(f"budget: a percentage must be in (0, 100], got {budget!r}")
        return max(1, min(n, math.ceil(n * value / 100 - 1e-9)))
    if value != int(value) or value < 1:
        raise ValueError(f"budget: a count must be a whole number >= 1, got {budget!r}")
    return min(n, int(value))


def rank(ids: list[str], scores: np.ndarray) -> np.ndarray:
    """Order of the pool, best first (ties broken by id, so the ranking is deterministic)."""
    return np.array(sorted(range(len(ids)), key=lambda i: (-float(scores[i]), ids[i])), dtype=int)
