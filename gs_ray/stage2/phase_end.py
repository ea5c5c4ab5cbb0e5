"""The end of a Stage II pass, written once for the three executors (local, Ray, collective).

After the validation pass the host initialises (SVD + silhouette: K) and says which K; after an
online epoch it closes the epoch and says how much moved; then the checkpoint is written; then
the pass's record (``info["passes"]``) takes what the host's status says changed during it.
``PhaseEnd`` does these steps in this order; the executor says how each is done (on the host
in this process, on the centroid actor, or on the collective replicas) by handing it callables.
Free of Ray but for ``PhaseEnd.of_actor``, which imports it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gs_ray.stage2.plan import ONLINE, VAL

log = logging.getLogger(__name__)


def log_epoch(end: dict) -> None:
    """One line per online epoch: how many samples changed cluster, and why it stops."""
    changed = end["changed_share"]
    log.info(
        "online epoch %d: %s of samples changed cluster, centroid shift %.4f%s",
        end["epoch"] + 1,
        "?" if changed is None or changed != changed else f"{changed:.2%}",
        end["shift"],
        f"; online phase stops ({end['stop']})" if end["stop"] else "",
    )


class PhaseEnd:
    """What happens when a pass over the plan's batches ends, and the record of each pass.

    ``initialize()`` and ``end_epoch(epoch)`` are the host's phase ends (their answers are
    logged); ``checkpoint(phase)`` writes the checkpoint (None: no checkpoints, the local
    executor); ``status()`` reads the host's status (None: no records). ``begin(status)`` marks
    the start of a pass; calling the object ends it and returns the host's status after it.

    Each record has the phase, the epoch, ``seconds``, the samples, and the deltas of the
    host's busy seconds, checkpoint seconds, skipped periodic checkpoints and bytes received.
    ``seconds`` is the batches' time (``elapsed``, the progress bar's); with
    ``whole_pass_seconds`` it is the whole pass up to the record, phase end and checkpoint
    included, and the batches' time is ``wall_seconds`` (the collective executor's records).
    ``passes`` is the list the records go to (a new one by default).
    """

    def __init__(
        self,
        initialize: Callable[[], dict[str, Any]],
        end_epoch: Callable[[int], dict[str, Any]],
        checkpoint: Callable[[str], Any] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        *,
        whole_pass_seconds: bool = False,
        passes: list[dict] | None = None,
    ):
        self.initialize, self.end_epoch = initialize, end_epoch
        self.checkpoint, self.status = checkpoint, status
        self.whole_pass_seconds = whole_pass_seconds
        self.passes = [] if passes is None else passes
        self._before: dict[str, Any] = {}
        self._start = time.perf_counter()

    @classmethod
    def of_actor(cls, host, checkpoint_dir: str | Path, **overrides: Any) -> PhaseEnd:
        """The phase ends of a centroid actor ``host``: its own methods, the checkpoint into
        ``checkpoint_dir``; ``overrides`` replace any of the constructor's arguments."""
        import ray

        ckpt = str(checkpoint_dir)
        steps: dict[str, Any] = {
            "initialize": lambda: ray.get(host.initialize.remote()),
            "end_epoch": lambda epoch: ray.get(host.end_epoch.remote(epoch)),
            "checkpoint": lambda phase: ray.get(host.save_checkpoint.remote(ckpt)),
            "status": lambda: ray.get(host.status.remote()),
        }
        return cls(**{**steps, **overrides})

    def begin(self, status: dict[str, Any] | None = None) -> None:
        """A pass starts; ``status`` is the host's status now (what the record subtracts)."""
        self._before = status or {}
        self._start = time.perf_counter()

    def __call__(
        self, phase: str, epoch: int, batches: Sequence[Sequence[int]], elapsed: float
    ) -> dict[str, Any] | None:
        """End the pass (``elapsed``: its batches' seconds): the host's phase end, the
        checkpoint, the record. Returns the host's status after it (None without ``status``)."""
        if phase == VAL:
            info = self.initialize()
            log.info("K selection: K=%d (silhouette %.3f)", info["k"], info["silhouette"])
        elif phase == ONLINE:
            log_epoch(self.end_epoch(epoch))
        if self.checkpoint is not None:
            self.checkpoint(phase)
        if self.status is None:
            return None
        after, before = self.status(), self._before
        if self.whole_pass_seconds:
            seconds = {
                "seconds": round(time.perf_counter() - self._start, 3),
                "wall_seconds": round(elapsed, 3),
            }
        else:
            seconds = {"seconds": round(elapsed, 3)}
        self.passes.append(
            {
                "phase": phase,
                "epoch": epoch,
                **seconds,
                "samples": sum(len(b) for b in batches),
                "centroid_busy_seconds": round(after["busy_seconds"] - before["busy_seconds"], 4),
                "centroid_busy_cpu_seconds": round(
                    after["busy_cpu_seconds"] - before["busy_cpu_seconds"], 4
                ),
                "centroid_checkpoint_seconds": round(
                    after["checkpoint_seconds"] - before["checkpoint_seconds"], 4
                ),
                "checkpoints_skipped": after["checkpoints_skipped"] - before["checkpoints_skipped"],
                "bytes_in": after["bytes_in"] - before["bytes_in"],
            }
        )
        return after
