"""Stage II on local multi-node Rays: a whole worker node is lost mid-pass and the job still
finishes with the assignments of an undisturbed run; an autoscaler adds the GPU-like nodes Stage
II asks for and removes them once idle.

The worker node is a second raylet on 127.0.0.1 joined to the test run's shared head
(``LocalHead.add_node``), labelled so that the gradient workers prefer it (a soft preference:
``stage2.prefer_node_label``). A planned ``stall`` fault holds one worker mid-pass; the test then
SIGKILLs every process of that node at once.

The autoscaling cluster is a head of its own (``LocalAutoscalingCluster``) with Ray's fake
multi-node provider and the node types of cluster.yaml (``cluster_config.render_fake``); its
driver is a subprocess, as ``ray job submit`` runs it. That test starts and ends its own cluster and
never connects this process (``own_ray``): it runs in the suite's third worker, beside the shared
heads, with its own copy of the warmed run."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from gs_ray.config import load_config
from gs_ray.stage2 import (
    CentroidHost,
    GradientComputer,
    Stage2Plan,
    make_clusterer,
    run_stage2_local,
    run_stage2_ray,
)
from gs_ray.training.warmup import warmup_local
from tests.test_stage2 import small_config

B = 6  # rows per worker per step (collective): |B_t| = 2 * B
LABEL = "gs-ray/stage2=preferred"
WORKERS, HOSTS = {"GradientWorker", "CollectiveWorker"}, {"CentroidHost", "CollectiveHost"}
STALL = ("online", 0, 5)  # a worker hangs on online batch 5: checkpoints exist after 1 and 3


@pytest.fixture(scope="module")
def warmed(tmp_path_factory):
    """A warmed-up small run and its single-process reference (batch size 2 * B): the labels
    an undisturbed run gives (tests/test_stage2*.py check that equality for every transport)."""
    return _warmed(tmp_path_factory)


@pytest.fixture(scope="module")
def warmed_apart(tmp_path_factory):
    """``warmed`` built again (a few seconds) for the autoscaler's test, which runs in the
    third worker (``own_ray``): a fixture shared with a Ray lane's tests would pull it there."""
    return _warmed(tmp_path_factory)


def _warmed(tmp_path_factory) -> dict:
    from gs_ray.prepare import prepare
    from gs_ray.training.pretrain import base_model_for

    tmp = tmp_path_factory.mktemp("cluster")
    small = {"clustering.batch_size": 2 * B, "data.demo_size": 200, "warmup.epochs": 1}
    cfg, path = small_config(tmp, "ref", **small)
    p = prepare(cfg, base_model=base_model_for)
    warmup_local(p)
    plan = Stage2Plan.build(p.lengths, p.splits, cfg)
    computer = GradientComputer(p.base_path, cfg, p.run.warmup_adapter, p.pad_id)
    ref = run_stage2_local(
        plan, p.samples, computer, CentroidHost(make_clusterer(cfg), len(p.samples))
    )
    return {"p": p, "path": path, "ref": ref}


def test_worker_placement_follows_the_config():
    from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy

    from gs_ray.config import Config, apply_overrides
    from gs_ray.stage2.launch import worker_placement

    assert worker_placement(Config()) == {}
    overrides = ["--stage2.worker_resource", "fake_gpu", "--stage2.prefer_node_label", LABEL]
    out = worker_placement(apply_overrides(Config(), overrides))
    assert out["resources"] == {"fake_gpu": 1}
    strategy = out["scheduling_strategy"]
    assert isinstance(strategy, NodeLabelSchedulingStrategy)
    assert not strategy.hard and strategy.soft  # soft: a restarted worker may go elsewhere


def test_cuda_workers_ask_for_gpus_before_any_gpu_node_is_up(monkeypatch):
    """On an autoscaling cluster with no GPU node yet, model.device cuda still plans GPU workers
    (they wait, the autoscaler adds nodes); auto falls back to CPU workers."""
    import ray

    from gs_ray.config import Config, apply_overrides
    from gs_ray.stage2.launch import resolve_num_workers

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0})
    cuda = apply_overrides(Config(), ["--model.device", "cuda", "--stage2.num_workers", "4"])
    assert resolve_num_workers(cuda) == (4, {"num_gpus": 1, "num_cpus": 1})
    assert resolve_num_workers(apply_overrides(Config(), ["--model.device", "cuda"]))[0] == 1
    assert resolve_num_workers(Config()) == (8, {"num_cpus": 1})
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    assert resolve_num_workers(Config()) == (2, {"num_gpus": 1, "num_cpus": 1})


def _kill_node_when_stalled(node, marker, seen: dict, stop: threading.Event):
    """Wait for the stalled worker's marker, note where the gradient workers run, kill the node.
    A gradient worker that ran elsewhere is killed too: the stalled one would hang the pass for
    ever, and the test fails on ``seen`` instead."""
    from ray.util.state import list_actors

    while not marker.exists():
        if stop.wait(0.2):  # the run ended (failed) before the stall
            return
    alive = list_actors(
        address=node.head.dashboard_url,
        filters=[("state", "=", "ALIVE")],
        raise_on_missing_output=False,
    )
    seen["workers"] = [a.node_id for a in alive if a.class_name in WORKERS]
    seen["hosts"] = [a.node_id for a in alive if a.class_name in HOSTS]
    node.kill()
    for a in alive:
        if a.class_name in WORKERS and a.node_id != node.node_id and a.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(a.pid, signal.SIGKILL)


def _until_preferred(node, cfg, n: int, timeout: float = 60.0) -> None:
    """Wait until ``n`` tasks placed as the gradient workers are (``worker_placement``: the soft
    label preference) all land on ``node``: a node the GCS lists may not be in the head
    raylet's view yet, and the soft preference then places workers on the head (one stalled
    there and the pass hung)."""
    import ray

    from gs_ray.stage2.launch import worker_placement

    @ray.remote(num_cpus=1)
    def where(wait_s: float) -> str:
        time.sleep(wait_s)  # held together, as n workers are
        return ray.get_runtime_context().get_node_id()

    probe = where.options(**worker_placement(cfg))
    deadline = time.monotonic() + timeout
    while True:
        got = ray.get([probe.remote(0.5) for _ in range(n)], timeout=timeout)
        if all(x == node.node_id for x in got):
            # ... and until the probes' CPUs on the node are free again in the GCS's view, and a
            # resource report later in the head raylet's too: a node whose CPUs still look taken
            # gets no preferred worker (the preference is soft; the head takes it). The node's
            # own CPUs, not the cluster's: a node an earlier test killed may still count in the
            # cluster's total until its death is noticed.
            from ray._private.state import available_resources_per_node

            def free() -> float:
                return available_resources_per_node().get(node.node_id, {}).get("CPU", 0.0)

            while free() < node.num_cpus:
                assert time.monotonic() < deadline, "the probes' CPUs were never released"
                time.sleep(0.2)
            time.sleep(1.0)
            return
        assert time.monotonic() < deadline, f"the preferred node never got the workers: {got}"
        time.sleep(0.5)


@pytest.mark.ray
@pytest.mark.slow
def test_lost_worker_node_resumes_with_the_same_assignments(
    ray_session, warmed, tmp_path, monkeypatch
):
    """The collective transport, whose group restarts from the checkpoint. The gradients
    transport takes the path of test_stage2.py's killed worker on a lost node too: Ray restarts
    each lost actor where there is room and its tasks are retried (a test of its own here cost
    the suite 40 CPU-seconds, 2026-12-06, and checked nothing that test does not)."""
    p = warmed["p"]
    node = ray_session.add_node(num_cpus=2, labels=dict([LABEL.split("=")]))
    monkeypatch.setenv("GS_RAY_FAULTS", "stall:{}:{}:{}".format(*STALL))
    marker = tmp_path / "faults" / "fault-stall-{}-{}-{}".format(*STALL)
    seen: dict = {}
    stop = threading.Event()
    killer = threading.Thread(target=_kill_node_when_stalled, args=(node, marker, seen, stop))
    killer.start()
    try:
        args = {
            "stage2.transport": "collective",
            "stage2.num_workers": 2,
            "stage2.cpus_per_worker": 1,
            "stage2.prefer_node_label": LABEL,
        }
        cfg = load_config(warmed["path"], [f"--{k}={v}" for k, v in args.items()])
        _until_preferred(node, cfg, n=2)
        plan = Stage2Plan.build(p.lengths, p.splits, cfg)
        out = run_stage2_ray(
            plan,
            p.samples,
            cfg,
            p.base_path,
            str(p.run.warmup_adapter),
            p.pad_id,
            tmp_path / "checkpoint",
        )
    finally:
        stop.set()
        killer.join(timeout=60)
        node.kill()
    # both gradient workers ran on the lost node, the centroid actor on the head
    assert seen["workers"] == [node.node_id] * 2, seen
    assert seen["hosts"] and node.node_id not in seen["hosts"]
    ref = warmed["ref"]
    np.testing.assert_array_equal(out.labels, ref.labels)
    np.testing.assert_allclose(
        out.clusterer.cluster_centers_, ref.clusterer.cluster_centers_, rtol=0, atol=1e-6
    )
    assert out.clusterer.n_samples_seen_ == ref.clusterer.n_samples_seen_
    # the group restarted from the checkpoint after batch 3
    assert out.info["group_restarts"] == 1
    assert out.info["restarted_from"] == [["online", 0, 3]]
    assert out.info["recomputed_batches"] > 0


def _watch_nodes(cluster, seen: list, exposed: list, stop: threading.Event) -> None:
    """Record the alive nodes (id, total resources) every half second, and any socket of the
    cluster's processes (the fake nodes included) listening beyond loopback."""
    from gs_ray.local_ray import is_loopback
    from tests.test_ray_security import listening

    while not stop.wait(0.5):
        try:
            nodes = cluster.alive_nodes()
        except Exception:  # the dashboard is busy or starting: try again
            continue
        seen.append({n.node_id: dict(n.resources_total) for n in nodes})
        if len(nodes) > 1:
            socks = listening({p.pid for p in cluster.processes()})
            exposed.extend(x for x in socks if not is_loopback(x[0]))


@pytest.mark.own_ray
@pytest.mark.slow
def test_autoscaler_adds_gpu_nodes_for_stage2_and_experts_and_removes_them_when_idle(
    warmed_apart, tmp_path
):
    """The job, as ``ray job submit`` runs it (``jobs/gradientspace.py --resume``, a driver of
    its own on the autoscaling head), on a copy of the warmed run: Stage II's gradient workers
    and the experts' Ray Train workers ask for the GPU-like resource, the autoscaler adds nodes
    that offer it, the labels equal the reference, and the idle nodes go away."""
    import json
    import shutil
    from pathlib import Path

    from ray.util.state import list_actors

    from gs_ray.cluster_config import FAKE_GPU, SPEC, render_fake
    from gs_ray.local_cluster import LocalAutoscalingCluster
    from gs_ray.rundir import RunDir
    from gs_ray.stage2.result import SKIPPED

    gpu_type = next(w for w in SPEC.workers if w.gpus)
    config = render_fake(max_workers=2, cpus_per_node=1, head_cpus=1, idle_timeout_minutes=0.1)
    run_dir = tmp_path / "run"
    shutil.copytree(warmed_apart["p"].run.path, run_dir)
    cluster = LocalAutoscalingCluster(config, num_cpus=1).start()
    seen: list = []
    exposed: list = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_nodes, args=(cluster, seen, exposed, stop))
    try:
        assert len(cluster.alive_nodes()) == 1  # the head alone: no worker node yet
        watcher.start()
        args = {
            "stage2.num_workers": 2,
            "stage2.cpus_per_worker": 1,
            "stage2.worker_resource": FAKE_GPU,
            "experts.worker_resource": FAKE_GPU,
            "experts.cpus_per_worker": 1,
            "run.until": "experts",
            # the paper's stages only: Stage II's labels are the experts' clusters, no generalist
            "clustering.routability": "off",
            "fallback.enabled": "false",
        }
        job = Path(__file__).resolve().parents[1] / "jobs" / "gradientspace.py"
        cmd = [
            sys.executable,
            str(job),
            "--resume",
            str(run_dir),
            *(f"--{k}={v}" for k, v in args.items()),
        ]
        env = {**cluster.env(), "RAY_ADDRESS": cluster.address}  # as ray job submit sets it
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        said = [json.loads(x) for x in run.stdout.splitlines() if x.startswith('{"run_dir"')]
        assert said == [{"run_dir": str(run_dir)}], run.stdout[-2000:]
        actors = list_actors(
            address=cluster.dashboard_url, limit=10_000, detail=True, raise_on_missing_output=False
        )
        out = RunDir.open(run_dir)
        labels = [SKIPPED if r["cluster"] is None else r["cluster"] for r in out.assignments()]
        ref = warmed_apart["ref"]
        np.testing.assert_array_equal(labels, ref.labels)
        k = int(ref.labels.max()) + 1
        assert all(out.expert_complete(c) for c in range(k))
        assert out.stage_done("experts")
        # the autoscaler added GPU-like worker nodes, and both stages' workers ran on them
        # (nodes idle between the two stages may go and be added again: at most 2 at a time)
        gpu_nodes = {i: r for snap in seen for i, r in snap.items() if r.get(FAKE_GPU)}
        assert (
            gpu_nodes
            and max(sum(map(bool, (r.get(FAKE_GPU) for r in snap.values()))) for snap in seen) <= 2
        ), seen[-3:]
        assert all(r[FAKE_GPU] == gpu_type.gpus for r in gpu_nodes.values())
        where = {}
        for a in actors:
            where.setdefault(a.class_name, set()).add(a.node_id)
        assert where.get("GradientWorker") and where["GradientWorker"] <= set(gpu_nodes), where
        trainers = where.get("RayTrainWorker")
        assert trainers and trainers <= set(gpu_nodes), where
        assert not exposed, f"listening beyond loopback: {exposed}"
        # ... and removes them once idle (idle_timeout_minutes 0.1)
        deadline = time.monotonic() + 120
        while len(cluster.alive_nodes()) > 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(cluster.alive_nodes()) == 1
    finally:
        stop.set()
        if watcher.is_alive():
            watcher.join(timeout=30)
        cluster.stop()
