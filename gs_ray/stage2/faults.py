"""Fault injection for tests: crash a process hard, once, at a chosen batch.

``GS_RAY_FAULTS="worker:online:0:5,driver:final:0:3"`` makes the gradient worker that processes
online epoch 0, batch 5 call ``os._exit(1)``, and the driver exit after submitting final batch
3. Each fault fires once per run directory (a marker file remembers it), so the restarted worker
or the resumed run goes through. Unset, nothing happens.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "GS_RAY_FAULTS"


def parse(spec: str | None = None) -> list[tuple[str, str, int, int]]:
    """[(who, phase, epoch, t), ...] from the spec (default: the environment variable)."""
    spec = os.environ.get(ENV, "") if spec is None else spec
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        who, phase, epoch, t = item.split(":")
        out.append((who, phase, int(epoch), int(t)))
    return out


def maybe_die(faults, who: str, phase: str, epoch: int, t: int, marker_dir: str | Path) -> None:
    """Exit the process now if (who, phase, epoch, t) is planned and has not fired yet."""
    if (who, phase, epoch, t) not in faults:
        return
    marker = Path(marker_dir) / f"fault-{who}-{phase}-{epoch}-{t}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    os._exit(1)
