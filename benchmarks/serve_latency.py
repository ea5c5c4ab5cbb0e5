"""Serving latency over HTTP of a finished run: the router at batch 1, completions through the
OpenAI route at concurrency 1 and 8, and the ensemble against the routed single expert.

One process starts a local Ray (127.0.0.1), deploys the app with ``serve.run`` (or, with
``--url``, uses a server already running) and measures:

* ``router_p50_ms`` / ``router_p99_ms``: the router in process, one prompt at a time, float
  encoder; ``router_int8_p50_ms`` / ``router_int8_p99_ms`` and ``router_int8_agreement`` (share
  of prompts routed as the float router) with ``serve.router_int8``'s quantised encoder;
* ``completion_p50_ms`` / ``completion_p99_ms`` / ``completion_rps`` at concurrency 1, and the
  same with ``_c8`` at concurrency 8 (``POST /v1/completions``, model ``gs-ray``, greedy);
* ``stream_first_chunk_p50_ms`` / ``stream_total_p50_ms``: the same completions streamed
  (``stream: true``) one at a time, time to the first text chunk and to the end;
* ``ensemble_over_single_latency``: p50 of ``gs-ray/ensemble`` over p50 of ``gs-ray`` at
  concurrency 1; ``errors_5xx``: 5xx answers seen in all of it (expected 0).

    python benchmarks/serve_latency.py --run-dir runs/<run> --json benchmarks/results/latency.json
    python benchmarks/serve_latency.py --run-dir runs/<run> --url http://127.0.0.1:8000 --smoke

``--url`` measures a server already serving the run instead of deploying it here. ``--smoke``
(seconds; the suite runs it against test_serving's server) sends 4 completions of 4 tokens per
setting and routes 12 prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOKE = {"requests": 4, "router_prompts": 12, "max_tokens": 4}  # --smoke: seconds


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, float]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    return status, 1000 * (time.perf_counter() - start)


def _stream(url: str, body: dict, timeout: float = 300) -> tuple[int, float, float]:
    """A streamed completion: status, ms to the first text chunk, ms to ``data: [DONE]``."""
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    start, first = time.perf_counter(), None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            for line in r:
                chunk = json.loads(line[6:]) if line.startswith(b"data: {") else {}
                if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    first = 1000 * (time.perf_counter() - start)
            status = r.status
    except urllib.error.HTTPError as e:
        status = e.code
    total = 1000 * (time.perf_counter() - start)
    return status, total if first is None else first, total


def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[int], list[float], float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as ex:
        out = list(ex.map(lambda b: _post(url, b), bodies))
    wall = time.perf_counter() - start
    return [s for s, _ in out], [ms for _, ms in out], wall


def measure_http(url: str, bodies: list[dict], results: dict) -> None:
    """The completions, streams and ensemble against ``url`` (a server's
    ``/v1/completions``); their figures go into ``results``."""
    _load(url, bodies[:2], 1)  # warm-up
    statuses: list[int] = []
    for c, suffix in ((1, ""), (8, "_c8")):
        st, ms, wall = _load(url, bodies, c)
        statuses += st
        results[f"completion_p50_ms{suffix}"] = statistics.median(ms)
        results[f"completion_p99_ms{suffix}"] = _pct(ms, 0.99)
        results[f"completion_rps{suffix}"] = len(bodies) / wall
    streamed = [_stream(url, {**b, "stream": True}) for b in bodies[: max(1, len(bodies) // 2)]]
    statuses += [st for st, _, _ in streamed]
    results["stream_first_chunk_p50_ms"] = statistics.median(f for _, f, _ in streamed)
    results["stream_total_p50_ms"] = statistics.median(t for _, _, t in streamed)
    ens = [{**b, "model": "gs-ray/ensemble"} for b in bodies[: max(4, len(bodies) // 4)]]
    st, ms, _ = _load(url, ens, 1)
    statuses += st
    results["ensemble_p50_ms"] = statistics.median(ms)
    results["ensemble_over_single_latency"] = (
        results["ensemble_p50_ms"] / results["completion_p50_ms"]
    )
    results["errors_5xx"] = sum(s >= 500 for s in statuses)
    results["non_200"] = sum(s != 200 for s in statuses)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished gs-ray run")
    parser.add_argument("--url", help="a server already serving --run-dir (its base URL)")
    parser.add_argument("--requests", type=int, default=32, help="completions per setting")
    parser.add_argument("--router-prompts", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    import torch

    from gs_ray.core.models import load_tokenizer
    from gs_ray.data import load_samples
    from gs_ray.serving.pool import ServedRun

    run = ServedRun.open(args.run_dir)
    samples, _ = load_samples(run.cfg.data, load_tokenizer(run.base_path()), run.cfg.run.seed)
    rng = random.Random(args.seed)
    prompts = [s.prompt for s in rng.sample(samples, min(len(samples), args.router_prompts))]

    # the router, in process, one prompt at a time, on one thread (the router replica's share)
    torch.set_num_threads(1)
    results: dict = {}
    for label, router in (("router", run.router()), ("router_int8", run.router().quantize())):
        for p in prompts[:5]:
            router.predict_proba([p])
        times, routes = [], []
        for p in prompts:
            start = time.perf_counter()
            routes.append(int(router.predict_proba([p])[0].argmax()))
            times.append(1000 * (time.perf_counter() - start))
        results[f"{label}_p50_ms"] = statistics.median(times)
        results[f"{label}_p99_ms"] = _pct(times, 0.99)
        results[f"{label}_routes"] = routes
    a, b = results.pop("router_routes"), results.pop("router_int8_routes")
    results["router_int8_agreement"] = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)

    bodies = [
        {"model": "gs-ray", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0}
        for p in prompts[: args.requests]
    ]
    if args.url:
        measure_http(f"{args.url.rstrip('/')}/v1/completions", bodies, results)
    else:
        import ray
        from ray import serve

        from gs_ray.local_ray import free_port
        from gs_ray.serving.app import APP_NAME, app_for_run, serve_config_for

        port = free_port()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            cfg = serve_config_for(args.run_dir)
            serve.run(app_for_run(args.run_dir, cfg), name=APP_NAME, route_prefix="/")
            measure_http(f"http://127.0.0.1:{port}/v1/completions", bodies, results)
        finally:
            serve.shutdown()
            ray.shutdown()
    results.update(
        requests=args.requests,
        max_tokens=args.max_tokens,
        n_experts=run.n_experts,
        cpus=os.cpu_count(),
        smoke=args.smoke,
    )
    print(json.dumps(results, indent=2))
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), results)
    return results


if __name__ == "__main__":
    main()
