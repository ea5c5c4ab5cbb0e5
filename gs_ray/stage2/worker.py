"""The gradient worker: a ``GradientComputer`` in a Ray actor (one per GPU, or per CPU slot)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import numpy as np

from gs_ray import faults
from gs_ray.config import Config
from gs_ray.stage2.batch import GradientBatch, check_finite
from gs_ray.stage2.plan import BatchKey
from gs_ray.stage2.transports import PartialSumsWorker


class GradientWorker(PartialSumsWorker):
    """Computes gradient batches; carries the worker side of the partial-sums transport.

    Two concurrency groups: ``compute`` (gradients, one at a time) and ``io`` (assigning,
    evicted-row sums), so that a batch can be assigned while the next one is computed.
    """

    def __init__(
        self,
        base_path: str,
        cfg: Config,
        adapter_path: str,
        pad_id: int,
        fault_spec: str = "",
        marker_dir: str = "",
    ):
        # imported here: torch, transformers and peft load in the processes that compute
        # gradients, not in every process that imports this module (a synthetic worker's)
        from gs_ray.stage2.computer import GradientComputer

        self.computer = GradientComputer(base_path, cfg, adapter_path, pad_id)
        if self.computer.device.type == "cpu":
            # The worker's process is its own (Ray gives each actor one, and ends it with it).
            lower_priority(cfg.stage2.worker_nice, cfg.stage2.worker_idle)
        self.faults = faults.parse(fault_spec)
        self.marker_dir = marker_dir
        self.busy_seconds = 0.0
        self.model_lock = threading.Lock()  # the engine's hooks are not thread-safe
        self._init_partial_sums(reconstructed=_was_reconstructed())

    def raw_gradients(self, pairs: list) -> np.ndarray:
        with self.model_lock:
            start = time.perf_counter()
            G = self.computer(pairs)
            self.busy_seconds += time.perf_counter() - start
        return G

    def batch_gradients(self, key: BatchKey, pairs: list, ids: list[str]) -> GradientBatch:
        """The batch's gradients, checked (non-finite policy); fault injection for tests."""
        faults.maybe_die(self.faults, "worker", *key, self.marker_dir)
        return check_finite(self.raw_gradients(pairs), ids, self.computer.nonfinite)

    gradients = batch_gradients  # the exact transport's call

    def stats(self) -> dict[str, float]:
        return {
            "busy_seconds": self.busy_seconds,
            "pid": os.getpid(),
            "recomputed": self.recomputed,
            "engine_calls": self.computer.calls,
            "nice": os.nice(0),  # its scheduling niceness (stage2.worker_nice)
            "policy": scheduling_policy(),  # "idle" with stage2.worker_idle on a CPU
        }

    def layout(self) -> dict[str, Any]:
        return self.computer.layout()


def lower_priority(nice: int, idle: bool) -> None:
    """Lower this process's scheduling priority: every thread's niceness by ``nice`` (at most
    19), and the SCHED_IDLE policy if ``idle`` (Linux; elsewhere only the niceness). Linux
    applies both per thread, and a thread inherits them from the thread that starts it, so
    every thread that exists now is set, and those started later follow."""
    for tid in process_threads():
        try:
            if nice:
                was = os.getpriority(os.PRIO_PROCESS, tid)
                os.setpriority(os.PRIO_PROCESS, tid, min(19, was + nice))
            if idle and hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue


def process_threads() -> list[int]:
    """The ids of this process's threads (Linux: /proc/self/task), for the calls that Linux
    applies per thread (niceness, scheduling policy); elsewhere [0], the calling thread."""
    task = "/proc/self/task"
    return [int(t) for t in os.listdir(task)] if os.path.isdir(task) else [0]


def scheduling_policy() -> str:
    """The calling thread's scheduling policy: "idle" (SCHED_IDLE), or "other"."""
    idle = getattr(os, "SCHED_IDLE", None)
    return "idle" if idle is not None and os.sched_getscheduler(0) == idle else "other"


def _was_reconstructed() -> bool:
    """True inside a Ray actor that has been restarted after a crash."""
    try:
        import ray

        return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside a Ray actor
        return False


def worker_actor_class(base: type[GradientWorker] = GradientWorker):
    """GradientWorker (or a subclass, e.g. a benchmark's model-free worker) as a Ray actor
    class with its two concurrency groups."""
    import ray

    cls = type(base.__name__, (base,), {})
    groups = {
        "gradients": "compute",
        "compute": "compute",
        "final_labels": "compute",
        "reduce": "io",
        "evicted_share": "io",
        "stats": "io",
        "layout": "io",
    }
    for name, group in groups.items():
        setattr(cls, name, ray.method(concurrency_group=group)(getattr(base, name)))
    # Out of order: a call runs once its arguments are ready, not after every call submitted
    # before it. The partial-sums transport sends every worker each batch's evicted-row share,
    # which waits for that batch's assignment; in order, the next batch's gradients (submitted
    # later) would wait for it too, and the workers would compute one after another. The
    # order that matters is carried by the arguments (each assignment waits for the centroids
    # after the batch before it) and by the concurrency groups (one computation at a time).
    return ray.remote(
        concurrency_groups={"compute": 1, "io": 1}, allow_out_of_order_execution=True
    )(cls)
