"""gs-ray's own single-machine Ray clusters: bound to loopback, and not outliving their driver.

Two kinds: ``start_local_ray`` is what a job run with no cluster does (``ray.init`` in the driver's
process); ``local_cluster.LocalHead`` is a ``ray start --head`` that tests and benchmarks share and
that ``ray job submit`` can reach (with its worker nodes and the autoscaling cluster, in
``gs_ray/local_cluster.py``; this module holds what both kinds need). Every process of both kinds
(GCS, raylet, object manager, dashboard and its agent, runtime-env agent, metrics exporters,
workers, drivers) listens on 127.0.0.1 alone, which keeps other machines out but not other users of
this one. So ``start_local_ray`` turns on Ray's token authentication unless the user set
RAY_AUTH_MODE (theirs wins, ``disabled`` included); the test clusters run with it off
(``RAY_AUTH_MODE=disabled`` unless the user set it). Joining someone else's cluster is
``ray_utils.init_ray``'s other branch and keeps whatever authentication the user configured.

How Ray 2.60 does token authentication: ``RAY_AUTH_MODE=token`` in a process's environment turns
it on (read into Ray's config, also by the C++ GCS and raylet); each process then finds the token in
``RAY_AUTH_TOKEN`` (the token itself), else the file named by ``RAY_AUTH_TOKEN_PATH``, else
``~/.ray/auth_token``. Every gRPC server (GCS, raylet, core workers of drivers and workers, the
agents) refuses a call without the token (UNAUTHENTICATED), and so do the HTTP servers of the
dashboard and the agents (401); the metrics exporters stay open (read-only). A ``ray.init()`` that
starts a cluster with the mode unset turns it on itself and writes a token to
``~/.ray/auth_token`` if none is found (mode 0644, seen on this machine), which a later
``ray start`` or ``ray job submit`` then needs. ``start_local_ray`` writes a fresh 256-bit token to
a file of its own instead (``auth_token``, 0600, in a new 0700 folder ``gs-ray-auth-*`` of the temp
dir) and sets ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` in this process's environment
(removing ``RAY_AUTH_TOKEN``, which would win) before ``ray.init``: every process of the cluster
inherits the path, never the token, and ``~/.ray`` is not touched. The reaper removes the folder
once the cluster has ended.

Why an environment variable is needed for loopback: Ray 2.60 replaces a node IP of 127.0.0.1 by
the machine's external address (``services.resolve_ip_for_localhost``) unless it runs as a
single-machine cluster, its mode on macOS and Windows, switched on Linux with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``. With the node IP really 127.0.0.1, Ray's gRPC servers and
metrics exporters bind to loopback instead of 0.0.0.0 / ``::``.

Why a reaper: when the driver of a ``ray.init`` cluster is killed, the kernel ends the processes the
driver started (GCS, raylet, dashboard, monitor), but the raylet's children, the dashboard agent
and the runtime-env agent, first try for 60 s to report the raylet's death to the dead GCS
(a fixed timeout in Ray) and keep their ports open meanwhile. A small process started with the
cluster waits for the driver to end and then ends what is left of it, then removes its token.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
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
# Ray 2.60's token authentication: the mode, and where every process finds the token (see module
# docstring). RAY_AUTH_TOKEN (the token itself) wins over RAY_AUTH_TOKEN_PATH if both are set.
AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_DIR_PREFIX = "gs-ray-auth-"
# Whether RAY_AUTH_MODE in this process's environment was set by use_token_auth, not the user: a
# second start_local_ray in the same process (after ray.shutdown) then makes a fresh token too.
_AUTH_ENV_IS_OURS = False


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


_HANDED_OUT: set[int] = set()  # every port free_port has returned in this process


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1, never one this process was given before: the
    kernel may hand a port just released to the next ``bind(0)``, and a Ray node given two
    equal ports refuses to start (a worker node's raylet and its agent got the same one)."""
    for _ in range(1000):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free TCP port on 127.0.0.1 that this process was not given before")


def loopback_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a gs-ray-owned loopback cluster (a copy of ``env``, default os.environ).

    Token authentication is off unless RAY_AUTH_MODE is set (by the user, or by
    ``start_local_ray``, which turns it on first): Ray 2.60 would otherwise write
    ~/.ray/auth_token on a local start and ``ray job submit`` would then need it. The test
    clusters (``local_cluster``) keep it off, every listener on 127.0.0.1.
    """
    env = dict(os.environ if env is None else env)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env[SINGLE_MACHINE_ENV] = "0"
    return env


def use_loopback_env() -> None:
    os.environ.update(loopback_env())
    # Ray reads the switch when ray._private.ray_constants is first imported; it may be already.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None, log_to_driver: bool = True) -> None:
    """Start a single-machine Ray in this process, every listener on 127.0.0.1, reaped on exit,
    with token authentication on (a fresh token of its own) unless the user set RAY_AUTH_MODE.

    ``address="local"`` starts a new cluster even where a ``ray start`` one is running on this
    machine (plain ``ray.init()`` would join that one, whatever it is bound to).
    """
    import psutil
    import ray

    token_dir = None
    if _AUTH_ENV_IS_OURS or AUTH_MODE_ENV not in os.environ:  # the user's, even "disabled", wins
        token_dir = new_token_dir()
        use_token_auth(token_dir / "auth_token")
        log.info("local Ray: token authentication on (a fresh token, readable by this user only)")
    use_loopback_env()
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    try:
        ray.init(
            address="local",
            _node_ip_address=LOOPBACK,
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=log_to_driver,
        )
    finally:
        ray_roots = [p.pid for p in me.children() if p.pid not in before]
        start_reaper(os.getpid(), ray_roots, token_dir)


def new_token_dir() -> Path:
    """A new private folder (0700) in the temp dir holding ``auth_token`` (0600): a fresh random
    token of 256 bits, as Ray's own ``ray get-auth-token --generate`` makes."""
    folder = Path(tempfile.mkdtemp(prefix=TOKEN_DIR_PREFIX))  # mkdtemp: mode 0700
    fd = os.open(folder / "auth_token", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return folder


def use_token_auth(token_path: Path) -> None:
    """Token authentication with the token in ``token_path``, for this process and every process
    it starts (they inherit the environment: the token's path, not the token, travels)."""
    global _AUTH_ENV_IS_OURS
    _AUTH_ENV_IS_OURS = True
    os.environ[AUTH_MODE_ENV] = "token"
    os.environ[AUTH_TOKEN_PATH_ENV] = str(token_path)
    os.environ.pop(AUTH_TOKEN_ENV, None)  # it would win over the path
    # Ray caches its config (the mode) and the token it loaded in this process: reread both.
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def with_gs_ray_importable(env: dict[str, str]) -> dict[str, str]:
    """``env`` (changed in place and returned) with this gs_ray package first on PYTHONPATH, so
    that a ``python -m gs_ray...`` child imports it however the parent found it."""
    env["PYTHONPATH"] = os.pathsep.join(
        x for x in (str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")) if x
    )
    return env


def start_reaper(
    driver_pid: int, root_pids: list[int], token_dir: Path | None = None
) -> subprocess.Popen:
    """A process that, once ``driver_pid`` ends, ends ``root_pids`` and all their descendants,
    then removes ``token_dir`` (the cluster's token) if given.

    It runs in its own session so that a Ctrl-C meant for the driver does not stop it first.
    """
    cmd = [sys.executable, "-m", "gs_ray.local_ray", str(driver_pid), *map(str, root_pids)]
    if token_dir is not None:
        cmd += ["--remove", str(token_dir)]
    return subprocess.Popen(
        cmd,
        env=with_gs_ray_importable(dict(os.environ)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def reap(
    driver_pid: int,
    root_pids: list[int],
    poll_s: float = 0.25,
    rescan_s: float = 1.0,
    remove: str | None = None,
):
    """Wait for the driver to end, then end the roots' process trees (SIGTERM, then SIGKILL),
    then remove the folder ``remove`` (the cluster's token) if given.

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
    while driver is not None and alive(driver):
        if time.monotonic() - last_scan >= rescan_s:
            track_descendants(tracked)
            last_scan = time.monotonic()
        time.sleep(poll_s)
    time.sleep(REAPER_GRACE_S)
    terminate([p for p in tracked.values() if alive(p)], REAPER_TERM_WAIT_S)
    if remove is not None:
        shutil.rmtree(remove, ignore_errors=True)


def track_descendants(tracked: dict) -> None:
    """Forget the tracked processes that ended and add every descendant of those alive, in
    place (pid -> psutil.Process), from one read of the process table. A process whose parent
    ended stays tracked: it is found through the tracked processes, not only the roots.

    One read per scan, not one per tracked process: a long job starts hundreds of Ray workers,
    and a recursive ``children()`` per tracked process each second cost the reaper most of a
    core (41 CPU-minutes in a two-hour ``gs-ray eval``)."""
    import psutil

    for pid, proc in list(tracked.items()):
        if not alive(proc):
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
    left = [p for p in procs if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def descendants(proc):
    import psutil

    try:
        return proc.children(recursive=True)
    except psutil.Error:
        return []


if __name__ == "__main__":  # the reaper: python -m gs_ray.local_ray DRIVER ROOT... [--remove DIR]
    args = sys.argv[1:]
    remove = None
    if "--remove" in args:
        remove = args[args.index("--remove") + 1]
        args = args[: args.index("--remove")]
    reap(int(args[0]), [int(a) for a in args[1:]], remove=remove)
