"""Serving: the expert pool against each expert loaded alone with plain peft, and the Ray Serve
application deployed with `ray job submit -- python jobs/serve.py ... --detach` and queried over
HTTP on 127.0.0.1 (routes equal the router's, answers equal the pool's, bad requests name the
field, a bounded burst of concurrent requests is batched and answered exactly, a seeded mix of
long and short, valid and invalid requests gets no 5xx and the answers of one at a time).

The run directory is built here in seconds (a tiny base model, three LoRA experts with distinct
random weights, a router trained on three domains of the demo corpus), not by the pipeline: what
is tested is serving, and the pipeline's own run directory is tested in test_pipeline.py.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from benchmark_scripts import load_benchmark

from gs_ray.config import Config
from gs_ray.serving.pool import ExpertPool, ServedRun, ServingError, expert_model, plan_batches

ROOT = Path(__file__).resolve().parents[1]
K = 3
DOMAINS = ("math", "code", "story")
PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Write a Python function that returns the largest element of a list.",
    "Tell a short story about a lighthouse keeper.",
    "What is 15% of 80?",
    "Write a Python function that reverses a string.",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished-looking run: tiny base, K experts with distinct weights, a trained router."""
    from gs_ray.core.models import add_lora, load_base_model, materialize_base_model
    from gs_ray.data.demo import build_demo_corpus
    from gs_ray.routing.router import make_router
    from gs_ray.rundir import RunDir

    cfg = Config()
    cfg.run.output_dir = str(tmp_path_factory.mktemp("served"))
    cfg.run.name = "served"
    cfg.lora.r, cfg.lora.alpha = 8, 16
    cfg.model.tiny_pretrain_steps = 0  # random base weights: the experts' B matrices are random
    run = RunDir.create(cfg)
    base_path = materialize_base_model(cfg.model, run.path, cfg.run.seed)
    for k in range(K):
        model = add_lora(load_base_model(base_path, cfg.model, torch.device("cpu")), cfg.lora, k)
        gen = torch.Generator().manual_seed(100 + k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen))
        model.save_pretrained(str(run.expert(k)))
        run.write_expert_record(k, {"n_train": 0, "note": "test fixture"})
    rows = [r for r in build_demo_corpus(600, seed=0) if r["domain"] in DOMAINS]
    texts = [r["instruction"] for r in rows]
    labels = [DOMAINS.index(r["domain"]) for r in rows]
    make_router(cfg.router, K, seed=0).fit(texts, labels).save(run.router)
    return run.path


@pytest.fixture(scope="module")
def pool(run_dir) -> ExpertPool:
    return ServedRun.open(run_dir).expert_pool("cpu")


def _alone(run_dir: Path, k: int, prompt: str, max_new_tokens: int) -> str:
    """Expert k loaded alone with plain peft; one unpadded prompt; greedy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = ServedRun.open(run_dir)
    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    model = PeftModel.from_pretrained(base, run_dir / "experts" / f"expert_{k}").eval()
    ids = tok(run.cfg.data.template.format(prompt=prompt), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id or tok.eos_token_id,
        )
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[tuple[int, int], str]:
    """(prompt index, expert) -> the answer of that expert alone, 12 new tokens."""
    return {(i, k): _alone(run_dir, k, p, 12) for i, p in enumerate(PROMPTS) for k in range(K)}


# The tiny base model has 1,024 positions. A prompt of LONG tokens with SPARE new tokens fits
# alone, as does a short prompt with up to 512; together (one generate call for the batch's
# longest prompt and largest max_new_tokens) they do not: the issue-8 batch, 872 + 512 > 1,024.
N_POSITIONS, SPARE = 1024, 152
LONG = N_POSITIONS - SPARE


def _prompt_of_tokens(pool: ExpertPool, n: int, start: int = 0) -> str:
    """A prompt of demo-corpus words whose rendered form has n (or a few more) tokens."""
    from gs_ray.data.demo import build_demo_corpus

    words = " ".join(r["instruction"] for r in build_demo_corpus(400, seed=1)[start:]).split()
    lo, hi = 1, len(words)
    while lo < hi:  # the fewest words reaching n tokens
        mid = (lo + hi) // 2
        if len(pool.tokenizer(pool.render(" ".join(words[:mid])))["input_ids"]) < n:
            lo = mid + 1
        else:
            hi = mid
    return " ".join(words[:lo])


@pytest.fixture(scope="module")
def long_prompts(pool) -> list[str]:
    """Four prompts of LONG to LONG + 6 tokens (the issue's 872 on this model)."""
    assert pool.max_positions == N_POSITIONS
    out = [_prompt_of_tokens(pool, LONG, start) for start in (0, 7, 13, 21)]
    for p in out:
        assert LONG <= len(pool.tokenizer(pool.render(p))["input_ids"]) <= LONG + 6
    return out


# --------------------------------------------------------------------------- batch planning


def _assert_plan_ok(plan, lens, limits, max_positions):
    """Independent check: every row in exactly one sub-batch, and each sub-batch fits."""
    assert sorted(i for g in plan for i in g) == list(range(len(lens)))
    for g in plan:
        assert g, plan
        assert max(lens[i] for i in g) + max(limits[i] for i in g) <= max_positions, (g, plan)


def test_plan_batches_splits_the_issue_batch():
    lens, limits = [872] * 4 + [24] * 4, [1] * 4 + [512] * 4
    assert 872 + 512 > 1024  # the batch as one call does not fit
    plan = plan_batches(lens, limits, 1024)
    _assert_plan_ok(plan, lens, limits, 1024)
    assert plan == [[0, 1, 2, 3], [4, 5, 6, 7]]  # two sub-batches, not eight
    # interleaved the same way, and with no length limit everything is one batch
    plan = plan_batches([872, 24] * 4, [1, 512] * 4, 1024)
    assert plan == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert plan_batches(lens, limits, None) == [list(range(8))]
    assert plan_batches([], [], 1024) == []


def test_plan_batches_rejects_a_row_that_does_not_fit_alone():
    with pytest.raises(ServingError, match="prompt: 1000 tokens \\+ max_new_tokens 30 exceed"):
        plan_batches([10, 1000], [4, 30], 1024)
    with pytest.raises(ServingError, match="max_new_tokens values"):
        plan_batches([10, 20], [4], 1024)


def test_plan_batches_random_batches_fit():
    """Seeded random batches of rows that each fit alone: a partition into fitting sub-batches,
    one sub-batch whenever the whole batch fits, and never more sub-batches than rows."""
    rng = random.Random(8)
    for _ in range(500):
        max_positions = rng.choice([64, 512, 1024])
        n = rng.randint(1, 16)
        lens = [rng.randint(1, max_positions - 1) for _ in range(n)]
        limits = [rng.randint(1, max_positions - x) for x in lens]
        plan = plan_batches(lens, limits, max_positions)
        _assert_plan_ok(plan, lens, limits, max_positions)
        if max(lens) + max(limits) <= max_positions:
            assert len(plan) == 1


# --------------------------------------------------------------------------- the pool, no Serve


def test_experts_answer_differently(reference):
    """Precondition of the next tests: a wrong adapter would show in the answers."""
    for i in range(len(PROMPTS)):
        assert len({reference[i, k] for k in range(K)}) == K, i


def test_mixed_batch_equals_each_expert_alone(pool, reference):
    experts = [0, 1, 2, 1, 0]
    limits = [12, 5, 12, 9, 12]
    gens = pool.generate(PROMPTS, experts, limits)
    for i, (g, k, m) in enumerate(zip(gens, experts, limits, strict=True)):
        assert g.expert == k and g.n_new_tokens <= m
        full = reference[i, k]
        if m == 12:
            assert g.text == full, (i, k)
        else:  # greedy: the shorter answer is the first m tokens of the longer one
            assert g.n_new_tokens == m and full.startswith(g.text.rstrip()), (i, k)


def test_answer_does_not_depend_on_the_batch(pool):
    alone = pool.generate(PROMPTS[2:3], [1], 12)[0].text
    mixed = pool.generate(PROMPTS, [0, 2, 1, 2, 0], 12)[2].text
    assert alone == mixed


def test_pool_rejects_bad_requests_naming_the_field(pool):
    with pytest.raises(ServingError, match="expert: 3 is not in"):
        pool.generate(["hi"], [3])
    with pytest.raises(ServingError, match="max_new_tokens"):
        pool.generate(["hi"], [0], 0)
    with pytest.raises(ServingError, match="prompt: .* exceed"):
        pool.generate(["word " * 2000], [0], 8)
    assert pool.generate([], [], 4) == []


def test_pool_long_and_short_batch_equals_one_at_a_time(pool, run_dir, long_prompts):
    """The issue-8 batch: four long prompts with max_new_tokens 1 and four short prompts with
    512, all for one expert. Each fits alone; together they are split, not refused, and every
    answer equals the same request alone (and, for two of them, the expert alone in plain peft)."""
    prompts = long_prompts + PROMPTS[:4]
    limits = [1] * 4 + [512] * 4
    gens = pool.generate(prompts, [1] * 8, limits)
    alone = [pool.generate([p], [1], m)[0] for p, m in zip(prompts, limits, strict=True)]
    for g, a, m in zip(gens, alone, limits, strict=True):
        assert (g.text, g.n_new_tokens, g.n_prompt_tokens) == (
            a.text,
            a.n_new_tokens,
            a.n_prompt_tokens,
        )
        assert g.n_new_tokens <= m
    assert gens[0].text == _alone(run_dir, 1, prompts[0], 1)
    assert gens[4].text == _alone(run_dir, 1, prompts[4], 512)


def test_open_names_what_is_missing(run_dir, tmp_path):
    import shutil

    from gs_ray.errors import RunDirError

    with pytest.raises(RunDirError, match="not a gs-ray run directory"):
        ServedRun.open(tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "experts" / "expert_1" / "adapter_config.json").unlink()
    with pytest.raises(ServingError, match=r"expert_1 is missing.*--resume"):
        ServedRun.open(copy)
    shutil.rmtree(copy / "router")
    with pytest.raises(ServingError, match="no router yet"):
        ServedRun.open(copy)


def test_cli_serve_reports_a_bad_run_dir(tmp_path, capsys):
    from gs_ray.cli import main

    assert main(["serve", str(tmp_path)]) == 2
    assert "not a gs-ray run directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--model.name", "x"]) == 2
    assert "only --serve.* overrides" in capsys.readouterr().err


def test_serve_overrides_apply(run_dir):
    from gs_ray.serving.app import serve_config_for

    cfg = serve_config_for(str(run_dir), ["--serve.port", "8123", "--serve.batch_wait_s=0.5"])
    assert (cfg.port, cfg.batch_wait_s, cfg.max_batch_size) == (8123, 0.5, 8)
    assert serve_config_for(str(run_dir)).port == 8000


def test_serve_config_yaml_is_valid_and_builds(run_dir):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from gs_ray.serving.app import build_app

    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(raw)
    (spec,) = schema.applications
    assert spec.import_path == "gs_ray.serving.app:build_app"
    args = {**spec.args, "run_dir": str(run_dir)}
    assert build_app(args) is not None
    # serve/app.py (what `serve run serve.app:build_app` imports) is the same builder
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("serve_app_file", ROOT / "serve" / "app.py")
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    assert module.build_app is build_app
    with pytest.raises(Exception, match="max_batch_size"):
        build_app({"run_dir": str(run_dir), "max_batch_size": "many"})
    with pytest.raises(ServingError, match="run_dir"):
        build_app({})


# --------------------------------------------------------------------------- requests, no Serve


def test_request_models_are_strict():
    from pydantic import ValidationError

    from gs_ray.serving.protocol import GenerateRequest, RouteRequest

    ok = GenerateRequest.model_validate_json('{"prompt": "hi", "max_new_tokens": 8, "expert": 1}')
    assert (ok.prompt, ok.max_new_tokens, ok.expert) == ("hi", 8, 1)
    cases = [
        ('{"prompt": "hi", "max_new_tokens": "8"}', "max_new_tokens"),
        ('{"prompt": "hi", "max_new_tokens": true}', "max_new_tokens"),
        ('{"prompt": "hi", "max_new_tokens": 8.0}', "max_new_tokens"),
        ('{"prompt": "hi", "expert": true}', "expert"),
        ('{"prompt": "hi", "expert": "1"}', "expert"),
        ('{"prompt": " \\n\\t "}', "prompt"),
        ('{"prompt": "hi", "max_tokens": 8}', "max_tokens"),
    ]
    for body, field in cases:
        with pytest.raises(ValidationError) as e:
            GenerateRequest.model_validate_json(body)
        assert field in {str(x) for err in e.value.errors() for x in err["loc"]}, body
    for prompt in ("  ", "a\ud800"):  # the same checks for python input (not only JSON)
        with pytest.raises(ValidationError, match="prompt"):
            RouteRequest(prompt=prompt)
    # pydantic's JSON parser refuses a lone surrogate (json_invalid) before any validator runs
    with pytest.raises(ValidationError, match="json_invalid|unicode"):
        GenerateRequest.model_validate_json('{"prompt": "a\\ud800b"}')


def test_validation_error_body_never_fails_to_encode():
    from gs_ray.serving.protocol import validation_error_body

    body = validation_error_body(
        [{"loc": ("body", "\udc00"), "msg": "bad \ud800", "type": "x", "input": "\ud800" * 9}]
    )
    text = json.dumps(body, ensure_ascii=False).encode("utf-8").decode()
    assert "\\udc00" in text and "input" not in text


def test_api_docs_only_when_enabled():
    import asyncio
    from types import SimpleNamespace

    from fastapi import HTTPException

    from gs_ray.config import ServeConfig
    from gs_ray.serving.app import Ingress, api

    # the class as written (Serve's wrapper around it has an async __del__ for its ASGI app)
    ingress = next(c for c in Ingress.func_or_class.__mro__ if "docs" in vars(c))
    request = SimpleNamespace(app=api, scope={"root_path": "/x"})
    shell = object.__new__(ingress)  # the handlers only read cfg
    for page in (ingress.openapi, ingress.docs, ingress.redoc):
        shell.cfg = ServeConfig()
        with pytest.raises(HTTPException) as e:
            asyncio.run(page(shell, request))
        assert e.value.status_code == 404
        shell.cfg = ServeConfig(api_docs=True)
        assert asyncio.run(page(shell, request)).status_code == 200
    schema = json.loads(asyncio.run(ingress.openapi(shell, request)).body)
    assert "/generate" in schema["paths"] and "/docs" not in schema["paths"]
    assert b"/x/openapi.json" in asyncio.run(ingress.docs(shell, request)).body


def test_serve_binds_loopback_by_default():
    import yaml

    from gs_ray.config import ServeConfig

    assert ServeConfig().host == "127.0.0.1" and ServeConfig().api_docs is False
    raw = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    assert raw["http_options"]["host"] == "127.0.0.1"
    assert raw["applications"][0]["args"].get("api_docs", False) is False


# --------------------------------------------------------------------------- Ray Serve over HTTP


def _http(
    url: str, body: dict | None = None, timeout: float = 60, headers: dict | None = None
) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:  # a 500 from the framework is plain text
            return e.code, raw.decode("utf-8", "replace")


@pytest.fixture(scope="module")
def served(ray_cluster, run_dir):
    """`ray job submit -- python jobs/serve.py RUN --detach`: the job deploys and ends, Serve
    keeps serving; shut down at the end of the module (before any Train/Tune test runs)."""
    from ray import serve

    from gs_ray.local_ray import free_port

    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("ray")),
        "job",
        "submit",
        "--address",
        ray_cluster.dashboard_url,
        "--working-dir",
        str(ROOT),
        "--",
        "python",
        "jobs/serve.py",
        str(run_dir),
        "--detach",
        "--serve.port",
        str(port),
        "--serve.batch_wait_s",
        "0.2",
        "--serve.expert_cpus",
        "0.5",
        "--serve.router_cpus",
        "0.25",
    ]
    proc = subprocess.run(cmd, env=ray_cluster.env(), capture_output=True, text=True, timeout=600)
    try:
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if _http(f"{url}/healthz", timeout=5) == (200, "ok"):
                    break
            except OSError:
                pass
            time.sleep(1)
        yield url
    finally:
        serve.shutdown()


@pytest.mark.ray
def test_http_info_and_health(served):
    assert _http(f"{served}/healthz") == (200, "ok")
    status, info = _http(f"{served}/info")
    assert status == 200 and info["n_experts"] == K and info["run"] == "served"
    assert [e["adapter"] for e in info["experts"]] == [f"expert_{k}" for k in range(K)]


@pytest.mark.ray
def test_http_routes_like_the_router(served, run_dir):
    router = ServedRun.open(run_dir).router()
    probs = router.predict_proba(PROMPTS)
    for prompt, p in zip(PROMPTS, probs, strict=True):
        status, out = _http(f"{served}/route", {"prompt": prompt})
        assert status == 200
        assert out["expert"] == int(p.argmax())
        assert out["probs"] == pytest.approx(p.tolist(), abs=1e-5)


@pytest.mark.ray
def test_http_generate_equals_the_expert_alone(served, run_dir, reference):
    routes = ServedRun.open(run_dir).router().predict(PROMPTS)
    assert len(set(routes.tolist())) >= 2  # the router spreads these prompts over experts
    for i, prompt in enumerate(PROMPTS):
        status, out = _http(f"{served}/generate", {"prompt": prompt, "max_new_tokens": 12})
        assert status == 200, out
        assert out["routed_by"] == "router" and out["expert"] == int(routes[i])
        assert out["text"] == reference[i, int(routes[i])]
        assert out["finish_reason"] in ("stop", "length") and out["n_new_tokens"] <= 12
    status, out = _http(
        f"{served}/generate", {"prompt": PROMPTS[0], "expert": 2, "max_new_tokens": 12}
    )
    assert status == 200 and out["routed_by"] == "request" and out["expert"] == 2
    assert out["text"] == reference[0, 2]


@pytest.mark.ray
def test_http_bad_requests_name_the_field(served):
    cases = [
        ({"prompt": ""}, 422, "prompt"),
        ({"max_new_tokens": 4}, 422, "prompt"),
        ({"prompt": "hi", "max_new_tokens": 0}, 422, "max_new_tokens"),
        ({"prompt": "hi", "max_new_tokens": 100000}, 400, "max_new_tokens"),
        ({"prompt": "hi", "expert": K}, 400, "expert"),
        ({"prompt": "word " * 2000, "max_new_tokens": 8}, 400, "prompt"),
    ]
    for body, code, field in cases:
        status, out = _http(f"{served}/generate", body)
        assert status == code, (body, out)
        assert field in json.dumps(out), (body, out)
    # the server is still fine
    assert _http(f"{served}/generate", {"prompt": "hi", "max_new_tokens": 2})[0] == 200


@pytest.mark.ray
def test_http_burst_is_batched_and_exact(served, reference):
    """A bounded burst (30 requests, 10 at a time, 60 s cap each) mixing experts: every answer
    equals that expert alone, and the experts replica ran batches of more than one request."""
    from ray import serve

    from gs_ray.serving.app import APP_NAME

    jobs = [(i % len(PROMPTS), (i // len(PROMPTS)) % K) for i in range(30)]

    def ask(job):
        i, k = job
        return _http(
            f"{served}/generate",
            {"prompt": PROMPTS[i], "expert": k, "max_new_tokens": 12},
            timeout=60,
        )

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=10) as ex:
        answers = list(ex.map(ask, jobs))
    assert time.perf_counter() - start < 300
    for (i, k), (status, out) in zip(jobs, answers, strict=True):
        assert status == 200, out
        assert out["text"] == reference[i, k], (i, k)
    stats = serve.get_deployment_handle("ExpertsDeployment", APP_NAME).stats.remote().result()
    assert max(stats["batch_sizes"]) > 1 and stats["requests"] >= len(jobs)


@pytest.mark.ray
def test_http_openai_burst_with_abusive_rows_serves_the_valid_ones(served, reference):
    """Valid OpenAI requests sent together with ones that used to fail the whole Serve batch
    (seed 2**64, temperature 1e-300, an over-long prompt, a huge stop list): every valid one is
    answered exactly as alone, every bad one gets its own 400 (bounded: 16 requests, 60 s each)."""
    url = f"{served}/v1/completions"
    good = [
        {"model": expert_model(k), "prompt": PROMPTS[i], "max_tokens": 12, "temperature": 0}
        for i, k in ((0, 0), (1, 1 % K), (2, 2 % K), (3, 0), (4, 1 % K))
    ]
    seeded = {
        "model": expert_model(0),
        "prompt": PROMPTS[0],
        "max_tokens": 4,
        "temperature": 0.7,
        "seed": 2**63 - 1,
    }
    bad = [
        ({"model": "gs-ray", "prompt": "hi", "seed": 2**64}, "seed"),
        ({"model": "gs-ray", "prompt": "hi", "temperature": 1e-300}, "temperature"),
        ({"model": "gs-ray", "prompt": "word " * 20_000}, "prompt"),
        ({"model": "gs-ray", "prompt": "hi", "stop": ["x"] * 50}, "stop"),
    ]
    bodies = good + [seeded] + [b for b, _ in bad] + good[:3]
    with ThreadPoolExecutor(max_workers=8) as ex:
        answers = list(ex.map(lambda b: _http(url, b, timeout=60), bodies))
    for body, (status, out) in zip(bodies, answers, strict=True):
        if body in good:
            assert status == 200, out
            i, k = PROMPTS.index(body["prompt"]), int(body["model"].rsplit("-", 1)[1])
            assert out["choices"][0]["text"] == reference[i, k]
    assert answers[len(good)][0] == 200  # the largest seed is served
    first_bad = len(good) + 1
    for (_, param), (status, out) in zip(
        bad, answers[first_bad : first_bad + len(bad)], strict=True
    ):
        _assert_openai_error(status, out, 400, param)


@pytest.mark.ray
def test_serve_replicas_listen_on_loopback_only(served, ray_cluster):
    """During a running gs-ray serve, every listening socket of the cluster's processes (the
    Serve controller, proxy and the router, experts and ingress replicas with their inter-
    deployment gRPC servers, which Ray binds to every interface) is on loopback."""
    from gs_ray.local_ray import is_loopback
    from tests.test_ray_security import listening

    procs = ray_cluster.processes()
    replicas = [
        p
        for p in procs
        if "ServeReplica" in " ".join(p.cmdline() or [p.name()]) or "ServeReplica" in p.name()
    ]
    assert len(replicas) >= 3, [p.name() for p in procs]
    socks = listening({p.pid for p in procs})
    mine = listening({p.pid for p in replicas})
    assert mine, "the replicas listen (their gRPC servers)"
    exposed = [s for s in socks if not is_loopback(s[0])]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.ray
def test_http_gate_refuses_other_host_names_and_large_bodies(served):
    """On the running server (no key, loopback): a Host that is not a loopback name gets 400,
    a body over serve.max_body_bytes 413 before it is parsed; the docs stay 404."""
    body = {"model": "gs-ray", "prompt": PROMPTS[0], "max_tokens": 2}
    status, out = _http(f"{served}/v1/completions", body, headers={"Host": "evil.example"})
    assert status == 400 and out["error"]["code"] == "invalid_host", out
    status, out = _http(f"{served}/v1/completions", {**body, "pad": "x" * 1_100_000})
    assert status == 413 and out["error"]["code"] == "request_too_large", out
    assert _http(f"{served}/v1/completions", body)[0] == 200


@pytest.mark.ray
def test_http_api_docs_are_off_by_default(served):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert _http(f"{served}{path}")[0] == 404, path


@pytest.mark.ray
def test_http_lone_surrogate_is_422(served):
    """Before: the 422 reply echoed the input and failed to encode it (500)."""
    for body in ({"prompt": "a\ud800b"}, {"prompt": "hi", "expert": "\udc00"}):
        status, out = _http(f"{served}/generate", body)  # json.dumps writes "\ud800" as is
        assert status == 422, out
        assert out["detail"][0]["loc"][-1] in ("prompt", "expert")
    status, out = _http(f"{served}/route", {"prompt": "\ud800"})
    assert status == 422 and "prompt" in json.dumps(out)


@pytest.mark.ray
def test_http_whitespace_prompt_is_422(served):
    for url in (f"{served}/generate", f"{served}/route"):
        status, out = _http(url, {"prompt": " \n\t  "})
        assert status == 422 and out["detail"][0]["loc"] == ["body", "prompt"], out
        assert "non-whitespace" in out["detail"][0]["msg"]


@pytest.mark.ray
def test_http_string_integer_is_422(served):
    for field in ("max_new_tokens", "expert"):
        status, out = _http(f"{served}/generate", {"prompt": "hi", field: "1"})
        assert status == 422 and out["detail"][0]["loc"] == ["body", field], out


@pytest.mark.ray
def test_http_bool_is_not_an_integer(served):
    for field in ("max_new_tokens", "expert"):
        status, out = _http(f"{served}/generate", {"prompt": "hi", field: True})
        assert status == 422 and out["detail"][0]["loc"] == ["body", field], out


def _ask_all(url: str, bodies: list[dict], workers: int = 16) -> list[tuple[int, dict | str]]:
    with ThreadPoolExecutor(max_workers=workers) as ex:
        return list(ex.map(lambda b: _http(f"{url}/generate", b, timeout=300), bodies))


@pytest.mark.ray
def test_http_long_and_short_batch_all_answered(served, pool, long_prompts):
    """The issue-8 burst: eight valid requests to one expert sent together (four long prompts with
    max_new_tokens 1, four short ones with 512) all returned 500; each is answered as alone."""
    bodies = [{"prompt": p, "expert": 0, "max_new_tokens": 1} for p in long_prompts]
    bodies += [{"prompt": p, "expert": 0, "max_new_tokens": 512} for p in PROMPTS[:4]]
    answers = _ask_all(served, bodies, workers=8)
    for body, (status, out) in zip(bodies, answers, strict=True):
        assert status == 200, out
        alone = pool.generate([body["prompt"]], [0], body["max_new_tokens"])[0]
        assert (out["text"], out["n_new_tokens"]) == (alone.text, alone.n_new_tokens)
    assert max(out["batch_size"] for _, out in answers) > 1  # they did share a Serve batch


@pytest.mark.ray
def test_http_random_mix_no_5xx_and_answers_as_alone(served, pool, long_prompts):
    """A seeded mix of 32 concurrent requests: long prompts with few new tokens, short prompts
    with many, ordinary ones, and invalid ones (whitespace, a lone surrogate, "8", true, a prompt
    too long, an expert out of range, too many new tokens). No 5xx; every valid request gets the
    answer it gets alone (the pool, one request at a time); every invalid one a 4xx naming it."""
    rng = random.Random(2026)
    invalid = [
        ({"prompt": "  \n "}, 422, "prompt"),
        ({"prompt": "x\ud800"}, 422, "prompt"),
        ({"prompt": "hi", "max_new_tokens": "8"}, 422, "max_new_tokens"),
        ({"prompt": "hi", "expert": True}, 422, "expert"),
        ({"prompt": "hi", "max_new_tokens": True}, 422, "max_new_tokens"),
        ({"prompt": long_prompts[0], "expert": 0, "max_new_tokens": SPARE + 40}, 400, "prompt"),
        ({"prompt": "word " * 1500, "expert": 1, "max_new_tokens": 2}, 400, "prompt"),
        ({"prompt": "hi", "expert": K}, 400, "expert"),
        ({"prompt": "hi", "max_new_tokens": 10_000}, 400, "max_new_tokens"),
    ]
    cases: list[tuple[dict, int | None, str | None]] = []
    for _ in range(32):
        kind = rng.choice(["long", "long", "short", "short", "plain", "invalid"])
        k = rng.randrange(K)
        if kind == "long":
            m = rng.randint(1, 8)
            cases.append(
                ({"prompt": rng.choice(long_prompts), "expert": k, "max_new_tokens": m}, 200, None)
            )
        elif kind == "short":
            # does not fit with a long prompt (512 new tokens: the issue-8 burst's test)
            m = rng.randint(SPARE + 8, SPARE + 64)
            cases.append(
                ({"prompt": rng.choice(PROMPTS), "expert": k, "max_new_tokens": m}, 200, None)
            )
        elif kind == "plain":
            m = rng.randint(1, 24)
            cases.append(
                ({"prompt": rng.choice(PROMPTS), "expert": k, "max_new_tokens": m}, 200, None)
            )
        else:
            cases.append(rng.choice(invalid))
    kinds = {code for _, code, _ in cases}
    assert {200, 400, 422} <= kinds  # the seed mixes all three
    answers = _ask_all(served, [body for body, _, _ in cases])
    assert all(status < 500 for status, _ in answers), [a for a in answers if a[0] >= 500]
    for (body, code, field), (status, out) in zip(cases, answers, strict=True):
        assert status == code, (body, out)
        if code == 200:
            alone = pool.generate([body["prompt"]], [body["expert"]], body["max_new_tokens"])[0]
            assert (out["text"], out["n_new_tokens"]) == (alone.text, alone.n_new_tokens), body
        else:
            assert field in json.dumps(out), (body, out)


def test_serve_throughput_benchmark_runs(run_dir, tmp_path):
    """The benchmark's three variants agree on every answer and its JSON has the ratios."""
    bench = load_benchmark("serve_throughput")
    out_file = tmp_path / "serve.json"
    bench.main(["--run-dir", str(run_dir), "--smoke", "--json", str(out_file)])  # 9 requests
    out = json.loads(out_file.read_text())
    assert out["identical_answers"] is True and out["requests"] == 9
    assert out["speedup_mixed_vs_one"] > 0 and out["speedup_mixed_vs_grouped"] > 0


# --------------------------------------------------------------------------- issue 13: OpenAI API


def test_ensemble_equals_a_hand_computation(pool, run_dir, reference):
    """The ensemble (greedy over sum_k w_k softmax(logits_k)) against the same mixture computed
    by hand from the K experts loaded alone with plain peft; one-hot weights give that expert."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # one-hot: exactly the expert alone (12 tokens, the reference)
    assert pool.ensemble(PROMPTS[0], [0.0, 1.0, 0.0], 12).text == reference[0, 1]
    weights = [0.5, 0.3, 0.2]
    got = pool.ensemble(PROMPTS[3], weights, 6)
    tok = AutoTokenizer.from_pretrained(run_dir / "base_model")
    models = [
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
            run_dir / "experts" / f"expert_{k}",
        ).eval()
        for k in range(K)
    ]
    ids = tok(
        ServedRun.open(run_dir).cfg.data.template.format(prompt=PROMPTS[3]), return_tensors="pt"
    )["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            mix = sum(
                w * torch.softmax(m(input_ids=ids).logits[0, -1], -1)
                for w, m in zip(weights, models, strict=True)
            )
            t = int(mix.argmax())
            new.append(t)
            if t == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    assert got.text == tok.decode(new, skip_special_tokens=True)
    assert got.n_new_tokens == len(new)
    # and the mixture differs from each expert alone here (a real mixture, not a copy)
    singles = {pool.generate([PROMPTS[3]], [k], 6)[0].text for k in range(K)}
    assert got.text not in singles or len(singles) < K


def test_stream_joins_to_the_answers_of_generate_sample_and_ensemble(pool):
    """ExpertPool.stream: pieces, then the Generation that generate / sample / ensemble give."""
    for i, k in ((0, 0), (1, 2), (3, 1)):
        *pieces, done = pool.stream(PROMPTS[i], k, 12)
        want = pool.generate([PROMPTS[i]], [k], 12)[0]
        assert done == want and "".join(pieces) == want.text and len(pieces) > 1
    *pieces, done = pool.stream(PROMPTS[1], 0, 8, sampling=(1.0, 0.9, 5))
    assert done == pool.sample(PROMPTS[1], 0, 8, 1.0, 0.9, 5) and "".join(pieces) == done.text
    w = [0.2, 0.5, 0.3]
    *pieces, done = pool.stream(PROMPTS[3], -1, 6, weights=w)
    assert done == pool.ensemble(PROMPTS[3], w, 6) and "".join(pieces) == done.text
    with pytest.raises(ServingError, match="expert"):
        next(pool.stream(PROMPTS[0], K, 4))
    *_, done = pool.stream(PROMPTS[0], 0, 3)  # a stream ended early leaves the pool usable
    assert done.n_new_tokens <= 3 and pool.generate([PROMPTS[0]], [0], 3)[0] == done


def test_a_stream_closed_early_stops_its_generation(pool, monkeypatch):
    """A consumer that stops (a client gone) stops generate at its next token, and the pool's
    lock is free at once: no generation runs on to max_new_tokens under the lock."""
    made = []
    original = pool.model.generate

    def spy(*args, **kwargs):
        out = original(*args, **kwargs)
        made.append(out.shape[1] - kwargs["input_ids"].shape[1])
        return out

    monkeypatch.setattr(pool.model, "generate", spy)
    stream = pool.stream(PROMPTS[0], 0, 400)
    first = [next(stream), next(stream)]
    assert all(isinstance(x, str) for x in first)  # still generating: no EOS yet
    stream.close()
    assert len(made) == 1 and made[0] < 50, made  # not 400
    assert pool.lock.acquire(blocking=False)
    pool.lock.release()


def test_turn_lock_hands_over_in_order_and_is_reentrant():
    """TurnLock: reentrant for its owner; ``give_turn`` lets every thread that waits run, in the
    order they came, before the owner has it back; only the owner may release it."""
    import threading

    from gs_ray.serving.pool import TurnLock

    lock, order = TurnLock(), []
    lock.acquire()
    assert lock.acquire() and lock.waiting() == 0  # reentrant
    lock.release()

    def take(i: int) -> None:
        with lock:
            order.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(3)]
    for i, t in enumerate(threads):
        t.start()
        deadline = time.monotonic() + 30
        while lock.waiting() < i + 1 and time.monotonic() < deadline:
            time.sleep(0.001)
    assert lock.waiting() == 3 and order == []
    assert lock.give_turn() and order == [0, 1, 2]  # all three ran, in turn, before it was back
    assert lock.waiting() == 0 and not lock.give_turn()
    other = threading.Thread(target=lambda: order.append(lock.acquire(blocking=False)))
    other.start()
    other.join()
    assert order[-1] is False  # held by this thread: another one does not get it without waiting
    lock.release()
    with pytest.raises(RuntimeError, match="does not hold it"):
        lock.release()
    for t in threads:
        t.join()


def test_a_long_stream_gives_its_turn_to_the_requests_that_wait(pool, monkeypatch):
    """A stream takes the pool a token at a time: a batch, a sampled answer and an ensemble
    asked for while it runs are answered before it ends (not after its last token), each as
    if alone; and the stream's own answer, seeded, is the one it gives alone (its adapter and
    its random state are its own again after each turn)."""
    import threading

    from gs_ray.serving import pool as pool_module

    n, sampling = 300, (1.0, 0.9, 3)
    *alone, alone_done = pool.stream(PROMPTS[0], 0, n, sampling=sampling)
    assert alone_done.n_new_tokens > 100  # long enough to be running when the others come
    want = (
        pool.generate([PROMPTS[1]], [2], 6)[0],
        pool.sample(PROMPTS[2], 1, 4, 1.0, 0.9, 11),
        pool.ensemble(PROMPTS[3], [0.2, 0.5, 0.3], 4),
    )
    # Each streamed token now takes at least 20 ms (inside its step, holding the pool): the
    # stream lasts seconds, so that the others come while it runs even on a loaded machine.
    put = pool_module._TokenQueue.put

    def slow_put(self, value) -> None:
        time.sleep(0.02)
        put(self, value)

    monkeypatch.setattr(pool_module._TokenQueue, "put", slow_put)
    stream = pool.stream(PROMPTS[0], 0, n, sampling=sampling)
    pieces = [next(stream)]  # its generation runs, holding the pool between two tokens
    got: list = []
    streaming: list[bool] = []

    def others() -> None:
        for _ in range(2):
            got.append(
                (
                    pool.generate([PROMPTS[1]], [2], 6)[0],
                    pool.sample(PROMPTS[2], 1, 4, 1.0, 0.9, 11),
                    pool.ensemble(PROMPTS[3], [0.2, 0.5, 0.3], 4),
                )
            )
            pool.sample(PROMPTS[2], 1, 4, 1.0, 0.9, None)  # unseeded: moves the global RNG
        streaming.append(
            any(t.name == "gs-ray-stream" and t.is_alive() for t in threading.enumerate())
        )

    waiter = threading.Thread(target=others)
    waiter.start()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and got == [want, want]
    assert streaming == [True], "the others waited for the stream's last token"
    *rest, done = list(stream)
    assert done == alone_done and "".join(pieces + rest) == "".join(alone)


def test_a_seeded_request_leaves_the_rng_as_it_was(pool):
    """A seed decides its own request's draws only: the global RNG is restored after."""
    state = torch.get_rng_state()
    a = pool.sample(PROMPTS[1], 0, 6, 1.0, 0.9, seed=7)
    *_, b = pool.stream(PROMPTS[1], 0, 6, sampling=(1.0, 0.9, 7))
    assert torch.equal(torch.get_rng_state(), state) and a == b


def test_sampling_is_reproducible_with_a_seed(pool):
    a = pool.sample(PROMPTS[1], 0, 10, 1.0, 0.9, seed=7)
    b = pool.sample(PROMPTS[1], 0, 10, 1.0, 0.9, seed=7)
    others = {pool.sample(PROMPTS[1], 0, 10, 1.0, 0.9, seed=s).text for s in range(8, 12)}
    assert a == b
    assert len(others | {a.text}) > 1  # it does sample


def _client(url: str):
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.ray
def test_openai_client_completions_chat_stream_models(served, run_dir, reference, pool):
    """The official openai client against the app: answers equal each expert alone (plain
    peft), routed like the router; streaming joins to the same text; models lists them all."""
    client = _client(served)
    ids = {m.id for m in client.models.list().data}
    assert ids == {"gs-ray", "gs-ray/ensemble"} | {f"gs-ray/expert-{k}" for k in range(K)}
    router = ServedRun.open(run_dir).router()
    probs = router.predict_proba(PROMPTS)
    for i in (0, 1, 2):
        k = int(probs[i].argmax())
        r = client.completions.create(
            model="gs-ray", prompt=PROMPTS[i], max_tokens=12, temperature=0
        )
        assert r.choices[0].text == reference[i, k], i
        assert r.model_extra["gs_ray"]["expert"] == k
        assert r.model_extra["gs_ray"]["probs"] == pytest.approx(probs[i].tolist(), abs=1e-5)
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        c = client.chat.completions.create(
            model="gs-ray",
            messages=[{"role": "user", "content": PROMPTS[i]}],
            max_tokens=12,
            temperature=0,
        )
        assert c.choices[0].message.content == reference[i, k] and c.object == "chat.completion"
    r = client.completions.create(
        model="gs-ray/expert-2", prompt=PROMPTS[0], max_tokens=12, temperature=0
    )
    assert r.choices[0].text == reference[0, 2] and r.model_extra["gs_ray"]["expert"] == 2
    # streaming, both routes
    k = int(probs[1].argmax())
    chunks = list(
        client.completions.create(
            model="gs-ray", prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == reference[1, k]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    chunks = list(
        client.chat.completions.create(
            model="gs-ray/expert-0",
            messages=[{"role": "user", "content": PROMPTS[2]}],
            max_tokens=12,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference[2, 0]
    assert chunks[0].choices[0].delta.role == "assistant"
    # stop sequences cut the text; a seed makes sampling reproducible
    full = reference[0, 1]
    stop = full.strip()[2:4]
    r = client.completions.create(
        model="gs-ray/expert-1", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    a, b = (
        client.completions.create(
            model="gs-ray/expert-0",
            prompt=PROMPTS[1],
            max_tokens=8,
            temperature=1.0,
            top_p=0.9,
            seed=5,
        )
        for _ in range(2)
    )
    assert a.choices[0].text == b.choices[0].text
    assert a.choices[0].text == pool.sample(PROMPTS[1], 0, 8, 1.0, 0.9, 5).text
    # the ensemble: all experts weighted by the router's probabilities
    e = client.completions.create(
        model="gs-ray/ensemble", prompt=PROMPTS[3], max_tokens=6, temperature=0
    )
    w = e.model_extra["gs_ray"]["probs"]
    assert e.choices[0].text == pool.ensemble(PROMPTS[3], w, 6).text
    assert e.model_extra["gs_ray"]["routed_by"] == "ensemble"
    # /v1/route
    status, out = _http(f"{served}/v1/route", {"prompt": PROMPTS[0]})
    assert status == 200 and out["expert"] == int(probs[0].argmax())


@pytest.mark.ray
def test_openai_stream_is_token_by_token(served, reference):
    """Streaming sends the answer as it is generated: several text chunks (about one per
    token) that join to the non-streamed greedy answer, usage on the finish chunk (and on a
    chunk of its own with stream_options.include_usage), stop strings cut as without streaming;
    and the first text arrives long before the last on a long answer."""
    client = _client(served)
    for i, k in ((1, 0), (2, 1), (4, 2)):
        chunks = list(
            client.completions.create(
                model=f"gs-ray/expert-{k}",
                prompt=PROMPTS[i],
                max_tokens=12,
                temperature=0,
                stream=True,
            )
        )
        texts = [c.choices[0].text for c in chunks if c.choices[0].text]
        assert "".join(texts) == reference[i, k] and len(texts) >= 4, texts
        assert chunks[-1].usage.completion_tokens <= 12 and chunks[-1].choices[0].finish_reason
    chunks = list(
        client.chat.completions.create(
            model="gs-ray/expert-1",
            messages=[{"role": "user", "content": PROMPTS[0]}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    texts = [c.choices[0].delta.content for c in chunks[:-1] if c.choices[0].delta.content]
    assert "".join(texts) == reference[0, 1] and len(texts) >= 4
    full = reference[0, 1]
    stop = full.strip()[2:4]
    chunks = list(
        client.completions.create(
            model="gs-ray/expert-1",
            prompt=PROMPTS[0],
            max_tokens=12,
            temperature=0,
            stop=[stop],
            stream=True,
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == full[: full.find(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    # a streamed request that cannot be served gets its 400 before any event
    status, out = _http(
        f"{served}/v1/completions",
        {"model": "gs-ray/expert-0", "stream": True, "prompt": "word " * 2000},
    )
    _assert_openai_error(status, out, 400, "prompt")
    assert out["error"]["code"] == "context_length_exceeded"
    # arrival times of the text chunks of a long answer, read off the wire
    body = {
        "model": "gs-ray/expert-0",
        "prompt": PROMPTS[2],
        "max_tokens": 160,
        "temperature": 0,
        "stream": True,
    }
    req = urllib.request.Request(
        f"{served}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start, arrivals = time.perf_counter(), []
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                arrivals.append(time.perf_counter() - start)
    assert len(arrivals) >= 20, len(arrivals)
    assert arrivals[0] < 0.5 * arrivals[-1], (arrivals[0], arrivals[-1])


def _raw(url: str, data: bytes, timeout: float = 60) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode("utf-8", "replace")


def _assert_openai_error(status, out, code, param):
    assert status == code, out
    assert set(out) == {"error"} and set(out["error"]) == {"message", "type", "param", "code"}
    assert out["error"]["param"] == param, out


OPENAI_BAD = [  # (route, body, status, param)
    ("completions", {"model": "gs-ray", "prompt": ""}, 400, "prompt"),
    ("completions", {"model": "gs-ray"}, 400, "prompt"),
    ("completions", {"model": "gs-ray", "prompt": "  \n"}, 400, "prompt"),
    ("completions", {"model": "gs-ray", "prompt": 5}, 400, "prompt"),
    ("completions", {"model": "gs-ray", "prompt": "hi", "max_tokens": "8"}, 400, "max_tokens"),
    ("completions", {"model": "gs-ray", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": "gs-ray", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens"),
    ("completions", {"model": "gs-ray", "prompt": "hi", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": "gs-ray", "prompt": "hi", "n": 2}, 400, "n"),
    ("completions", {"model": "gs-ray", "prompt": "word " * 2000}, 400, "prompt"),
    ("completions", {"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ("completions", {"model": f"gs-ray/expert-{K}", "prompt": "hi"}, 404, "model"),
    ("chat/completions", {"model": "gs-ray", "messages": []}, 400, "messages"),
    (
        "chat/completions",
        {"model": "gs-ray", "messages": [{"role": "user"}]},
        400,
        "messages.0.content",
    ),
    ("chat/completions", {"model": "gs-ray", "messages": "hi"}, 400, "messages"),
]


@pytest.mark.ray
def test_openai_bad_inputs_get_4xx_in_openai_shape(served):
    import openai

    for route, body, code, param in OPENAI_BAD:
        status, out = _http(f"{served}/v1/{route}", body)
        _assert_openai_error(status, out, code, param)
    for route in ("completions", "chat/completions"):
        status, out = _raw(f"{served}/v1/{route}", b'{"model": "gs-ray", "prompt": ')
        _assert_openai_error(status, out, 400, None)
        assert out["error"]["code"] == "invalid_json"
    with pytest.raises(openai.NotFoundError):
        _client(served).completions.create(model="nope", prompt="hi")
    with pytest.raises(openai.BadRequestError):
        _client(served).completions.create(model="gs-ray", prompt="hi", max_tokens=0)


@pytest.mark.ray
def test_openai_bounded_load_no_5xx_nothing_lost(served, pool):
    """200 requests at concurrency 8 (completions, chat, models, route, bad ones), 240 s cap:
    no 5xx, every valid answer equals the pool's answer for its own prompt (so none is lost,
    swapped or duplicated), every bad one its 4xx."""
    rng = random.Random(13)
    cases = []
    for j in range(200):
        kind = rng.choice(["cmpl", "cmpl", "chat", "models", "route", "bad"])
        k = rng.randrange(K)
        prompt = f"{PROMPTS[j % len(PROMPTS)]} (request {j})"
        if kind == "cmpl":
            cases.append(
                (
                    kind,
                    "completions",
                    {
                        "model": f"gs-ray/expert-{k}",
                        "prompt": prompt,
                        "max_tokens": 4,
                        "temperature": 0,
                    },
                    k,
                )
            )
        elif kind == "chat":
            cases.append(
                (
                    kind,
                    "chat/completions",
                    {
                        "model": f"gs-ray/expert-{k}",
                        "max_tokens": 4,
                        "messages": [{"role": "user", "content": prompt}],
                        "temperature": 0,
                    },
                    k,
                )
            )
        elif kind == "route":
            cases.append((kind, "route", {"prompt": prompt}, None))
        elif kind == "models":
            cases.append((kind, "models", None, None))
        else:
            cases.append((kind, *rng.choice(OPENAI_BAD)[:2], None))

    def ask(case):
        return _http(f"{served}/v1/{case[1]}", case[2], timeout=120)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as ex:
        answers = list(ex.map(ask, cases))
    assert time.perf_counter() - start < 240
    assert all(status < 500 for status, _ in answers), [a for a in answers if a[0] >= 500]
    gen = [(c, a) for c, a in zip(cases, answers, strict=True) if c[0] in ("cmpl", "chat")]
    prompts = [c[2].get("prompt") or c[2]["messages"][0]["content"] for c, _ in gen]
    expected = pool.generate(prompts, [c[3] for c, _ in gen], 4)
    ids = set()
    for ((kind, _, _, k), (status, out)), want in zip(gen, expected, strict=True):
        assert status == 200, out
        text = (
            out["choices"][0]["text"]
            if kind == "cmpl"
            else (out["choices"][0]["message"]["content"])
        )
        assert text == want.text and out["gs_ray"]["expert"] == k
        ids.add(out["id"])
    assert len(ids) == len(gen)
    for (kind, _, _, _), (status, out) in zip(cases, answers, strict=True):
        if kind == "bad":
            assert 400 <= status < 500 and "error" in out, out
        elif kind in ("models", "route"):
            assert status == 200, out


def test_int8_router_agrees_with_the_float_router(tmp_path):
    """serve.router_int8 (router.kind: encoder): the quantised encoder routes (nearly) as the
    float one on 150 held-out demo prompts of three domains, with probabilities close."""
    from gs_ray.config import RouterConfig
    from gs_ray.data.demo import build_demo_corpus
    from gs_ray.routing.router import load_router, make_router

    def domain_rows(seed, n):
        return [r for r in build_demo_corpus(900, seed=seed) if r["domain"] in DOMAINS][:n]

    train = domain_rows(6, 300)
    fitted = make_router(RouterConfig(kind="encoder"), len(DOMAINS), 0).fit(
        [r["instruction"] for r in train], [DOMAINS.index(r["domain"]) for r in train]
    )
    fitted.save(tmp_path / "router")

    def router():
        return load_router(tmp_path / "router")

    texts = [r["instruction"] for r in domain_rows(5, 150)]
    float_p = router().predict_proba(texts)
    int8 = router().quantize()
    int8_p = int8.predict_proba(texts)
    agree = (float_p.argmax(1) == int8_p.argmax(1)).mean()
    assert agree >= 0.98, agree
    assert abs(float_p - int8_p).max() < 0.2
    assert any("quantized" in type(m).__module__ for m in int8.encoder.model.modules())
    # keep_float: the layers it names stay float, the others are quantised
    partial = router().quantize(r"layer\.\d+\.output\.dense")
    mods = dict(partial.encoder.model.named_modules())
    assert type(mods["encoder.layer.0.output.dense"]) is torch.nn.Linear
    assert "quantized" in type(mods["encoder.layer.0.intermediate.dense"]).__module__
    assert "quantized" in type(mods["encoder.layer.0.attention.output.dense"]).__module__
    # the shared float encoder is untouched
    assert not any("quantized" in type(m).__module__ for m in router().encoder.model.modules())


KEY = "s3cret-test-key"
BATCH_KEY = "batch-client-key-0123456789"  # a client of serve.api_keys_file, one request at once


@pytest.fixture(scope="module")
def keyed(served, run_dir, tmp_path_factory):
    """A second ingress on the running Serve, at /keyed, with serve.api_key set and a keys
    file with a second client (``batch``, one request in progress at once): it reuses the
    served app's router and experts replicas (their handles), so no model loads twice. One for
    the module's key tests; test_serve_shuts_down_cleanly stops it with the rest of Serve."""
    from ray import serve

    from gs_ray.config import ServeConfig
    from gs_ray.serving.app import APP_NAME, Ingress
    from gs_ray.serving.gate import client_keys

    handles = [
        serve.get_deployment_handle(d, APP_NAME) for d in ("RouterDeployment", "ExpertsDeployment")
    ]
    keys_file = tmp_path_factory.mktemp("keyed") / "api_keys"
    keys_file.write_text(f"batch {BATCH_KEY} in_flight=1\n")
    keys_file.chmod(0o600)
    cfg = ServeConfig(api_key=KEY, api_keys_file=str(keys_file))
    app = Ingress.options(ray_actor_options={"num_cpus": 0.1}).bind(
        *handles, ServedRun.open(run_dir).info(), cfg, client_keys(cfg)
    )
    serve.run(app, name="gs-ray-keyed", route_prefix="/keyed")
    yield f"{served}/keyed"
    with contextlib.suppress(Exception):  # gone with Serve (test_serve_shuts_down_cleanly)
        serve.delete("gs-ray-keyed")


@pytest.mark.ray
def test_http_api_key_401_without_it(keyed):
    """With serve.api_key set: no key, a wrong key or another scheme get 401 in OpenAI's shape
    on every route; the right key is served (the openai client included); /healthz stays open."""
    import openai

    bodies = {
        "/v1/models": None,
        "/info": None,
        "/route": {"prompt": PROMPTS[0]},
        "/v1/route": {"prompt": PROMPTS[0]},
        "/generate": {"prompt": PROMPTS[0], "max_new_tokens": 2},
        "/v1/completions": {"model": "gs-ray", "prompt": PROMPTS[0], "max_tokens": 2},
        "/v1/chat/completions": {
            "model": "gs-ray",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": PROMPTS[0]}],
        },
    }
    for path, body in bodies.items():
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": f"Basic {KEY}"},
            {"Authorization": KEY},
        ):
            status, out = _http(f"{keyed}{path}", body, headers=headers)
            _assert_openai_error(status, out, 401, None)
            assert out["error"]["type"] == "authentication_error", out
            assert out["error"]["code"] == "invalid_api_key", out
        status, out = _http(f"{keyed}{path}", body, headers={"Authorization": f"Bearer {KEY}"})
        assert status == 200, (path, out)
    assert _http(f"{keyed}/healthz") == (200, "ok")
    for path in ("/docs", "/openapi.json", "/redoc", "/nowhere"):  # the docs too, before a 404
        status, out = _http(f"{keyed}{path}")
        assert status == 401 and out["error"]["code"] == "invalid_api_key", (path, out)
    client = openai.OpenAI(base_url=f"{keyed}/v1", api_key=KEY, max_retries=0, timeout=120)
    r = client.completions.create(
        model="gs-ray/expert-0", prompt=PROMPTS[1], max_tokens=4, temperature=0
    )
    assert r.choices[0].text and r.model_extra["gs_ray"]["expert"] == 0
    chunks = list(
        client.completions.create(
            model="gs-ray/expert-0", prompt=PROMPTS[1], max_tokens=4, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    bad = openai.OpenAI(base_url=f"{keyed}/v1", api_key="wrong", max_retries=0, timeout=120)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="gs-ray", prompt=PROMPTS[1], max_tokens=4, stream=True)


@pytest.mark.ray
def test_http_a_client_over_its_share_gets_429_and_the_others_are_served(keyed):
    """Over HTTP, on the deployed app: the keys file's ``batch`` client (in_flight=1) holding
    a stream open gets 429 (OpenAI's rate-limit shape, Retry-After) for a second request, while
    the default client is served; when its stream ends, its slot is back."""
    import http.client
    import urllib.parse

    def completion(key: str, stream: bool = False):
        parts = urllib.parse.urlsplit(keyed)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        body = {"model": "gs-ray", "prompt": PROMPTS[0], "max_tokens": 500, "stream": stream}
        conn.request(
            "POST",
            parts.path + "/v1/completions",
            body=json.dumps(body if stream else {**body, "max_tokens": 2}),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        return conn, conn.getresponse()

    conn, held = completion(BATCH_KEY, stream=True)
    try:
        assert held.status == 200 and held.readline().startswith(b"data: ")  # streaming
        second, refused = completion(BATCH_KEY)
        out = json.loads(refused.read())
        second.close()
        assert refused.status == 429 and refused.getheader("Retry-After") == "1", out
        assert out["error"]["code"] == "rate_limit_exceeded", out
        assert "serve.client_max_in_flight" in out["error"]["message"]
        other, served = completion(KEY)
        assert served.status == 200 and json.loads(served.read())["choices"]
        other.close()
    finally:
        conn.close()  # the stream's client goes away: its generation stops, its slot is freed
    for _ in range(50):
        again, answer = completion(BATCH_KEY)
        status = answer.status
        answer.read()
        again.close()
        if status == 200:
            break
        time.sleep(0.2)
    assert status == 200


ABUSE_EXPECTED = {
    "body_over_limit": {"413", "-1"},
    "prompt_over_limit": {"400"},
    "max_tokens_over_limit": {"400"},
    "temperature_underflow": {"400"},
    "seed_out_of_range": {"400"},
    "too_many_stops": {"400"},
    "foreign_host": {"400"},
    "broken_json": {"400"},
    "stream_hangs_up": {"200"},
    "stream_long": {"200"},
}


@pytest.mark.ray
def test_serve_abuse_benchmark_smoke(served, run_dir, tmp_path):
    """benchmarks/serve_abuse.py --smoke against the running server: every valid request
    answered, every abusive kind refused with its own 4xx (or a stream that hangs up), no 5xx,
    and its JSON written."""
    serve_abuse = load_benchmark("serve_abuse")
    out = serve_abuse.main(
        [
            "--url",
            served,
            "--serve-run-dir",
            str(run_dir),
            "--smoke",
            "--json",
            str(tmp_path / "abuse.json"),
        ]
    )
    assert out["valid_non_200"] == 0 and out["errors_5xx"] == 0, out
    assert out["within_time_limit"]
    assert out["abusive_statuses"].keys() == ABUSE_EXPECTED.keys(), out
    for kind, counts in out["abusive_statuses"].items():
        assert set(counts) <= ABUSE_EXPECTED[kind], (kind, counts)
    assert json.loads((tmp_path / "abuse.json").read_text())["p99_ratio"] > 0


@pytest.mark.ray
def test_serve_latency_benchmark_smoke(served, run_dir, tmp_path):
    """benchmarks/serve_latency.py --smoke against the running server (``--url``: no Ray of its
    own): the router in process, completions at concurrency 1 and 8, streams and the ensemble,
    all answered 200, and its JSON written."""
    serve_latency = load_benchmark("serve_latency")
    out_file = tmp_path / "latency.json"
    argv = ["--run-dir", str(run_dir), "--url", served, "--smoke", "--json", str(out_file)]
    out = serve_latency.main(argv)
    assert out["errors_5xx"] == 0 and out["non_200"] == 0, out
    assert json.loads(out_file.read_text()) == json.loads(json.dumps(out))
    for key in ("router_p50_ms", "completion_p50_ms_c8", "stream_first_chunk_p50_ms"):
        assert out[key] > 0, key
    assert 0 <= out["router_int8_agreement"] <= 1
    assert out["ensemble_over_single_latency"] > 0 and out["requests"] == 4


@pytest.mark.ray
def test_serve_shuts_down_cleanly(served):
    """Last in the module: after the load above, serve.shutdown() stops the app and frees the
    port (no listener left on 127.0.0.1) within 60 s."""
    import socket

    from ray import serve

    port = int(served.rsplit(":", 1)[1])
    assert _http(f"{served}/healthz")[0] == 200
    serve.shutdown()
    deadline = time.time() + 60
    while time.time() < deadline:
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break
        time.sleep(1)
    else:
        pytest.fail(f"port {port} still accepts connections 60 s after serve.shutdown()")


def test_chat_uses_the_models_chat_template_else_the_runs(pool):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": PROMPTS[0]}]
    assert pool.tokenizer.chat_template is None  # the tiny model has none: the run's template
    assert pool.render(msgs) == pool.cfg.data.template.format(prompt=f"Be brief.\n\n{PROMPTS[0]}")
    template = (
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    pool.tokenizer.chat_template = template
    try:
        text = f"<|system|>Be brief.\n<|user|>{PROMPTS[0]}\n<|assistant|>"
        assert pool.render(msgs) == text
        got = pool.generate([msgs], [1], 6)[0]
        ids = pool.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            pool.model.set_adapter("expert_1")
            out = pool.model.generate(
                **ids, max_new_tokens=6, do_sample=False, pad_token_id=pool.tokenizer.pad_token_id
            )
        new = out[0, ids["input_ids"].shape[1] :].tolist()
        eos = pool.tokenizer.eos_token_id
        new = new[: new.index(eos)] if eos in new else new
        assert got.text == pool.tokenizer.decode(new, skip_special_tokens=True)
    finally:
        pool.tokenizer.chat_template = None


# --------------------------------------------------------------------------- issue 26: export


def test_model_cards_and_the_export_bundle(run_dir, tmp_path):
    """gs-ray export: a model card in every adapter folder; a bundle that plain peft loads (the
    same weights), whose router routes as the run's, that serving opens, with configs for Ray
    Serve and vLLM, SHA-256 of every file, and no secret of the run."""
    import hashlib
    import shutil

    import yaml
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gs_ray.cli import main
    from gs_ray.export import BUNDLE_JSON, BundleRouter, adapter_facts, write_model_cards
    from gs_ray.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["config"]["serve"]["api_key"] = "never-in-a-bundle"
    (run / "manifest.json").write_text(json.dumps(manifest))
    # clusters for the cards: the demo rows of the router's domains, cluster = domain
    from gs_ray.data.demo import build_demo_corpus

    rows = [r for r in build_demo_corpus(600, seed=0) if r["domain"] in DOMAINS][:120]
    ids = [f"d{i}" for i in range(len(rows))]
    RunDir(run).write_jsonl(
        RunDir(run).assignments_path,
        [
            {
                "id": i,
                "split": "test" if n % 10 == 0 else "train",
                "domain": r["domain"],
                "cluster": DOMAINS.index(r["domain"]),
            }
            for n, (i, r) in enumerate(zip(ids, rows))
        ],
    )
    prompts = {i: r["instruction"] for i, r in zip(ids, rows, strict=True)}

    cards = write_model_cards(run, prompts)
    assert len(cards) == K and all(c.name == "README.md" for c in cards)
    text = cards[1].read_text()
    assert text.startswith("---\nbase_model:") and "library_name: peft" in text
    assert "gs-ray/expert-1" in text and "gradient cluster 1" in text
    assert f"{DOMAINS[1]} " in text and "Top terms" in text and "demo corpus" in text
    assert "Not measured yet" in text
    facts = adapter_facts(RunDir(run), prompts)
    assert facts[1].domains == {
        DOMAINS[1]: sum(1 for n, r in enumerate(rows) if r["domain"] == DOMAINS[1] and n % 10)
    }
    assert len(facts[1].top_terms) > 3

    out = tmp_path / "bundle"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(out)]) == 2  # never over an existing folder
    info = json.loads((out / BUNDLE_JSON).read_text())
    assert [a["model"] for a in info["adapters"]] == [expert_model(k) for k in range(K)]
    for rel, digest in info["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == digest, rel
    assert "never-in-a-bundle" not in "".join(
        p.read_text(errors="replace")
        for p in out.rglob("*")
        if p.is_file() and p.suffix in (".json", ".yaml", ".sh", ".py", ".md", ".jsonl")
    )
    assert (out / "experts" / "expert_1" / "README.md").read_text() == text  # the run's card
    # plain peft, the same weights
    base = AutoModelForCausalLM.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "experts" / "expert_1")
    want = load_file(run / "experts" / "expert_1" / "adapter_model.safetensors")
    got = {k: v for k, v in model.state_dict().items() if "lora_B" in k}
    assert len(got) == sum("lora_B" in k for k in want) > 0
    assert all(any(torch.equal(v, w) for w in want.values()) for v in got.values())
    # the router routes as the run's did; serving opens the bundle
    texts = [r["instruction"] for r in build_demo_corpus(60, seed=9)]
    assert BundleRouter(out).route(texts) == BundleRouter(run).route(texts)
    assert ServedRun.open(out).n_experts == K
    serve_cfg = yaml.safe_load((out / "serve_config.yaml").read_text())
    assert serve_cfg["applications"][0]["args"]["run_dir"] == str(out.resolve())
    vllm = (out / "serve_vllm.sh").read_text()
    assert "--enable-lora" in vllm and all(
        f"{expert_model(k)}={(out / 'experts' / f'expert_{k}').resolve()}" in vllm for k in range(K)
    )
