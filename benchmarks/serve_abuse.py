"""Valid requests' latency with abusive ones mixed in: does a hostile client slow the others?

Two phases against one running server, the same valid completions (``POST /v1/completions``,
greedy, model ``gs-ray``) at the same concurrency:

* **alone**: the valid requests only;
* **with abuse**: the same valid requests while as many threads again send abusive ones: bodies
  over ``serve.max_body_bytes`` (413), prompts over ``serve.max_prompt_chars``, ``max_tokens``
  over the limit, a sampler-breaking ``temperature``, a seed out of range, too many stop strings,
  a foreign ``Host`` header, broken JSON (4xx, each refused before the models run), and streams
  that ask for ``max_tokens`` at the limit and hang up after their first chunk (the server must
  stop generating for them).

It reports each phase's p50 and p99 in ms, ``p99_ratio`` (with abuse / alone), the abusive
requests' status codes by kind, and ``valid_non_200`` and ``errors_5xx`` (expected 0). Bounded
in count and time (``--time-limit``). Against a server already running (``--url``), or a run it
deploys itself on a local Ray (``--run-dir``)::

    python benchmarks/serve_abuse.py --run-dir runs/<run> --json benchmarks/results/abuse.json
    python benchmarks/serve_abuse.py --url http://127.0.0.1:8000 --smoke

``--smoke`` runs a handful of requests (seconds): the suite runs it so that it cannot rot.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Write a Python function that returns the largest element of a list.",
    "Tell a short story about a lighthouse keeper.",
    "What is 15% of 80?",
    "Explain what a hash map is in one sentence.",
    "Name three primary colours.",
]


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def _send(
    url: str,
    path: str,
    body: bytes,
    headers: dict | None = None,
    hang_up_after_first_chunk: bool = False,
    timeout: float = 300,
) -> tuple[int, float]:
    """One POST over a fresh connection: (status, ms). ``hang_up_after_first_chunk`` reads one
    line of a streamed answer, then closes the socket (a client that went away)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request(
            "POST",
            parts.path.rstrip("/") + path,
            body=body,
            headers={"Content-Type": "application/json", **(headers or {})},
        )
        r = conn.getresponse()
        if hang_up_after_first_chunk and r.status == 200:
            r.fp.readline()
        else:
            r.read()
        return r.status, 1000 * (time.perf_counter() - start)
    except (ConnectionError, http.client.HTTPException, OSError):
        return -1, 1000 * (time.perf_counter() - start)  # the server closed on us (a 413 may)
    finally:
        conn.close()


def abusive_requests(
    max_body_bytes: int,
    max_prompt_chars: int,
    max_tokens_limit: int,
    n: int,
    kinds: list[str] | None = None,
) -> list[tuple[str, bytes, dict, bool]]:
    """``n`` abusive requests, the kinds (all, or those named) in turn: (kind, body, headers,
    hang up early)."""

    def body(**fields) -> bytes:
        return json.dumps(
            {"model": "gs-ray", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, **fields}
        ).encode()

    every = [
        ("body_over_limit", body(pad="x" * (max_body_bytes + 1)), {}, False),
        ("prompt_over_limit", body(prompt="y" * (max_prompt_chars + 1)), {}, False),
        ("max_tokens_over_limit", body(max_tokens=max_tokens_limit + 1), {}, False),
        ("temperature_underflow", body(temperature=1e-300), {}, False),
        ("seed_out_of_range", body(temperature=1.0, seed=2**64), {}, False),
        ("too_many_stops", body(stop=[str(i) for i in range(50)]), {}, False),
        ("foreign_host", body(), {"Host": "evil.example"}, False),
        ("broken_json", b'{"model": "gs-ray", "prompt": ', {}, False),
        ("stream_hangs_up", body(max_tokens=max_tokens_limit, stream=True), {}, True),
    ]
    chosen = [k for k in every if kinds is None or k[0] in kinds]
    if not chosen:
        raise SystemExit(f"--kinds: none of {kinds} is one of {[k[0] for k in every]}")
    return [chosen[i % len(chosen)] for i in range(n)]


def measure(
    url: str,
    n_valid: int,
    concurrency: int,
    max_tokens: int,
    cfg,
    time_limit: float,
    kinds: list[str] | None = None,
) -> dict:
    """Both phases against ``url`` (the server's base URL); ``cfg``: its ``ServeConfig``."""
    valid = [
        json.dumps(
            {
                "model": "gs-ray",
                "prompt": f"{PROMPTS[i % len(PROMPTS)]} ({i})",
                "max_tokens": max_tokens,
                "temperature": 0,
            }
        ).encode()
        for i in range(n_valid)
    ]
    abuse = abusive_requests(
        cfg.max_body_bytes, cfg.max_prompt_chars, cfg.max_new_tokens_limit, n_valid, kinds
    )
    deadline = time.perf_counter() + time_limit

    def run_valid() -> list[tuple[int, float]]:
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            return list(ex.map(lambda b: _send(url, "/v1/completions", b), valid))

    for b in valid[:2]:  # warm-up
        _send(url, "/v1/completions", b)
    alone = run_valid()
    results: dict = {
        "valid_requests": n_valid,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
    }
    abusive: list[tuple[str, int, float]] = []

    def run_abuse() -> None:
        def one(item):
            kind, body, headers, hang_up = item
            if time.perf_counter() > deadline:
                return None
            status, ms = _send(url, "/v1/completions", body, headers, hang_up)
            return kind, status, ms

        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            abusive.extend(x for x in ex.map(one, abuse) if x is not None)

    attacker = threading.Thread(target=run_abuse)
    attacker.start()
    try:
        mixed = run_valid()
    finally:
        attacker.join()
    for label, rows in (("alone", alone), ("with_abuse", mixed)):
        ms = [t for _, t in rows]
        results[f"p50_ms_{label}"] = statistics.median(ms)
        results[f"p99_ms_{label}"] = _pct(ms, 0.99)
    results["p99_ratio"] = results["p99_ms_with_abuse"] / results["p99_ms_alone"]
    statuses = [s for s, _ in alone + mixed]
    results["valid_non_200"] = sum(s != 200 for s in statuses)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, status, _ in abusive:
        counts = by_kind.setdefault(kind, {})
        counts[str(status)] = counts.get(str(status), 0) + 1
    results["abusive_sent"] = len(abusive)
    results["abusive_statuses"] = by_kind
    results["errors_5xx"] = sum(s >= 500 for s in statuses) + sum(s >= 500 for _, s, _ in abusive)
    results["within_time_limit"] = time.perf_counter() <= deadline
    return results


def _table(results: dict) -> str:
    rows = [("phase", "p50 ms", "p99 ms")]
    for label in ("alone", "with_abuse"):
        rows.append(
            (label, f"{results[f'p50_ms_{label}']:.0f}", f"{results[f'p99_ms_{label}']:.0f}")
        )
    lines = [" | ".join(f"{c:>12}" for c in r) for r in rows]
    lines.append(
        f"p99 ratio {results['p99_ratio']:.2f}; valid non-200 "
        f"{results['valid_non_200']}; 5xx {results['errors_5xx']}"
    )
    for kind, counts in results["abusive_statuses"].items():
        lines.append(f"  {kind:>24}: {counts}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="a finished gs-ray run to deploy on a local Ray")
    where.add_argument("--url", help="a running gs-ray server (its base URL)")
    parser.add_argument("--serve-run-dir", help="with --url: the run it serves (its limits)")
    parser.add_argument("--requests", type=int, default=48, help="valid completions per phase")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds, both phases")
    parser.add_argument("--kinds", nargs="+", help="only these abusive kinds (default: all)")
    parser.add_argument("--smoke", action="store_true", help="a few requests: seconds")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.requests, args.concurrency, args.max_tokens = 9, 2, 2
        args.time_limit = min(args.time_limit, 240)

    from gs_ray.config import ServeConfig
    from gs_ray.serving.app import serve_config_for

    run_dir = args.run_dir or args.serve_run_dir
    cfg = serve_config_for(run_dir) if run_dir else ServeConfig()
    if args.url:
        results = measure(
            args.url,
            args.requests,
            args.concurrency,
            args.max_tokens,
            cfg,
            args.time_limit,
            args.kinds,
        )
    else:
        import ray
        from ray import serve

        from gs_ray.local_ray import free_port
        from gs_ray.serving.app import APP_NAME, app_for_run

        port = free_port()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(app_for_run(args.run_dir, cfg), name=APP_NAME, route_prefix="/")
            results = measure(
                f"http://127.0.0.1:{port}",
                args.requests,
                args.concurrency,
                args.max_tokens,
                cfg,
                args.time_limit,
                args.kinds,
            )
        finally:
            serve.shutdown()
            ray.shutdown()
    results.update(cpus=os.cpu_count(), smoke=args.smoke)
    print(_table(results))
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), results)
    return results


if __name__ == "__main__":
    main()
