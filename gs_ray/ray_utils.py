"""Connecting to Ray, and small questions to the connected cluster.

``init_ray`` is what the jobs call: inside ``ray job submit`` (or with RAY_ADDRESS / run.ray_address
set) it connects to that cluster; run directly with no cluster it starts a local Ray itself, bound
to 127.0.0.1 (``gs_ray.local_ray``, which also has the ``LocalHead`` that tests share).
"""

from __future__ import annotations

import os

STARTED_LOCAL = "started a local Ray"


def init_ray(
    address: str | None = None, num_cpus: int | None = None, log_to_driver: bool = True
) -> str:
    """Connect to the given/ambient cluster, or start a local one. Returns a description.

    A cluster given by ``address`` or RAY_ADDRESS is joined with the user's own authentication
    settings (RAY_AUTH_MODE, ~/.ray/auth_token) untouched, so token auth works there. The
    cluster started here, every listener on 127.0.0.1, runs with token auth and a fresh token
    of its own unless the user set RAY_AUTH_MODE (``local_ray.start_local_ray``).
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
        return f"connected to {address}"
    from gs_ray.local_ray import start_local_ray

    start_local_ray(num_cpus, log_to_driver=log_to_driver)
    return STARTED_LOCAL


def cluster_has_gpu() -> bool:
    """Whether the connected Ray cluster has GPUs now (an autoscaled one may add them later)."""
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def task_resources(cpus: int = 2) -> dict:
    """Ray resources for a one-off model task: a GPU where the cluster has one, else CPUs."""
    import ray

    if cluster_has_gpu():
        return {"num_gpus": 1, "num_cpus": 1}
    return {"num_cpus": max(1, min(cpus, int(ray.cluster_resources().get("CPU", 1))))}


def use_assigned_cpus() -> int:
    """Inside a Ray task or actor: let torch use as many threads as the CPUs Ray assigned it (a
    task started with ``task_resources()`` may otherwise run on one thread). Returns them."""
    import ray
    import torch

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    threads = max(1, int(cpus))
    torch.set_num_threads(threads)
    return threads
