"""Fault injection for tests: crash a process hard, once, at a chosen point.

``GS_RAY_FAULTS="worker:online:0:5,driver:final:0:3"`` makes the gradient worker that processes
online epoch 0, batch 5 call ``os._exit(1)``, and the driver exit after submitting final batch
3. Each fault fires once per run directory (a marker file remembers it), so the restarted worker
or the resumed run goes through. Unset, nothing happens.

``stall:online:0:5`` makes that worker write its marker and then hang instead of exiting: a test
waits for the marker and removes the worker's whole node (``LocalNode.kill``), so the node is
lost while the pass is certainly in progress.

``trainer:expert_1:1:1``: the rank-0 Ray Train worker that trains the adapter ``expert_1`` dies
after its first optimizer step of epoch 1 (epochs from 0, steps within the epoch from 1); Ray
Train's retry resumes from that job's last epoch checkpoint (``training/ray_train.py`` says how,
and waits out the controller's poll first). The marker goes in the Ray Train run's folder, which
a run that does not resume clears: such a run crashes again.

The hot loops only ask ``fires`` / ``maybe_die`` where a fault can be planned; the spec travels
in the environment (Ray Train's workers get it with the run's forwarded environment).
"""

from __future__ import annotations

import os
import time
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
    """Exit the process now if (who, phase, epoch, t) is planned and has not fired yet; a
    worker with ``stall`` planned there hangs instead (until its node is killed)."""
    if fires(faults, who, phase, epoch, t, marker_dir):
        os._exit(1)
    if who == "worker" and fires(faults, "stall", phase, epoch, t, marker_dir):
        while True:
            time.sleep(1)


def fires(faults, who: str, phase: str, epoch: int, t: int, marker_dir: str | Path) -> bool:
    """True once per run directory for a planned fault (its marker file records it)."""
    if (who, phase, epoch, t) not in faults:
        return False
    marker = Path(marker_dir) / f"fault-{who}-{phase}-{epoch}-{t}"
    if marker.exists():
        return False
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("fired\n")
    return True
