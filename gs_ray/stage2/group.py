"""A group of Ray actors that start together and end together (like verl's ``RayWorkerGroup``).

``WorkerGroup`` starts N actors of one actor class with the same arguments and options (the
gradient workers: their placement comes from ``launch.WorkerSetup.actor_options``), hands out
the worker of a batch (round robin), calls a method on every worker, and kills them all when its
``with`` block ends, however it ends: a failed pass must not hold the cluster's CPUs. An actor
that lives and dies with the group but is not one of its workers (the centroid actor) is
``attach``-ed to it.

Ray is imported inside the methods, as everywhere in the package.
"""

from __future__ import annotations

import contextlib
from typing import Any

STATS_TIMEOUT_S = 30  # a worker that does not answer its stats call in this time is killed anyway


class WorkerGroup:
    """N actors of ``actor_class`` (a Ray actor class), each started with ``args`` and
    ``options`` (Ray actor options: resources, restarts, runtime environment, placement).

    ``with WorkerGroup(...) as group:`` - ``group.workers``, ``len(group)``, ``group[i]``,
    ``group.for_batch(t)`` (rank ``group.rank_of_batch(t)``), ``group.call_all(name, *args)``
    (one ref per worker, in rank order), ``group.gather(name, *args)`` (their values). On exit,
    with ``stats`` (a method name) each worker's answer to it is read into ``group.stats``
    first, skipping workers that are dead or do not answer; then every worker, and every
    attached actor, is killed.
    """

    def __init__(
        self,
        actor_class,
        n: int,
        *args: Any,
        options: dict[str, Any] | None = None,
        stats: str | None = None,
    ):
        cls = actor_class.options(**options) if options else actor_class
        self.stats_method = stats
        self.stats: list[dict] = []
        self.workers: list = []
        self.attached: list = []
        self.ended = False
        try:
            for _ in range(n):
                self.workers.append(cls.remote(*args))
        except BaseException:  # the ones already started go too
            self.kill()
            raise

    def __len__(self) -> int:
        return len(self.workers)

    def __getitem__(self, rank: int):
        return self.workers[rank]

    def __iter__(self):
        return iter(self.workers)

    def rank_of_batch(self, t: int) -> int:
        """The rank of batch ``t``'s worker (round robin)."""
        return t % len(self.workers)

    def for_batch(self, t: int):
        """The worker of batch ``t``."""
        return self.workers[self.rank_of_batch(t)]

    def call_all(self, name: str, *args: Any) -> list:
        """``name(*args)`` submitted to every worker: the object refs, in rank order."""
        return [getattr(w, name).remote(*args) for w in self.workers]

    def gather(self, name: str, *args: Any) -> list:
        """``name(*args)`` on every worker: the values, in rank order (raises if one fails)."""
        import ray

        return ray.get(self.call_all(name, *args))

    def attach(self, actor):
        """An actor that ends with the group (killed after the workers); returns it."""
        self.attached.append(actor)
        return actor

    def kill(self) -> None:
        """Read the workers' stats (if asked for), then kill every worker and attached actor
        (once: a second call does nothing)."""
        import ray

        if self.ended:
            return
        self.ended = True
        for w in self.workers:
            if self.stats_method is not None:
                with contextlib.suppress(Exception):  # a dead worker has no stats
                    ref = getattr(w, self.stats_method).remote()
                    self.stats.append(ray.get(ref, timeout=STATS_TIMEOUT_S))
            ray.kill(w)
        for actor in self.attached:
            ray.kill(actor)

    def __enter__(self) -> WorkerGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.kill()
