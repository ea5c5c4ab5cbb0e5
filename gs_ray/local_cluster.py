"""Throwaway multi-process Ray clusters on 127.0.0.1, for tests and benchmarks (the product's own
local Ray is ``local_ray.start_local_ray``): ``LocalHead`` (``ray start --head`` on free ports,
shared by a test run and reachable by ``ray job submit``), ``LocalNode`` (``LocalHead.add_node()``:
a worker node that ``kill()`` removes at once, as a lost machine) and ``LocalAutoscalingCluster``
(a head with Ray's fake multi-node autoscaler). Each stops only its own processes. Loopback and
process handling come from ``local_ray``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gs_ray.local_ray import (
    LOOPBACK,
    descendants,
    free_port,
    loopback_env,
    terminate,
    use_loopback_env,
    with_gs_ray_importable,
)

log = logging.getLogger(__name__)

# A LocalNode launcher's exit statuses: one of its ports was taken before it started; its raylet
# ended (at start-up: Ray 2.60's raylet aborts when its dashboard agent has not written its port
# file within a fixed 15 s, which a loaded machine can miss).
PORT_TAKEN = 3
RAYLET_ENDED = 4
HEALTH_CHECK_PERIOD_MS = 1000  # LocalHead._start_env


class _PortTaken(RuntimeError):
    """The launcher ended at once: one of its ports was taken (``start`` tries other ports)."""


class _RayletEnded(RuntimeError):
    """The node's raylet ended before the node joined (``start`` tries again)."""


class LocalHead:
    """``ray start --head`` on 127.0.0.1 with free ports; ``stop()`` ends only this cluster.

    ``ray stop`` would stop every Ray on the machine; this stops the processes named by this
    cluster's private temp dir or GCS port, and their children.
    """

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
        self.nodes: list[LocalNode] = []  # worker nodes added by add_node

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (ray CLI, jobs) that should talk to this cluster."""
        env = loopback_env()
        # Job entrypoints say `python ...`: let that be this environment's interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        return env

    def start(self) -> LocalHead:
        use_loopback_env()  # this process connects as a driver too
        start = time.perf_counter()
        out = subprocess.run(
            self._start_cmd(), env=self._start_env(), capture_output=True, text=True, timeout=180
        )
        if out.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed:\n{out.stdout}\n{out.stderr}")
        log.info("local Ray head at %s (%.1fs)", self.address, time.perf_counter() - start)
        return self

    def _start_env(self) -> dict[str, str]:
        env = self.env()
        # The GCS checks each raylet every 3 s and marks it dead after 5 failures: a node that
        # a test kills (a lost node) is noticed 15 s later. Checked every 1 s, 5 s later; a
        # raylet that is alive but slow still has 5 x the 10 s timeout before it counts as dead.
        env.setdefault("RAY_health_check_period_ms", str(HEALTH_CHECK_PERIOD_MS))
        return env

    def _start_cmd(self) -> list[str]:
        ray_cli = str(Path(sys.executable).with_name("ray"))
        return [
            ray_cli,
            "start",
            "--head",
            f"--port={self.port}",
            f"--node-ip-address={LOOPBACK}",
            f"--num-cpus={self.num_cpus}",
            f"--temp-dir={self.temp_dir}",
            f"--ray-client-server-port={self.client_port}",
            "--disable-usage-stats",
            f"--include-dashboard={'true' if self.dashboard else 'false'}",
            f"--dashboard-host={LOOPBACK}",
            f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={self.agent_port}",
        ]

    def processes(self) -> list:
        """This cluster's processes (psutil): those started by ``ray start`` and their children."""
        import psutil

        marks = (self.temp_dir, f":{self.port}")
        roots = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            cmdline = p.info.get("cmdline") or []
            if any(m in arg for arg in cmdline for m in marks):
                roots.append(p)
        return list({p.pid: p for r in roots for p in [r, *descendants(r)]}.values())

    def stop(self, timeout: float = 3.0) -> None:
        """Terminate this cluster's processes and their children; kill what lingers after
        ``timeout`` seconds (the GCS, the raylet and the autoscaler's monitor take about 10 s
        to leave on SIGTERM; a throwaway cluster has nothing they need to save)."""
        for node in list(self.nodes):
            node.kill()
        terminate(self.processes(), timeout)
        # its sessions' logs and sockets: a throwaway cluster leaves nothing in /tmp
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def add_node(
        self,
        num_cpus: int = 1,
        resources: dict[str, float] | None = None,
        labels: dict[str, str] | None = None,
    ) -> LocalNode:
        """A worker node joined to this head, on 127.0.0.1 (see ``LocalNode``); ``stop()`` kills
        it too. Its launcher's command line names this head's port, so a ``stop()`` after a
        crash of this process finds it as well."""
        node = LocalNode(self, num_cpus, resources or {}, labels or {}).start()
        self.nodes.append(node)
        return node

    def __enter__(self) -> LocalHead:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class LocalAutoscalingCluster(LocalHead):
    """A ``LocalHead`` whose autoscaler adds and removes worker nodes as local processes
    (Ray's ``fake_multinode`` provider), from a config such as ``cluster_config.render_fake``.

    It starts with the head alone; resource demand that the head cannot meet (a custom GPU-like
    resource) makes the autoscaler launch nodes, which join this head on 127.0.0.1 and are
    terminated after the config's idle timeout. ``stop()`` ends this cluster's processes only:
    Ray's own ``AutoscalingCluster`` helper runs ``ray stop --force``, which would end every Ray
    on the machine. The config's ``provider.gcs_address`` is set to this head.
    """

    def __init__(self, config: dict, num_cpus: int = 1, update_interval_s: int = 1):
        super().__init__(num_cpus=num_cpus, dashboard=True)
        self.config = json.loads(json.dumps(config))
        self.config["provider"]["gcs_address"] = self.address
        self.update_interval_s = update_interval_s
        self.config_path = Path(self.temp_dir) / "autoscaling.json"

    def _start_env(self) -> dict[str, str]:
        env = super()._start_env()
        # RAY_FAKE_CLUSTER: the provider refuses to run without it, and the head takes the node
        # id the provider gives its head.
        env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S=str(self.update_interval_s))
        return env

    def _start_cmd(self) -> list[str]:
        self.config_path.write_text(json.dumps(self.config))
        return [*super()._start_cmd(), f"--autoscaling-config={self.config_path}"]

    def alive_nodes(self) -> list:
        """The nodes the head lists as alive (through its dashboard: no driver connection)."""
        from ray.util.state import list_nodes

        nodes = list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
        return [n for n in nodes if n.state == "ALIVE"]


class LocalNode:
    """A worker node of a ``LocalHead``: a raylet on 127.0.0.1 that joins the head.

    Ray 2.60's ``ray start --address`` refuses to join in single-machine mode (and outside it
    would replace 127.0.0.1 by the machine's external address), so the node is started the way
    Ray's own fake multi-node provider does it: ``ray._private.node.Node(head=False)``, in a
    launcher process of ours (``python -m gs_ray.local_cluster node SPEC``) that stays the parent of
    the node's raylet (no log monitor: the head's reads its logs), in a session of its own.
    ``kill()`` SIGKILLs that group and every descendant of the raylet (workers, agents): the node
    is lost as a machine would be, with no clean-up. Every port of the node is a free port of its
    own.
    """

    def __init__(
        self, head: LocalHead, num_cpus: int, resources: dict[str, float], labels: dict[str, str]
    ):
        self.head, self.num_cpus, self.resources, self.labels = head, num_cpus, resources, labels
        self.node_manager_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.node_id: str | None = None

    def spec(self) -> dict:
        """What the launcher passes to ``RayParams``."""
        return {
            "gcs_address": self.head.address,
            "node_ip_address": LOOPBACK,
            "num_cpus": self.num_cpus,
            "num_gpus": 0,
            "resources": self.resources,
            "labels": self.labels,
            "node_manager_port": self.node_manager_port,
            "object_manager_port": free_port(),
            "metrics_export_port": free_port(),
            "metrics_agent_port": free_port(),
            "runtime_env_agent_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
            "min_worker_port": 0,
            "max_worker_port": 0,
            "object_store_memory": 200_000_000,
            # No log monitor of its own: the head's reads the session folder that every node of
            # this machine shares, workers' logs included (Ray: one log monitor per host, or
            # each line reaches the drivers twice).
            "include_log_monitor": False,
            # Its own runtime-env folder: every node of this machine shares the head's session
            # folder, and a node asked for a working_dir whose package had left the GCS deleted
            # the head's unpacked copy, which the head still listed as installed: the next
            # `ray job submit` of that folder failed ("does not exist on the cluster").
            "runtime_env_dir_name": f"runtime_resources_node{self.node_manager_port}",
        }

    def start(self, timeout: float = 300.0, tries: int = 5) -> LocalNode:
        """Launch the node and wait until the head lists it (this process must be connected);
        where the launcher found one of its ports taken, or its raylet ended before the node
        joined, again on other ports."""
        for attempt in range(tries - 1):
            try:
                return self._start(timeout)
            except (_PortTaken, _RayletEnded) as err:
                log.warning("worker node start %d of %d failed, again: %s", attempt + 1, tries, err)
                self.node_manager_port = free_port()  # spec() chooses the other ports anew
        return self._start(timeout)

    def _start(self, timeout: float) -> LocalNode:
        import ray

        cmd = [sys.executable, "-m", "gs_ray.local_cluster", "node", json.dumps(self.spec())]
        env = with_gs_ray_importable(self.head.env())
        log_path = Path(self.head.temp_dir) / f"node-{self.node_manager_port}.log"
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self.node_id is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                status = self.proc.poll()
                self.kill()
                said = log_path.read_text()[-3000:]
                if status == PORT_TAKEN:
                    raise _PortTaken(said)
                if status == RAYLET_ENDED:
                    raise _RayletEnded(said + self._raylet_errors())
                raise RuntimeError(f"worker node did not join:\n{said}")
            time.sleep(0.5)
            self.node_id = self._find_node_id(ray.nodes())
        return self

    def _raylet_errors(self) -> str:
        """The last lines of the head's session's raylet error logs that name an error (where a
        raylet that aborted says why); every node of this machine writes there, so an earlier
        node's error may be among them, named by its file."""
        said = []
        for path in sorted(Path(self.head.temp_dir).glob("session_*/logs/raylet*.err")):
            lines = [x for x in path.read_text(errors="replace").splitlines() if " C " in x[:40]]
            said += [f"{path.name}: {x}" for x in lines[-2:]]
        return "\n" + "\n".join(said) if said else ""

    def _find_node_id(self, nodes: list[dict]) -> str | None:
        for n in nodes:
            if n.get("Alive") and n.get("NodeManagerPort") == self.node_manager_port:
                return n["NodeID"]
        return None

    def processes(self) -> list:
        """The node's processes: the launcher and its descendants (raylet, workers, agents)."""
        import psutil

        if self.proc is None or self.proc.poll() is not None:
            # Reaped: its pid is free, and on a busy machine soon another process's (pid_max
            # is 32,768 here): a second kill() would take that process and its children.
            return []
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return []
        return [root, *descendants(root)]

    def kill(self) -> None:
        """SIGKILL every process of this node at once (a lost machine); idempotent."""
        import signal

        import psutil

        procs = self.processes()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(procs, timeout=10)
        if self.proc is not None:
            self.proc.wait(timeout=10)
        if self in self.head.nodes:
            self.head.nodes.remove(self)


def run_node(spec: dict) -> None:
    """The launcher of a ``LocalNode``: start the raylet and stay its parent until killed."""
    from ray._private.node import Node
    from ray._private.parameter import RayParams

    try:
        Node(RayParams(**spec), head=False, shutdown_at_exit=False, spawn_reaper=False)
    except ValueError as err:
        if "used by other components" not in str(err):  # RayParams' check of its ports
            raise
        # Two of its ports are one: nothing was started, so the launcher ends at once
        # (LocalNode.start chooses other ports) instead of waiting out LocalNode's timeout.
        print(f"node start: {err}", file=sys.stderr, flush=True)
        sys.exit(PORT_TAKEN)
    except Exception as err:
        # Ray waits a fixed 30 s for the raylet to register; on a loaded machine it may take
        # longer. Its processes run on: LocalNode.start decides, with its own timeout.
        print(f"node start: {err}; waiting for the raylet anyway", file=sys.stderr, flush=True)
    watch_raylet()


def watch_raylet() -> None:
    """Stay the parent of the node's raylet; if it ends (a raylet that aborted at start-up,
    see ``RAYLET_ENDED``), SIGKILL what is left of the node (the processes of this launcher's
    process group, which its agents share, and its children) and exit ``RAYLET_ENDED``: without
    it the launcher would wait on, and ``LocalNode.start`` out its whole timeout, for a node
    that can no longer join."""
    import psutil

    me = psutil.Process()
    raylet = next((p for p in me.children() if _is_raylet(p)), None)
    if raylet is not None:  # waitpid on a child of ours: exact, where a status read could fail
        raylet.wait()
    pid = raylet.pid if raylet is not None else "none found"
    print(f"node start: the raylet ended (pid {pid})", file=sys.stderr, flush=True)
    group = os.getpgid(0)
    left = set(descendants(me))
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if p.pid != me.pid and os.getpgid(p.pid) == group:
                left.add(p)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()
    sys.exit(RAYLET_ENDED)


def _is_raylet(proc) -> bool:
    import psutil

    try:
        return proc.name() == "raylet"
    except psutil.Error:
        return False


if __name__ == "__main__":  # a LocalNode's launcher: python -m gs_ray.local_cluster node SPEC_JSON
    if sys.argv[1:2] == ["node"]:
        run_node(json.loads(sys.argv[2]))
