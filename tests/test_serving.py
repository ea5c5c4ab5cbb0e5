"""Serving: the expert pool against each expert loaded alone with plain peft, and the Ray Serve
application deployed with `ray job submit -- python jobs/serve.py ... --detach` and queried over
HTTP on 127.0.0.1 (routes equal the router's, answers equal the pool's, bad requests name the
field, a bounded burst of concurrent requests is batched and answered exactly).

The run directory is built here in seconds (a tiny base model, three LoRA experts with distinct
random weights, a router trained on three domains of the demo corpus), not by the pipeline: what
is tested is serving, and the pipeline's own run directory is tested in test_pipeline.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from gs_ray.config import Config
from gs_ray.serving.pool import ExpertPool, ServedRun, ServingError

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
    from gs_ray.routing.router import fit_router
    from gs_ray.rundir import RunDir

    cfg = Config()
    cfg.run.output_dir = str(tmp_path_factory.mktemp("served"))
    cfg.run.name = "served"
    cfg.lora.r, cfg.lora.alpha = 8, 16
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
    rows = [r for r in build_demo_corpus(600, seed=0) if r["domain"] in DOMAINS]
    texts = [r["instruction"] for r in rows]
    labels = [DOMAINS.index(r["domain"]) for r in rows]
    router, _ = fit_router(texts, labels, K, cfg.router, seed=0)
    router.save(run.router)
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
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)  # fmt: skip
    new = out[0, ids["input_ids"].shape[1] :].tolist()
    if tok.eos_token_id in new:
        new = new[: new.index(tok.eos_token_id)]
    return tok.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(run_dir) -> dict[tuple[int, int], str]:
    """(prompt index, expert) -> the answer of that expert alone, 12 new tokens."""
    return {(i, k): _alone(run_dir, k, p, 12) for i, p in enumerate(PROMPTS) for k in range(K)}


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


def test_open_names_what_is_missing(run_dir, tmp_path):
    import shutil

    with pytest.raises(ServingError, match="not a gs-ray run directory"):
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


# --------------------------------------------------------------------------- Ray Serve over HTTP


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(ray_cluster, run_dir):
    """`ray job submit -- python jobs/serve.py RUN --detach`: the job deploys and ends, Serve
    keeps serving; shut down at the end of the module (before any Train/Tune test runs)."""
    from ray import serve

    from gs_ray.ray_utils import free_port

    port = free_port()
    cmd = [
        str(Path(sys.executable).with_name("ray")), "job", "submit",
        "--address", ray_cluster.dashboard_url, "--working-dir", str(ROOT), "--",
        "python", "jobs/serve.py", str(run_dir), "--detach", "--serve.port", str(port),
        "--serve.batch_wait_s", "0.2", "--serve.expert_cpus", "0.5",
        "--serve.router_cpus", "0.25",
    ]  # fmt: skip
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
    status, out = _http(f"{served}/generate", {"prompt": PROMPTS[0], "expert": 2,
                                               "max_new_tokens": 12})  # fmt: skip
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
        return _http(f"{served}/generate",
                     {"prompt": PROMPTS[i], "expert": k, "max_new_tokens": 12}, timeout=60)  # fmt: skip

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=10) as ex:
        answers = list(ex.map(ask, jobs))
    assert time.perf_counter() - start < 300
    for (i, k), (status, out) in zip(jobs, answers, strict=True):
        assert status == 200, out
        assert out["text"] == reference[i, k], (i, k)
    stats = serve.get_deployment_handle("ExpertsDeployment", APP_NAME).stats.remote().result()
    assert max(stats["batch_sizes"]) > 1 and stats["requests"] >= len(jobs)


def test_serve_throughput_benchmark_runs(run_dir, tmp_path):
    """The benchmark's three variants agree on every answer and its JSON has the ratios."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "serve_throughput", ROOT / "benchmarks" / "serve_throughput.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_file = tmp_path / "serve.json"
    argv = ["--run-dir", str(run_dir), "--requests", "9", "--batch", "4",
            "--max-new-tokens", "5", "--json", str(out_file)]  # fmt: skip
    bench.main(argv)
    out = json.loads(out_file.read_text())
    assert out["identical_answers"] is True and out["requests"] == 9
    assert out["speedup_mixed_vs_one"] > 0 and out["speedup_mixed_vs_grouped"] > 0
