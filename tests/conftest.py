"""Shared test settings: offline hub, one local Ray per test run (loopback only, so without
token auth), and the two lanes the suite runs in (pytest-xdist, ``-n 2 --dist loadgroup``).

The lanes: every test that uses Ray (the shared cluster, or the ``ray`` mark, which a test that
starts a Ray in this process has too), and every test that shares a module- or session-scoped
fixture with one, goes to one lane, in order, so that they all share the one local Ray as before
and each such fixture is built once. Every other test runs in a group of its module, free to run
in the other lane at the same time (NumPy, scikit-learn and small torch work on one core, while
the Ray tests wait on start-ups). So do the tests marked ``own_ray``: their clusters (gs-ray's own
local Ray, a TLS cluster, an autoscaling cluster) run in subprocesses, on private temp dirs and
free ports, beside the shared one, and this process never connects to them. ``-n 0`` runs
everything in one process, as before."""

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

import pytest  # noqa: E402
import torch  # noqa: E402

RAY_LANE = "ray"
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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups (its own hook, in the workers)
def pytest_collection_modifyitems(config, items):
    """Each test's lane (``xdist_group``): the Ray lane for the tests that use Ray and for those
    that share a wider-scoped fixture with one (built once, in that lane), else its module."""
    wide = {id(item): _wide_fixtures(item) for item in items}
    ray_ids = {id(item) for item in items if uses_ray(item)}
    shared = set().union(*(wide[i] for i in ray_ids))
    for item in items:
        in_ray = id(item) in ray_ids or bool(wide[id(item)] & shared)
        item.add_marker(pytest.mark.xdist_group(RAY_LANE if in_ray else _module(item)))


@pytest.fixture(autouse=True)
def _ray_only_in_the_ray_lane(request):
    """A test without the ``ray`` mark or the cluster fixture must not start Ray: it would run
    in the other lane, beside the shared cluster, with a Ray of its own."""
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
    """One local Ray head for the whole test run (started on first use, torn down at the end):
    `ray start --head` on 127.0.0.1 with free ports, so that `ray job submit` can use it too."""
    import ray

    _claim_the_ray_lane(tmp_path_factory)
    from gs_ray.local_cluster import LocalHead

    head = LocalHead(num_cpus=2).start()
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield head
    finally:
        ray.shutdown()
        head.stop()


def _claim_the_ray_lane(tmp_path_factory) -> None:
    """Under pytest-xdist, only one worker may start the cluster: the lanes rely on xdist's
    ``loadgroup`` honouring the groups (pytest-xdist 3.8 does not under pytest 9, whose node
    ids it cannot extend; constraints.txt pins pytest 8). A second worker fails here."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    claim = tmp_path_factory.getbasetemp().parent / "ray-lane"
    try:
        fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        pytest.fail(
            f"Ray tests run in two lanes ({claim.read_text()} and {worker}): pytest-xdist "
            "did not keep the xdist_group 'ray' on one worker (see tests/conftest.py)"
        )
    with os.fdopen(fd, "w") as f:
        f.write(worker)


@pytest.fixture
def ray_session(ray_cluster):
    """Connected to the shared cluster; any Ray Serve left running by a test is shut down."""
    yield ray_cluster
    import ray
    from ray import serve

    if ray.is_initialized():
        with contextlib.suppress(Exception):  # Serve was never started
            serve.shutdown()
