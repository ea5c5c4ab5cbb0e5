"""Connecting to Ray, and a local head node that can be started and stopped on its own.

``init_ray`` is what the jobs call: inside ``ray job submit`` (or with RAY_ADDRESS / run.ray_address
set) it connects to that cluster; run directly with no cluster it starts a local Ray itself.

``LocalHead`` starts ``ray start --head`` on 127.0.0.1 with free ports and a private temp dir, and
stops only the processes of that cluster (``ray stop`` would stop every Ray on the machine). Tests
and benchmarks share one such head per run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _quiet_ray_env() -> None:
    # Ray 2.60 writes ~/.ray/auth_token on a local init and then demands it from `ray job
    # submit`; a cluster we start ourselves binds to 127.0.0.1, so token auth is switched off.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def init_ray(address: str | None = None, num_cpus: int | None = None) -> str:
    """Connect to the given/ambient cluster, or start a local one. Returns a description."""
    import ray

    _quiet_ray_env()
    if ray.is_initialized():
        return "already connected"
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return f"connected to {address}"
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
    return "started a local Ray"


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


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalHead:
    """``ray start --head`` on 127.0.0.1 with free ports; ``stop()`` ends only this cluster."""

    def __init__(self, num_cpus: int = 2, dashboard: bool = True):
        self.num_cpus = num_cpus
        self.dashboard = dashboard
        self.temp_dir = tempfile.mkdtemp(prefix="gsr-", dir="/tmp")  # short: socket path limit
        self.port = free_port()
        self.dashboard_port = free_port()
        self.client_port = free_port()
        # Ray's default (52365) is shared by every head on the machine: a second head's job agent
        # could not bind it, and `ray job submit` answered "No available agent".
        self.agent_port = free_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (ray CLI, jobs) that should talk to this cluster."""
        env = dict(os.environ)
        env.update(RAY_AUTH_MODE=env.get("RAY_AUTH_MODE", "disabled"), RAY_USAGE_STATS_ENABLED="0")
        # Job entrypoints say `python ...`: let that be this environment's interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self) -> LocalHead:
        _quiet_ray_env()
        ray_cli = str(Path(sys.executable).with_name("ray"))
        cmd = [
            ray_cli, "start", "--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.num_cpus}", f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={self.client_port}", "--disable-usage-stats",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
        ]  # fmt: skip
        start = time.perf_counter()
        out = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=180)
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
        log.info("local Ray head at %s (%.1fs)", self.address, time.perf_counter() - start)
        return self

    def _processes(self):
        import psutil

        marks = (self.temp_dir, f":{self.port}")
        found = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = p.info.get("cmdline") or []
            if any(m in arg for arg in cmdline for m in marks):
                found.append(p)
        return found

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate this cluster's processes and their children; kill what lingers."""
        import psutil

        roots = self._processes()
        procs = {p.pid: p for r in roots for p in [r, *_children(r)]}.values()
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.terminate()
        _, alive = psutil.wait_procs(list(procs), timeout=timeout)
        for p in alive:
            with contextlib.suppress(psutil.Error):
                p.kill()

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _children(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []
