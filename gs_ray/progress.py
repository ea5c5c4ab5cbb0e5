"""Progress lines for long work: items done, rate and ETA, printed at most every few seconds.

Plain log lines rather than a redrawn bar, because they read well in ``ray job logs`` and CI.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("gs_ray.progress")


class Progress:
    """``bar = Progress("stage2 online", total=n); bar.update(k); ...; bar.close()``."""

    def __init__(self, label: str, total: int, unit: str = "samples", every: float = 5.0):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.done = 0
        self.start = self.last = time.perf_counter()

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} ({pct:.0f}%), "
            f"{rate:.1f} {self.unit}/s, ETA {eta:.0f}s"
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            log.info(self.line())

    def close(self) -> float:
        """Log the final line; returns the elapsed seconds."""
        elapsed = time.perf_counter() - self.start
        log.info(
            "%s: done, %d %s in %.1fs (%.1f %s/s)",
            self.label,
            self.done,
            self.unit,
            elapsed,
            self.rate,
            self.unit,
        )
        return elapsed
