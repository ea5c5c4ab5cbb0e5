"""gs-ray's own Ray clusters listen on loopback only, gs-ray's own local Ray wants its token, and a
killed driver's cluster goes away.

Nothing may listen beyond 127.0.0.1 / ::1. Each check collects the listening TCP sockets of one
cluster's processes (found as the process tree of the driver that started it, or of ``ray start``)
from the kernel's table (psutil.net_connections), so that other Ray instances on the machine do not
count. Loopback still lets another user of the machine in: gs-ray's own local Ray (a run with no
cluster) therefore runs with token authentication, a fresh token per cluster in a private file;
the test clusters (``ray start --head``) run without it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gs_ray.local_ray import LOOPBACK, is_loopback

ROOT = Path(__file__).resolve().parents[1]
# The reaper gives Ray 1 s, then SIGTERM and 3 s before SIGKILL; Ray's agents alone took 60-90 s.
GONE_WITHIN_S = 30.0

DRIVER = """
import json, logging, os, sys, time
log_out = logging.StreamHandler(sys.stdout)
log_out.setFormatter(logging.Formatter("LOG %(message)s"))
logging.getLogger("gs_ray").addHandler(log_out)
logging.getLogger("gs_ray").setLevel(logging.INFO)
from gs_ray.ray_utils import init_ray
print(init_ray(*sys.argv[1:2], num_cpus=1), flush=True)
import ray

@ray.remote
def one():
    return 1

assert ray.get(one.remote()) == 1  # a worker process exists, listening too
cluster = {
    "gcs": ray.get_runtime_context().gcs_address,
    "auth_mode": os.environ.get("RAY_AUTH_MODE"),
    "token_path": os.environ.get("RAY_AUTH_TOKEN_PATH"),
}
print("CLUSTER", json.dumps(cluster), flush=True)
print("READY", flush=True)
time.sleep(600)
"""
# Ray's authentication settings, none of which a plain user shell has.
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def listening(pids: set[int]) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket owned by ``pids``."""
    found = []
    for c in psutil.net_connections(kind="tcp"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            try:
                name = psutil.Process(c.pid).name()
            except psutil.Error:
                name = "?"
            found.append((c.laddr.ip, c.laddr.port, name))
    return found


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def start_driver(
    *args: str, env: dict[str, str] | None = None, script: str = DRIVER, stdin=None
) -> subprocess.Popen:
    """A driver process running ``script`` (default DRIVER: init_ray, one task), ready when it
    prints READY; ``proc.cluster`` is what it printed of its cluster (GCS address, auth
    settings), ``proc.lines`` all it printed (gs_ray's log lines start with "LOG ")."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args],
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("CLUSTER "):
            proc.cluster = json.loads(line.split(" ", 1)[1])
        if line.strip() == "READY":
            proc.lines = lines
            return proc
    proc.wait()
    raise AssertionError(f"driver exited {proc.returncode}: {''.join(lines)}")


def stop_driver(proc: subprocess.Popen) -> None:
    """Kill a driver and wait for its cluster (its process tree) to end."""
    if proc.poll() is None:
        procs = tree(proc.pid)
        proc.kill()
        proc.wait()
        psutil.wait_procs(alive(procs), timeout=GONE_WITHIN_S)


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


def user_env(home: Path, **settings: str) -> dict[str, str]:
    """This environment as a user's shell that set none of Ray's auth settings but ``settings``,
    with HOME ``home`` (so that a token Ray wrote into ~/.ray would be seen)."""
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    return {**env, "HOME": str(home), **settings}


@pytest.fixture(scope="module")
def local_driver(tmp_path_factory):
    """A driver that started gs-ray's own local Ray (init_ray with no address), as `gs-ray run`
    does for a user who set no RAY_AUTH_MODE; a subprocess, so that it does not meet the shared
    test cluster (whose settings, RAY_AUTH_MODE=disabled, this test process has)."""
    home = tmp_path_factory.mktemp("home")
    proc = start_driver(env=user_env(home))
    proc.home = home
    time.sleep(2)  # agents finish binding their ports
    yield proc
    stop_driver(proc)


def grpc_call(port: int, call: str, token: str | None = None, credentials=None):
    """One gRPC call to a Ray server on 127.0.0.1:``port``, with the token or without any:
    ``call`` is "gcs" (the GCS's node table: what every client asks first), "raylet" (a node's
    stats) or "worker" (a core worker's pending tasks); ``credentials``: TLS channel credentials
    (None: plaintext). Returns (status code, reply)."""
    import grpc
    from ray.core.generated import (
        core_worker_pb2,
        core_worker_pb2_grpc,
        gcs_service_pb2,
        gcs_service_pb2_grpc,
        node_manager_pb2,
        node_manager_pb2_grpc,
    )

    metadata = [("authorization", f"Bearer {token}")] if token else None
    target = f"{LOOPBACK}:{port}"
    channel = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials)
    )
    with channel:
        if call == "gcs":
            stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
            method, request = stub.GetAllNodeInfo, gcs_service_pb2.GetAllNodeInfoRequest()
        elif call == "raylet":
            stub = node_manager_pb2_grpc.NodeManagerServiceStub(channel)
            method, request = stub.GetNodeStats, node_manager_pb2.GetNodeStatsRequest()
        else:
            stub = core_worker_pb2_grpc.CoreWorkerServiceStub(channel)
            method, request = stub.NumPendingTasks, core_worker_pb2.NumPendingTasksRequest()
        try:
            return grpc.StatusCode.OK, method(request, timeout=10, metadata=metadata)
        except grpc.RpcError as e:
            return e.code(), e.details()


@pytest.mark.own_ray
def test_own_local_ray_listens_on_loopback_only(local_driver):
    procs = tree(local_driver.pid)
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names, names  # the cluster really is this driver's
    socks = listening({p.pid for p in procs})
    listeners = {name for _, _, name in socks}
    # GCS, raylet (node and object manager), both agents, the worker and the driver all listen:
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= listeners
    assert listening({local_driver.pid}), "the driver's core worker listens"
    exposed = [s for s in socks if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


# Ray's own GCS client, as `ray.init(address=...)`, `ray status` and the state API start.
GCS_CLIENT = """
import sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"x", None, timeout=10)
    print("ANSWERED")
except Exception as e:
    print("REFUSED", type(e).__name__, e)
"""


@pytest.mark.own_ray
def test_own_local_ray_refuses_a_process_without_its_token(local_driver, tmp_path):
    """The GCS, the raylet and the driver's core worker answer only calls that carry the
    cluster's token (a tokenless or wrong-token one gets UNAUTHENTICATED), while the driver and
    its workers ran a task (DRIVER); Ray's own client in another process without the token
    is refused too."""
    import grpc

    cluster = local_driver.cluster
    assert cluster["auth_mode"] == "token", cluster
    token = Path(cluster["token_path"]).read_text()
    gcs_port = int(cluster["gcs"].rsplit(":", 1)[1])
    code, reply = grpc_call(gcs_port, "gcs", token)
    assert code == grpc.StatusCode.OK, reply  # the right token opens it
    (node,) = reply.node_info_list
    driver_ports = [port for _, port, _ in listening({local_driver.pid})]
    assert driver_ports, "the driver's core worker listens"
    servers = [(gcs_port, "gcs"), (node.node_manager_port, "raylet")]
    servers += [(port, "worker") for port in driver_ports]
    for port, call in servers:
        assert grpc_call(port, call, token)[0] == grpc.StatusCode.OK, call
        for wrong in (None, "0" * 64):
            code, details = grpc_call(port, call, wrong)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (call, wrong, code, details)
    for settings in ({}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}):
        out = subprocess.run(
            [sys.executable, "-c", GCS_CLIENT, cluster["gcs"]],
            env=user_env(tmp_path, **settings),
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert out.startswith("REFUSED AuthenticationError"), (settings, out)


@pytest.mark.own_ray
def test_own_local_ray_token_is_fresh_private_and_not_in_home(local_driver):
    """The token is 256 random bits in a 0600 file in a 0700 folder of the temp dir, only its
    path is in the environment, Ray wrote no ~/.ray/auth_token, and the log says that token
    authentication is on, without the token."""
    path = Path(local_driver.cluster["token_path"])
    assert path.name == "auth_token" and path.parent.name.startswith("gs-ray-auth-")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.stat().st_uid == os.getuid() == path.parent.stat().st_uid
    token = path.read_text()
    assert len(token) == 64 and set(token) <= set("0123456789abcdef")
    logs = [line for line in local_driver.lines if line.startswith("LOG ")]
    assert any("token authentication on" in line for line in logs), logs
    assert not any(token in line for line in local_driver.lines)
    assert not (local_driver.home / ".ray").exists()
    assert not path.is_relative_to(local_driver.home)
    for p in tree(local_driver.pid)[1:]:  # the driver's own environ is the one it started with
        if p.name() in {"gcs_server", "raylet"}:
            env = p.environ()
            assert env.get("RAY_AUTH_TOKEN_PATH") == str(path), p.name()
            assert "RAY_AUTH_TOKEN" not in env and token not in " ".join(p.cmdline())


@pytest.mark.own_ray
def test_own_local_ray_keeps_a_users_auth_mode(local_driver, tmp_path):
    """A user's RAY_AUTH_MODE=disabled is kept: no token is made and a tokenless call is
    answered, where the same driver without the setting (local_driver) refuses one."""
    import grpc

    own_gcs = int(local_driver.cluster["gcs"].rsplit(":", 1)[1])
    assert grpc_call(own_gcs, "gcs")[0] == grpc.StatusCode.UNAUTHENTICATED
    driver = start_driver(env=user_env(tmp_path, RAY_AUTH_MODE="disabled"))
    try:
        cluster = driver.cluster
        assert cluster["auth_mode"] == "disabled" and cluster["token_path"] is None, cluster
        assert not any("token authentication" in line for line in driver.lines)
        code, reply = grpc_call(int(cluster["gcs"].rsplit(":", 1)[1]), "gcs")
        assert code == grpc.StatusCode.OK, reply
        assert not (tmp_path / ".ray").exists()
    finally:
        stop_driver(driver)


@pytest.mark.own_ray
def test_own_local_ray_ends_soon_after_its_driver_is_killed(local_driver):
    """The cluster's processes and its token folder are gone soon after the driver."""
    procs = tree(local_driver.pid)[1:]
    ports = {(ip, port) for ip, port, _ in listening({p.pid for p in procs})}
    assert ports and len(procs) >= 6
    token_dir = Path(local_driver.cluster["token_path"]).parent
    assert token_dir.is_dir()
    start = time.monotonic()
    local_driver.send_signal(signal.SIGKILL)
    local_driver.wait()
    left = alive(procs)
    while left and time.monotonic() - start < GONE_WITHIN_S:
        time.sleep(0.5)
        left = alive(procs)
    took = time.monotonic() - start
    assert not left, f"alive {took:.0f}s after the driver: {[p.name() for p in left]}"
    assert not listening({p.pid for p in procs})
    while token_dir.exists() and time.monotonic() - start < GONE_WITHIN_S:
        time.sleep(0.5)  # the reaper removes it last
    assert not token_dir.exists(), "the token outlived its cluster"


def test_reaper_tracks_descendants_and_forgets_ended_processes():
    """track_descendants: children and grandchildren of a root are found, an orphan whose
    parent ended stays tracked, and ended processes are dropped (the table stays small)."""
    from gs_ray.local_ray import track_descendants

    # root (sh) -> middle (sh) -> leaf (sleep); killing the middle orphans the leaf
    root = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60 & wait' & sleep 60; true"])
    try:
        tracked = {root.pid: psutil.Process(root.pid)}
        deadline = time.monotonic() + 10
        while len(tracked) < 4 and time.monotonic() < deadline:  # root, middle, 2 sleeps
            track_descendants(tracked)
            time.sleep(0.1)
        names = sorted(p.name() for p in tracked.values())
        assert names == ["sh", "sh", "sleep", "sleep"], names
        middle = next(p for p in psutil.Process(root.pid).children() if p.name() == "sh")
        leaf = middle.children()[0]
        middle.kill()
        middle.wait(5)
        track_descendants(tracked)
        assert middle.pid not in tracked  # ended: forgotten
        assert leaf.pid in tracked and leaf.is_running()  # orphaned: still tracked
        leaf.kill()
        leaf.wait(5)
        track_descendants(tracked)
        assert leaf.pid not in tracked
    finally:
        for p in psutil.Process(root.pid).children(recursive=True):
            p.kill()
        root.kill()
        root.wait()


def test_shared_test_cluster_listens_on_loopback_only(ray_cluster):
    """LocalHead (`ray start --head`) and a driver joining it with init_ray(address)."""
    procs = ray_cluster.processes()
    names = {p.name() for p in procs}
    assert {"gcs_server", "raylet"} <= names, names
    socks = listening({p.pid for p in procs})
    assert len(socks) >= 6
    exposed = [s for s in socks if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"

    # A driver that joins it, as a job submitted to it does (with the cluster's environment).
    driver = start_driver(ray_cluster.address, env=ray_cluster.env())
    try:
        mine = listening({driver.pid})
        assert mine, "the driver's core worker listens"
        assert all(is_loopback(ip) for ip, _, _ in mine), mine
    finally:
        driver.kill()
        driver.wait()


def test_training_process_group_listens_on_loopback_only(ray_session, tmp_path):
    """A Ray Train run of two gloo ranks with gs-ray's torch config on the loopback cluster:
    the rendezvous store (rank 0) and gloo's sockets listen on loopback alone. torch's own
    store would listen on every interface (``::``) for the whole training."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    from gs_ray.training.process_group import LoopbackTorchConfig

    def _record_listeners(config: dict) -> None:  # nested: Ray pickles it by value
        """Once the group is up, write this rank's listening sockets to a file."""
        import json
        import os

        import psutil
        import torch
        import torch.distributed as dist

        t = torch.ones(1)
        dist.all_reduce(t)  # the group is up (and gloo's pairs are connected)
        socks = [
            (c.laddr.ip, c.laddr.port)
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid == os.getpid()
        ]
        out = {"socks": socks, "master_port": int(os.environ["MASTER_PORT"]), "sum": t.item()}
        Path(config["out"], f"rank{dist.get_rank()}.json").write_text(json.dumps(out))
        dist.barrier()  # each rank records while the other is still in the group

    trainer = TorchTrainer(
        _record_listeners,
        train_loop_config={"out": str(tmp_path)},
        torch_config=LoopbackTorchConfig(),
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        run_config=ray.train.RunConfig(name="loopback", storage_path=str(tmp_path / "storage")),
    )
    trainer.fit()
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["sum"] for r in ranks] == [2.0, 2.0]
    socks = [tuple(s) for r in ranks for s in r["socks"]]
    assert ("127.0.0.1", ranks[0]["master_port"]) in socks  # the store, on loopback
    exposed = [s for s in socks if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_free_port_never_hands_out_a_port_twice():
    from gs_ray.local_ray import free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)


def test_a_killed_node_killed_again_touches_no_process_that_took_its_pid():
    """LocalNode.kill is idempotent: after the first kill its launcher is reaped and its pid is
    free (pid_max is 32,768 here: the suite's thousands of processes wrap it), so a second
    kill must not signal the process that now has that pid, nor its children."""
    from gs_ray.local_cluster import LocalNode

    node = LocalNode.__new__(LocalNode)  # no cluster: only its launcher handle matters here
    node.head = type("Head", (), {"nodes": []})()
    node.proc = subprocess.Popen([sys.executable, "-c", "pass"])
    node.proc.wait()  # reaped, as after a kill
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        node.proc.pid = bystander.pid  # the pid taken by another process
        assert node.processes() == []
        node.kill()
        assert bystander.poll() is None  # untouched
    finally:
        bystander.kill()
        bystander.wait()


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("127.5.0.1") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "::ffff:192.0.2.2"]))


def _node_id_of_a_task_on(node, **options) -> str:
    """Run a one-CPU task pinned to ``node`` (with these task options) and return its node id."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=1)
    def where():
        return ray.get_runtime_context().get_node_id()

    on_node = NodeAffinitySchedulingStrategy(node.node_id, soft=False)
    return ray.get(where.options(scheduling_strategy=on_node, **options).remote(), timeout=120)


def _submit_and_wait(client, work: Path) -> str:
    """A job that reads a file of the ``work`` folder (its working_dir); its package URI."""
    from ray.job_submission import JobStatus

    job = client.submit_job(
        entrypoint="python -c \"print(open('hello.txt').read())\"",
        runtime_env={"working_dir": str(work)},
    )
    deadline = time.monotonic() + 180
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)
        time.sleep(0.5)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, client.get_job_info(job).message
    return client.get_job_info(job).runtime_env["working_dir"]


def test_added_worker_node_listens_on_loopback_only_leaves_the_heads_working_dirs_and_dies_whole(
    ray_session, monkeypatch, tmp_path
):
    """LocalHead.add_node(): a second raylet on 127.0.0.1 (its own launcher, not `ray start`).

    Its launches: the first is given one port twice, as a port taken between its choice and the
    launch would be: the launcher ends at once. The second's raylet ends before the node joins,
    as Ray's raylet aborts when its dashboard agent misses a fixed 15 s at start-up on a loaded
    machine: the launcher ends at once too, leaving none of that node's processes. A later one
    starts (``start`` tries five times: on a machine as loaded as the suite's first minutes a
    raylet can also end so on its own). (Both used to wait out the 300 s timeout and fail: the
    second is what failed the suite's TLS cluster.)

    The node listens on loopback only; it sets up runtime envs in a folder of its own (it used
    to share the head's: asked for a working_dir whose package the GCS no longer held, as Ray
    drops it when the job that uploaded it ends, the node's agent deleted the head's unpacked
    copy, and the next `ray job submit` of the same folder failed on the head); kill() leaves
    none of its processes. One node for all of these: each start costs a loaded machine more
    than the checks."""
    import threading

    from ray.exceptions import RuntimeEnvSetupError
    from ray.experimental.internal_kv import _internal_kv_del
    from ray.job_submission import JobSubmissionClient

    from gs_ray.local_cluster import RAYLET_ENDED, LocalNode

    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello")
    client = JobSubmissionClient(ray_session.dashboard_url)
    uri = _submit_and_wait(client, work)
    unpacked = next(
        Path(ray_session.temp_dir).glob(
            f"session_2*/runtime_resources/working_dir_files/{uri.split('//')[1][:-4]}"
        )
    )
    _internal_kv_del(uri)  # the package has left the GCS, as after its job ended

    spec, start, find = LocalNode.spec, LocalNode._start, LocalNode._find_node_id
    first, second = [], {}

    def one_port_twice(self):
        out = spec(self)
        if not first:
            first.append(out["node_manager_port"])
            out["dashboard_agent_listen_port"] = out["node_manager_port"]
        return out

    def end_the_raylet(node, before):
        """Kill the second launch's raylet once it has started its agents; note its node's
        processes."""
        while "launcher" not in second:
            with contextlib.suppress(psutil.Error, StopIteration):
                if node.proc is before or node.proc.poll() is not None:
                    raise StopIteration  # not launched yet
                launcher = psutil.Process(node.proc.pid)
                raylet = next(p for p in launcher.children() if p.name() == "raylet")
                if raylet.children():
                    second["procs"] = [launcher, *launcher.children(recursive=True)]
                    second["launcher"] = node.proc
                    raylet.kill()
                    return
            time.sleep(0.05)

    def launch(self, timeout):
        if first and "launcher" not in second:  # the second launch
            args = (self, self.proc)
            killer = threading.Thread(target=end_the_raylet, args=args, daemon=True)
            killer.start()
        return start(self, timeout)

    def not_before_the_kill(self, nodes):  # the second launch must not join before its kill
        return find(self, nodes) if "launcher" in second or not first else None

    monkeypatch.setattr(LocalNode, "spec", one_port_twice)
    monkeypatch.setattr(LocalNode, "_start", launch)
    monkeypatch.setattr(LocalNode, "_find_node_id", not_before_the_kill)
    started = time.monotonic()
    node = ray_session.add_node(num_cpus=1)
    try:
        assert time.monotonic() - started < 200  # not a 300 s timeout
        assert first and node.node_manager_port != first[0]
        assert second["launcher"].returncode == RAYLET_ENDED
        assert len(second["procs"]) >= 3  # the launcher, the raylet, an agent at least
        assert not alive(second["procs"]), "the failed launch left processes"
        assert node.proc is not second["launcher"]
        assert _node_id_of_a_task_on(node) == node.node_id
        procs = node.processes()
        assert "raylet" in {p.name() for p in procs}
        socks = listening({p.pid for p in procs})
        assert len(socks) >= 3
        exposed = [s for s in socks if not is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"
        with pytest.raises(RuntimeEnvSetupError):  # the node cannot fetch it: that is right
            _node_id_of_a_task_on(node, runtime_env={"working_dir": uri})
    finally:
        node.kill()
    assert not alive(procs)
    assert unpacked.is_dir(), "the worker node deleted the head's copy of the working_dir"
    assert _submit_and_wait(client, work) == uri  # the head still serves that folder


# A head and a worker node with cluster.yaml's settings: token authentication and mutual TLS with
# certificates made by gs_ray.cluster_tls (here for 127.0.0.1), the worker joining over TLS.
TLS_DRIVER = """
import json, os, sys
from gs_ray import cluster_tls
os.environ.update(cluster_tls.ray_env(sys.argv[1]))
os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=sys.argv[2])
from gs_ray.local_cluster import LocalHead
head = LocalHead(num_cpus=1, dashboard=False).start()
try:
    import ray
    ray.init(address=head.address, log_to_driver=False)
    node = head.add_node(num_cpus=1, resources={"far": 1})

    @ray.remote(resources={"far": 1})
    def where():
        return ray.get_runtime_context().get_node_id()

    cluster = {"gcs": head.port, "raylet": node.node_manager_port, "node": node.node_id,
               "ran_on": ray.get(where.remote(), timeout=120)}

    import psutil
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Replica:
        def pid(self):
            return os.getpid()

    pid = serve.run(Replica.bind(), name="tls", route_prefix=None).pid.remote().result()
    cluster["replica"] = sorted({c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                                 if c.status == psutil.CONN_LISTEN})
    print("CLUSTER", json.dumps(cluster), flush=True)
    print("READY", flush=True)
    sys.stdin.read()  # until the test is done
    serve.shutdown()
    ray.shutdown()
finally:
    head.stop()
"""


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory):
    from gs_ray import cluster_tls

    tmp = tmp_path_factory.mktemp("tls")
    certs, other = tmp / "node", tmp / "other"
    for d in (certs, other):  # the cluster's CA and node certificate; a stranger's
        cluster_tls.make_ca(d)
        cluster_tls.make_node_cert(d, ["127.0.0.1"])
    token = tmp / "auth_token"
    token.write_text("ab" * 32)
    token.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k not in AUTH_ENV}
    proc = start_driver(str(certs), str(token), env=env, script=TLS_DRIVER, stdin=subprocess.PIPE)
    proc.certs, proc.other, proc.token = certs, other, token.read_text()
    yield proc
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        stop_driver(proc)


def _tls(certs: Path, ca: Path | None = None, client: bool = True):
    """Channel credentials: trust ``ca``'s CA (default the one in ``certs``) and, with
    ``client``, present ``certs``' node certificate."""
    import grpc

    ca_pem = ((ca or certs) / "ca.crt").read_bytes()
    if not client:
        return grpc.ssl_channel_credentials(ca_pem)
    return grpc.ssl_channel_credentials(
        ca_pem, (certs / "node.key").read_bytes(), (certs / "node.crt").read_bytes()
    )


@pytest.mark.own_ray
def test_cluster_tls_head_and_worker_accept_only_this_clusters_certificates(tls_cluster):
    """cluster.yaml's settings on a head and a worker node (here on loopback): the worker joined
    and ran a task over mutual TLS; the GCS and the worker's raylet answer a client with a node
    certificate of this cluster and the token, and refuse a plaintext client, a client that
    presents no certificate or one of another CA (even with the token), and a client with the
    right certificate and no token. A Ray Serve replica's servers, its inter-deployment one on
    every interface included, refuse every client but the cluster's too."""
    import grpc

    c = tls_cluster.cluster
    assert c["ran_on"] == c["node"]  # the worker node joined and ran a task over TLS
    certs, other, token = tls_cluster.certs, tls_cluster.other, tls_cluster.token
    refused = grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails: no call is made
    for port, call in ((c["gcs"], "gcs"), (c["raylet"], "raylet")):
        assert grpc_call(port, call, token, _tls(certs))[0] == grpc.StatusCode.OK, call
        assert grpc_call(port, call, token)[0] == refused, call
        assert grpc_call(port, call, token, _tls(certs, client=False))[0] == refused, call
        assert grpc_call(port, call, token, _tls(other, ca=certs))[0] == refused, call
        code, _ = grpc_call(port, call, None, _tls(certs))
        assert code == grpc.StatusCode.UNAUTHENTICATED, call
    # A Serve replica's servers (Ray 2.60: its inter-deployment gRPC server on [::]): a TLS
    # client of the cluster reaches the server (an unknown method: UNIMPLEMENTED); others do not.
    assert c["replica"], "the replica listens"
    for port in c["replica"]:
        assert grpc_call(port, "worker", token)[0] == refused, port
        assert grpc_call(port, "worker", token, _tls(other, ca=certs))[0] == refused, port
        assert grpc_call(port, "worker", token, _tls(certs))[0] != refused, port
