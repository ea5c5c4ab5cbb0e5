"""gs-ray's own single-machine Ray clusters: bound to loopback, and not outliving their driver.

Two kinds: ``start_local_ray`` is what a job run with no cluster does (``ray.init`` in the driver's
process); ``LocalHead`` is a ``ray start --head`` that tests and benchmarks share and that
``ray job submit`` can reach. Both run with token authentication off (``RAY_AUTH_MODE=disabled``
unless the user set it), which is acceptable only because every process of these clusters (GCS,
raylet, object manager, dashboard and its agent, runtime-env agent, metrics exporters, workers,
drivers) listens on 127.0.0.1 alone. Joining someone else's cluster is ``ray_utils.init_ray``'s
other branch and keeps whatever authentication the user configured.

Why an environment variable is needed for loopback: Ray 2.60 replaces a node IP of 127.0.0.1 by
the machine's external address (``services.resolve_ip_for_localhost``) unless it runs as a
single-machine cluster, its mode on macOS and Windows, switched on Linux with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. With the node IP really 127.0.0.1, Ray's gRPC servers and
metrics exporters bind to loopback instead of 0.0.0.0 / ``::``.

Why a reaper: when the driver of a ``ray.init`` cluster is killed, the kernel ends the processes the
driver started (GCS, raylet, dashboard, monitor), but the raylet's children, the dashboard agent
and the runtime-env agent, first try for 60 s to report the raylet's death to the dead GCS
(a fixed timeout in Ray) and keep their ports open meanwhile. A small process started with the
cluster waits for the driver to end and then ends what is left of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
# Ray's switch for a single-machine cluster whose node IP may be 127.0.0.1 (see module docstring).
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# What the reaper allows Ray's own clean-up after the driver ends, and SIGTERM before SIGKILL.
REAPER_GRACE_S = 1.0
REAPER_TERM_WAIT_S = 3.0


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8 or ::1, also as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


# The rendezvous stores this process hosts on loopback, with their sockets: torch keeps only a
# weak reference to a multi-tenant store's server, so they are held here for the process's life.
_LOOPBACK_STORES: list = []


def host_loopback_store(world_size: int, timeout_s: float) -> int:
    """Host a ``torch.distributed`` rendezvous store (a TCPStore server) in this process,
    listening on 127.0.0.1 alone, on a free port; returns the port.

    torch's own TCPStore listens on every interface (``::``) whatever address it is given, so a
    process group on gs-ray's loopback cluster would open a port to the network. The store
    created here listens on a socket bound to loopback (``master_listen_fd``) and is
    multi-tenant: ``init_process_group(init_method="tcp://127.0.0.1:PORT")`` in this process
    then uses this server instead of starting its own. Call it in rank 0's process, before
    every rank joins."""
    from datetime import timedelta

    import torch.distributed as dist

    sock = socket.socket()
    sock.bind((LOOPBACK, 0))
    port = sock.getsockname()[1]
    store = dist.TCPStore(
        LOOPBACK,
        port,
        world_size,
        True,
        timedelta(seconds=timeout_s),
        wait_for_workers=False,
        multi_tenant=True,
        master_listen_fd=sock.fileno(),
    )
    _LOOPBACK_STORES.append((sock, store))
    return port


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a gs-ray-owned loopback cluster (a copy of ``env``, default os.environ).

    Token authentication is off unless the user set RAY_AUTH_MODE: Ray 2.60 would otherwise write
    ~/.ray/auth_token on a local start and ``ray job submit`` would then need it. That is
    acceptable only because every listener of such a cluster is on 127.0.0.1.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env[SINGLE_MACHINE_ENV] = "0"
    return env


def _use_loopback_env() -> None:
    os.environ.update(loopback_env())
    # Ray reads the switch when ray._private.ray_constants is first imported; it may be already.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start a single-machine Ray in this process, every listener on 127.0.0.1, reaped on exit.

    ``address="local"`` starts a new cluster even where a ``ray start`` one is running on this
    machine (plain ``ray.init()`` would join that one, whatever it is bound to).
    """
    import psutil
    import ray

    _use_loopback_env()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=log_to_driver,
    )
    ray_roots = [p.pid for p in me.children() if p.pid not in before]
    start_reaper(os.getpid(), ray_roots)


def start_reaper(driver_pid: int, root_pids: list[int]) -> subprocess.Popen:
    """A process that, once ``driver_pid`` ends, ends ``root_pids`` and all their descendants.

    It runs in its own session so that a Ctrl-C meant for the driver does not stop it first.
    """
    cmd = [sys.executable, "-m", "gs_ray.local_ray", str(driver_pid), *map(str, root_pids)]
    env = dict(os.environ)  # gs_ray importable however the driver found it
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if x
    )
    return subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def reap(driver_pid: int, root_pids: list[int], poll_s: float = 0.25, rescan_s: float = 1.0):
    """Wait for the driver to end, then end the roots' process trees (SIGTERM, then SIGKILL).

    The trees are recorded while the driver lives: once the raylet is gone its children belong to
    init and can no longer be found from it. psutil.Process objects remember their start time,
    so a reused pid is never signalled.
    """
    import psutil

    try:
        driver = psutil.Process(driver_pid)
    except psutil.NoSuchProcess:
        driver = None
    tracked: dict[int, psutil.Process] = {}
    for pid in root_pids:
        with contextlib.suppress(psutil.Error):
            tracked[pid] = psutil.Process(pid)
    last_scan = -rescan_s
    while driver is not None and _alive(driver):
        if time.monotonic() - last_scan >= rescan_s:
            track_descendants(tracked)
            last_scan = time.monotonic()
        time.sleep(poll_s)
    time.sleep(REAPER_GRACE_S)
    terminate([p for p in tracked.values() if _alive(p)], REAPER_TERM_WAIT_S)


def track_descendants(tracked: dict) -> None:
    """Forget the tracked processes that ended and add every descendant of those alive, in
    place (pid -> psutil.Process), from one read of the process table. A process whose parent
    ended stays tracked: it is found through the tracked processes, not only the roots.

    One read per scan, not one per tracked process: a long job starts hundreds of Ray workers,
    and a recursive ``children()`` per tracked process each second cost the reaper most of a
    core (41 CPU-minutes in a two-hour ``gs-ray eval``)."""
    import psutil

    for pid, proc in list(tracked.items()):
        if not _alive(proc):
            del tracked[pid]
    children: dict[int, list] = {}
    for proc in psutil.process_iter(["ppid"]):
        children.setdefault(proc.info["ppid"], []).append(proc)
    stack = list(tracked)
    while stack:
        for child in children.get(stack.pop(), ()):
            if child.pid not in tracked:
                tracked[child.pid] = child
                stack.append(child.pid)


def terminate(procs: list, timeout: float) -> None:
    """SIGTERM these processes, wait up to ``timeout`` seconds, SIGKILL what is left."""
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # A process that exited but whose new parent does not reap it (PID 1 of many containers)
    # stays a zombie, which psutil.wait_procs waits on to the timeout: zombies count as gone.
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _descendants(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


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
        _use_loopback_env()  # this process connects as a driver too
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
        return self.env()

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
        return list({p.pid: p for r in roots for p in [r, *_descendants(r)]}.values())

    def stop(self, timeout: float = 3.0) -> None:
        """Terminate this cluster's processes and their children; kill what lingers after
        ``timeout`` seconds (the GCS, the raylet and the autoscaler's monitor take about 10 s
        to leave on SIGTERM; a throwaway cluster has nothing they need to save)."""
        for node in list(self.nodes):
            node.kill()
        terminate(self.processes(), timeout)

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
        env = self.env()
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
    launcher process of ours (``python -m gs_ray.local_ray node SPEC``) that stays the parent of
    the node's raylet and log monitor, in a session of its own. ``kill()`` SIGKILLs that group and
    every descendant of the raylet (workers, agents): the node is lost as a machine would be,
    with no clean-up. Every port of the node is a free port of its own.
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
            # Its own runtime-env folder: every node of this machine shares the head's session
            # folder, and a node asked for a working_dir whose package had left the GCS deleted
            # the head's unpacked copy, which the head still listed as installed: the next
            # `ray job submit` of that folder failed ("does not exist on the cluster").
            "runtime_env_dir_name": f"runtime_resources_node{self.node_manager_port}",
        }

    def start(self, timeout: float = 300.0) -> LocalNode:
        """Launch the node and wait until the head lists it (this process must be connected)."""
        import ray

        cmd = [sys.executable, "-m", "gs_ray.local_ray", "node", json.dumps(self.spec())]
        env = self.head.env()
        env["PYTHONPATH"] = os.pathsep.join(
            x for x in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if x
        )
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
                self.kill()
                raise RuntimeError(f"worker node did not join:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
            self.node_id = self._find_node_id(ray.nodes())
        return self

    def _find_node_id(self, nodes: list[dict]) -> str | None:
        for n in nodes:
            if n.get("Alive") and n.get("NodeManagerPort") == self.node_manager_port:
                return n["NodeID"]
        return None

    def processes(self) -> list:
        """The node's processes: the launcher and its descendants (raylet, workers, agents)."""
        import psutil

        if self.proc is None:
            return []
        try:
            root = psutil.Process(self.proc.pid)
        except psutil.Error:
            return []
        return [root, *_descendants(root)]

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
    import signal

    from ray._private.node import Node
    from ray._private.parameter import RayParams

    try:
        Node(RayParams(**spec), head=False, shutdown_at_exit=False, spawn_reaper=False)
    except Exception as err:
        # Ray waits a fixed 30 s for the raylet to register; on a loaded machine it may take
        # longer. Its processes run on: LocalNode.start decides, with its own timeout.
        print(f"node start: {err}; waiting for the raylet anyway", file=sys.stderr, flush=True)
    while True:
        signal.pause()


if __name__ == "__main__":
    if sys.argv[1] == "node":  # python -m gs_ray.local_ray node SPEC_JSON
        run_node(json.loads(sys.argv[2]))
    else:  # the reaper: python -m gs_ray.local_ray DRIVER_PID ROOT_PID...
        reap(int(sys.argv[1]), [int(a) for a in sys.argv[2:]])
