"""Shared test settings: offline hub, one local Ray per test run (loopback only, so without
token auth), and the two lanes the suite runs in (pytest-xdist, ``-n 2 --dist loadgroup``).

The lanes: every test of a module that uses Ray (the shared cluster, the ``ray`` mark, or a Ray
of its own: ``STARTS_RAY``) goes to one lane, in order, so that they all share the one local Ray
as before; every other module is a group of its own, free to run in the other lane at the same
time (pure NumPy, scikit-learn and torch work that uses one core, while the Ray tests wait on
start-ups). ``-p no:xdist`` (or ``-n 0``) runs everything in one process, as before."""

from __future__ import annotations

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


RAY_LANE = "ray"
RAY_FIXTURES = frozenset({"ray_cluster", "ray_session"})
# modules whose tests start a Ray of their own (a benchmark's subprocess) without the fixture
STARTS_RAY = frozenset({"test_benchmarks_smoke"})


def uses_ray(item: pytest.Item) -> bool:
    """A test that needs Ray: the shared cluster, the ``ray`` mark, or its module's own Ray."""
    return (
        bool(RAY_FIXTURES & set(getattr(item, "fixturenames", ())))
        or item.get_closest_marker("ray") is not None
        or _module(item) in STARTS_RAY
    )


def _module(item: pytest.Item) -> str:
    module = getattr(item, "module", None)
    return module.__name__ if module is not None else item.nodeid.split("::")[0]


def pytest_collection_modifyitems(config, items):
    """Each test's lane (``xdist_group``): the Ray lane for every test of a module that uses
    Ray (its module-scoped fixtures are then built once, in that lane), else its module."""
    ray_modules = {_module(item) for item in items if uses_ray(item)}
    for item in items:
        name = _module(item)
        item.add_marker(pytest.mark.xdist_group(RAY_LANE if name in ray_modules else name))


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
def ray_cluster():
    """One local Ray head for the whole test run (started on first use, torn down at the end):
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
