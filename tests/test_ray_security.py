"""gs-ray's own Ray clusters listen on loopback only, and a killed driver's cluster goes away.

The clusters run with token authentication off, which is safe only if nothing listens beyond
127.0.0.1 / ::1. Each check collects the listening TCP sockets of one cluster's processes (found as
the process tree of the driver that started it, or of ``ray start``) from the kernel's table
(psutil.net_connections), so that other Ray instances on the machine do not count.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gs_ray.local_ray import is_loopback

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[1]
# The reaper gives Ray 1 s, then SIGTERM and 3 s before SIGKILL; Ray's agents alone took 60-90 s.
GONE_WITHIN_S = 30.0

DRIVER = """
import sys, time
from gs_ray.ray_utils import init_ray
print(init_ray(*sys.argv[1:2], num_cpus=1), flush=True)
import ray

@ray.remote
def one():
    return 1

assert ray.get(one.remote()) == 1  # a worker process exists, listening too
print("READY", flush=True)
time.sleep(600)
"""


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


def start_driver(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A driver process running DRIVER (init_ray, one task), ready when it prints READY."""
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(ROOT), env.get("PYTHONPATH")) if x)
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, *args], env=env, stdout=subprocess.PIPE, text=True
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.strip() == "READY":
            return proc
    proc.wait()
    raise AssertionError(f"driver exited {proc.returncode}: {''.join(lines)}")


def alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.fixture(scope="module")
def local_driver():
    """A driver that started gs-ray's own local Ray (init_ray with no address), as `gs-ray run`
    does; a subprocess, so that it does not meet the shared test cluster."""
    proc = start_driver()
    time.sleep(2)  # agents finish binding their ports
    yield proc
    if proc.poll() is None:
        procs = tree(proc.pid)
        proc.kill()
        proc.wait()
        psutil.wait_procs(alive(procs), timeout=GONE_WITHIN_S)


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


def test_own_local_ray_ends_soon_after_its_driver_is_killed(local_driver):
    procs = tree(local_driver.pid)[1:]
    ports = {(ip, port) for ip, port, _ in listening({p.pid for p in procs})}
    assert ports and len(procs) >= 6
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


def test_added_worker_node_listens_on_loopback_only_and_dies_whole(ray_session):
    """LocalHead.add_node(): a second raylet on 127.0.0.1 (its own launcher, not `ray start`);
    kill() leaves none of its processes."""
    node = ray_session.add_node(num_cpus=1)
    try:
        assert _node_id_of_a_task_on(node) == node.node_id
        procs = node.processes()
        assert "raylet" in {p.name() for p in procs}
        socks = listening({p.pid for p in procs})
        assert len(socks) >= 3
        exposed = [s for s in socks if not is_loopback(s[0])]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        node.kill()
    assert not alive(procs)


def test_added_worker_node_leaves_the_heads_working_dirs_alone(ray_session, tmp_path):
    """A worker node on this machine sets up runtime envs in a folder of its own. It used to
    share the head's: asked for a working_dir whose package the GCS no longer held (Ray drops it
    when the job that uploaded it ends), the node's agent deleted the head's unpacked copy, and
    the next `ray job submit` of the same folder failed on the head."""
    from ray.exceptions import RuntimeEnvSetupError
    from ray.experimental.internal_kv import _internal_kv_del
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path / "work"
    work.mkdir()
    (work / "hello.txt").write_text("hello")
    client = JobSubmissionClient(ray_session.dashboard_url)

    def submit() -> str:
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

    uri = submit()
    unpacked = next(
        Path(ray_session.temp_dir).glob(
            f"session_2*/runtime_resources/working_dir_files/{uri.split('//')[1][:-4]}"
        )
    )
    _internal_kv_del(uri)  # the package has left the GCS, as after its job ended

    node = ray_session.add_node(num_cpus=1)
    try:
        with pytest.raises(RuntimeEnvSetupError):  # the node cannot fetch it: that is right
            _node_id_of_a_task_on(node, runtime_env={"working_dir": uri})
    finally:
        node.kill()
    assert unpacked.is_dir(), "the worker node deleted the head's copy of the working_dir"
    assert submit() == uri  # the head still serves that folder
