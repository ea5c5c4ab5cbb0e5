"""Shared test settings: offline hub, one local Ray per Ray lane (loopback only, so without
token auth), and the lanes the suite runs in (pytest-xdist, ``-n 3 --dist loadgroup``).

The lanes: every test that uses Ray (a shared cluster, or the ``ray`` mark, which a test that
starts a Ray in this process has too), and every test that shares a module- or session-scoped
fixture with one, goes to one of two Ray lanes, in order, so that they share that lane's one
local Ray and each such fixture is built once. Each Ray lane runs in a worker of its own with a
cluster of its own; ``SECOND_RAY_LANE`` names the modules of the second, chosen to balance the
two. Every other test runs in a group of its module, in the third worker, at the same time
(NumPy, scikit-learn and small torch work on one core, while the Ray tests wait on start-ups).
So do the tests marked ``own_ray``: their clusters (gs-ray's own local Ray, a TLS cluster, an
autoscaling cluster) run in subprocesses, on private temp dirs and free ports, beside the shared
ones, and this process never connects to them. The Ray lanes' tests come first in the
collection, so that xdist (``--no-loadscope-reorder``) hands each lane to a worker of its own at
the start. ``-n 0`` runs everything in one process, against one cluster."""

from __future__ import annotations

import contextlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's preemption watcher (an actor per run, about 1.3 s of CPU to start) watches for
# nodes being drained; the suite's nodes are killed, never drained. The product keeps it on.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray's log monitor globs its node's log folder every 0.1 s while it holds fewer than this many
# files, and every 0.5 s above; the suite's heads gather hundreds (three per worker process).
# Every 0.5 s from the start: a head that started 60 actors in 90 s, 400 files, spent 1.1 CPU-s
# in its log monitor instead of 2.6 (2026-12-06). The product keeps Ray's default.
os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
# The lanes keep both cores busy, so a thread that waits must sleep, not spin: torch's OpenMP
# threads spin after every parallel region by default, which on this suite's tiny models costs
# more than the work (six serving tests beside one busy core: 62 s of CPU, 26 s with this).
# Inherited by the clusters the suite starts; read when torch loads (below).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # a lane is one core: each lane's own work runs on one thread

RAY_LANES = ("ray", "ray-b")
# The modules whose Ray tests run in the second Ray lane, chosen so that the two lanes end
# together (two fresh clones, 2 cores, 2026-12-05: eval 310-349 s, pipeline 404-420, G-SNR
# 38-43, Tune 36-37, against benchmarks 39-40, pretrain 42-45, security 57-61, serving 228-238,
# Stage II 194-233, lost nodes 97-101, collective 133-149, training 55-57; pretrain moved over).
# Two more, 2026-12-05 afternoon: ray 821-855 s, ray-b 750-779 s; the benchmarks' Ray smoke
# runs (35-40 s) moved over, and collective lost its 2-rank twin (23 s). With the third worker
# at the Ray workers' niceness (below): ray 857 s, ray-b 723; training (64 s) moved over.
# A fresh clone of 23dfe64 (2026-12-06): ray 770 s, ray-b 765, the third worker 673.
SECOND_RAY_LANE = frozenset(
    {
        "test_benchmarks_smoke",
        "test_eval",
        "test_pipeline",
        "test_pretrain",
        "test_spectra_gsnr",
        "test_training",
        "test_tuning",
    }
)
RAY_FIXTURES = frozenset({"ray_cluster", "ray_session"})


def uses_ray(item: pytest.Item) -> bool:
    """A test that needs Ray in this process: the shared cluster (directly or through its
    fixtures), or the ``ray`` mark (a test that starts a Ray in this process has it too) where
    the test is not marked ``own_ray`` (its Rays run in subprocesses)."""
    if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    return item.get_closest_marker("ray") is not None and item.get_closest_marker("own_ray") is None


def _module(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else item.nodeid.split("::")[0]


def _wide_fixtures(item: pytest.Item) -> set[tuple[str, str]]:
    """(module, name) of the module-, package- or session-scoped fixtures of the suite's own
    (not pytest's, such as ``tmp_path_factory``) that a test uses, directly or not."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return set()
    return {
        (_module(item), name)
        for name, defs in info.name2fixturedefs.items()
        if defs
        and defs[-1].scope != "function"
        and not defs[-1].func.__module__.startswith(("_pytest", "pytest"))
    }


def _ray_lane(item: pytest.Item) -> str:
    return RAY_LANES[_module(item) in SECOND_RAY_LANE]


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its own hook, in the workers)
def pytest_collection_modifyitems(config, items):
    """Each test's lane (``xdist_group``): its module's Ray lane for the tests that use Ray and
    for those that share a wider-scoped fixture with one (built once, in that lane), else its
    module. The Ray lanes' tests first, each lane in its own order."""
    wide = {id(item): _wide_fixtures(item) for item in items}
    ray_ids = {id(item) for item in items if uses_ray(item)}
    shared = set().union(*(wide[i] for i in ray_ids))
    in_ray_lane = set()
    for item in items:
        if id(item) in ray_ids or wide[id(item)] & shared:
            in_ray_lane.add(id(item))
            item.add_marker(pytest.mark.xdist_group(_ray_lane(item)))
        else:
            item.add_marker(pytest.mark.xdist_group(_module(item)))
    items[:] = sorted(items, key=lambda item: id(item) not in in_ray_lane)  # a stable sort


_CLAIMED: set[str] = set()
#: Ray runs its workers at niceness 15 (``RAY_worker_niceness``), so a pytest worker at 0 that
#: runs the tests without Ray took a core from the Ray lanes' actors whenever it wanted one
#: (weight 1,024 against 36), while the Ray lanes are the suite's longest. The worker whose
#: first test is not in a Ray lane (the third, which runs the pure tests) runs them at the Ray
#: workers' niceness (every thread: Linux sets niceness per thread). Its ``own_ray`` tests run
#: at 0, as before, and so do the clusters they start: their agents must write their ports
#: within Ray's fixed 15 s, or the raylet aborts (the TLS cluster's worker node did so in
#: loaded suites, at 0 too; ``LocalNode.start`` now tries again). Raising the niceness back
#: needs root: elsewhere the worker stays at 0. (Fresh clones, 2026-12-05: lanes ray 905 s,
#: ray-b 819, pure 463 before; 857, 723, 627 after.)
PURE_LANE_NICE = 15
_PURE_WORKER: list[bool] = []  # decided at the worker's first test


def _set_niceness(nice: int) -> None:
    from gs_ray.stage2.worker import process_threads

    for tid in process_threads():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)


def _lane_priority(item: pytest.Item) -> None:
    """The niceness of this test in the third worker (above); nothing in a Ray lane's."""
    if not _PURE_WORKER:
        group = item.get_closest_marker("xdist_group")
        pure = group is None or group.args[0] not in RAY_LANES
        _PURE_WORKER.append(pure and hasattr(os, "geteuid") and os.geteuid() == 0)
    if _PURE_WORKER[0]:
        _set_niceness(0 if item.get_closest_marker("own_ray") else PURE_LANE_NICE)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test is set up (a module's cluster among them)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        _lane_priority(item)


@pytest.fixture(autouse=True)
def _one_worker_per_ray_lane(request, tmp_path_factory):
    """Under pytest-xdist, each Ray lane must run in one worker, which starts its cluster: the
    lanes rely on xdist's ``loadgroup`` honouring the groups (pytest-xdist 3.8 does not under
    pytest 9, whose node ids it cannot extend; constraints.txt pins pytest 8). A second worker
    that gets a test of a lane fails here."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker and uses_ray(request.node):
        lane = _ray_lane(request.node)
        if lane not in _CLAIMED:
            claim = tmp_path_factory.getbasetemp().parent / f"ray-lane-{lane}"
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                if claim.read_text() != worker:
                    pytest.fail(
                        f"the Ray lane {lane!r} runs in two workers ({claim.read_text()} and "
                        f"{worker}): pytest-xdist did not keep its xdist_group on one worker "
                        "(see tests/conftest.py)"
                    )
            else:
                with os.fdopen(fd, "w") as f:
                    f.write(worker)
            _CLAIMED.add(lane)
    yield


@pytest.fixture(autouse=True)
def _ray_only_in_the_ray_lane(request):
    """A test without the ``ray`` mark or the cluster fixture must not start Ray: it would run
    in another worker, beside the shared clusters, with a Ray of its own."""
    before = _ray_connected()
    yield
    if not before and _ray_connected() and not uses_ray(request.node):
        import ray

        ray.shutdown()
        pytest.fail("this test started Ray: give it the `ray` mark or the ray_session fixture")


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.fixture
def tiny_peft_model():
    """A 2-layer random Llama with LoRA on q/v and non-zero B (so every LoRA gradient is live)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """One local Ray head for the Ray lane's worker (started on first use, torn down at the end):
    `ray start --head` on 127.0.0.1 with free ports, so that `ray job submit` can use it too."""
    import ray

    from gs_ray.local_cluster import LocalHead

    head = LocalHead(num_cpus=2).start()
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        head.stop()


@pytest.fixture
def ray_session(ray_cluster):
    """Connected to the shared cluster; any Ray Serve left running by a test is shut down."""
    yield ray_cluster
    import ray
    from ray import serve

    if ray.is_initialized():
        with contextlib.suppress(Exception):  # Serve was never started
            serve.shutdown()
