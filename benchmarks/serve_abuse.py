"""Valid requests' latency with abusive ones mixed in: does a hostile client slow the others?

Two phases against one running server, the same valid completions (``POST /v1/completions``,
greedy, model ``gs-ray``) at the same concurrency:

* **alone**: the valid requests only;
* **with abuse**: the same valid requests while as many threads again send abusive ones: bodies
  over ``serve.max_body_bytes`` (413), prompts over ``serve.max_prompt_chars``, ``max_tokens``
  over the limit, a sampler-breaking ``temperature``, a seed out of range, too many stop strings,
  a foreign ``Host`` header, broken JSON (4xx, each refused before the models run), streams
  that ask for ``max_tokens`` at the limit and hang up after their first chunk (the server must
  stop generating for them), and streams at that limit read to their end (within every limit,
  but long: the server must give the waiting requests their turn between two tokens).

The attacker runs in a process of its own, at the lowest priority (what its client side costs
is not the server's). ``--client-limits IN_FLIGHT RATE`` gives the two clients API keys of their
own (``serve.api_keys_file``) and the attacker a share (``in_flight=``, ``rate=``).

It reports each phase's p50 and p99 in ms, ``p99_ratio`` (with abuse / alone), the abusive
requests' status codes by kind, and ``valid_non_200`` and ``errors_5xx`` (expected 0). Bounded
in count and time (``--time-limit``). Against a server already running (``--url``), or a run it
deploys itself on a local Ray (``--run-dir``)::

    python benchmarks/serve_abuse.py --run-dir runs/<run> --json benchmarks/results/abuse.json
    python benchmarks/serve_abuse.py --run-dir runs/<run> --kinds stream_long --client-limits 2 1
    python benchmarks/serve_abuse.py --url http://127.0.0.1:8000 --smoke

``--smoke`` runs a handful of requests (seconds): the suite runs it so that it cannot rot.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
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


ALL_KINDS = (
    "body_over_limit",
    "prompt_over_limit",
    "max_tokens_over_limit",
    "temperature_underflow",
    "seed_out_of_range",
    "too_many_stops",
    "foreign_host",
    "broken_json",
    "stream_hangs_up",
    "stream_long",
)


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
            {
                "model": "gs-ray",
                "prompt": PROMPTS[0],
                "max_tokens": 4,
                "temperature": 0,
                **fields,
            }
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
        # within every limit, but long: a stream at the largest max_tokens, read to its end
        ("stream_long", body(max_tokens=max_tokens_limit, stream=True), {}, False),
    ]
    assert [k[0] for k in every] == list(ALL_KINDS)
    chosen = [k for k in every if kinds is None or k[0] in kinds]
    if not chosen:
        raise SystemExit(f"--kinds: none of {kinds} is one of {[k[0] for k in every]}")
    return [chosen[i % len(chosen)] for i in range(n)]


ATTACKER_NICE = 19  # the attacker process's niceness (its client work is not the server's)
OPEN_LOOP_THREADS = 64  # the valid client's threads in the open-loop phases (none waits to send)


def _attack() -> None:
    """The attacker's process (``--attack``): the spec on stdin (JSON: url, limits, kinds,
    concurrency, rate, min_count, until, nice, headers). Its ``concurrency`` threads send the
    abusive kinds in turn, one every 1/``rate`` seconds (a thread that is free takes the next
    when it is due), every kind at least once (``min_count``), and on until "stop" comes on
    stdin (or stdin ends), never past ``until`` seconds; prints "started", then one JSON line
    of (kind, status, ms) rows."""
    spec = json.loads(sys.stdin.readline())
    with contextlib.suppress(OSError):
        os.nice(spec["nice"])
    kinds = abusive_requests(*spec["limits"], len(spec["kinds"] or ALL_KINDS), spec["kinds"])
    start = time.perf_counter()
    stop = threading.Event()
    lock, sent = threading.Lock(), [0]

    def next_item():
        with lock:
            n, elapsed = sent[0], time.perf_counter() - start
            if (n >= spec["min_count"] and stop.is_set()) or elapsed > spec["until"]:
                return None
            sent[0] += 1
        time.sleep(max(0.0, start + n / spec["rate"] - time.perf_counter()))
        return kinds[n % len(kinds)]

    def worker() -> list:
        rows = []
        while (item := next_item()) is not None:
            kind, body, headers, hang_up = item
            status, ms = _send(
                spec["url"],
                "/v1/completions",
                body,
                {**spec["headers"], **headers},
                hang_up,
            )
            rows.append((kind, status, ms))
        return rows

    def watch_stdin() -> None:
        sys.stdin.readline()  # "stop", or the end of stdin: the valid phase is over
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    print("started", flush=True)
    with ThreadPoolExecutor(max_workers=spec["concurrency"]) as ex:
        parts = [ex.submit(worker) for _ in range(spec["concurrency"])]
        rows = [row for part in parts for row in part.result()]
    print(json.dumps(rows), flush=True)


def measure(
    url: str,
    n_valid: int,
    concurrency: int,
    max_tokens: int,
    cfg,
    time_limit: float,
    kinds: list[str] | None = None,
    valid_headers: dict | None = None,
    abuse_headers: dict | None = None,
    load: float = 0.5,
    attacker_nice: int = ATTACKER_NICE,
) -> dict:
    """Against ``url`` (the server's base URL; ``cfg``: its ``ServeConfig``): the valid
    client's capacity (``n_valid`` completions, ``concurrency`` at a time: closed loop), then
    the same completions sent at ``load`` times that rate (open loop: each at its time,
    whatever the answers before it) alone, and again while the attacker sends its abusive
    kinds all along, at the valid requests' rate (as many of them, as long).
    ``valid_headers`` / ``abuse_headers``: each client's own (its API key)."""
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
    abusive_requests(1, 1, 1, 1, kinds)  # unknown kinds fail here, before any request
    deadline = time.perf_counter() + time_limit

    def send(b: bytes) -> tuple[int, float]:
        return _send(url, "/v1/completions", b, valid_headers)

    def closed_loop() -> tuple[list[tuple[int, float]], float]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as ex:
            rows = list(ex.map(send, valid))
        return rows, len(valid) / (time.perf_counter() - start)

    def open_loop(rate: float) -> list[tuple[int, float]]:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=OPEN_LOOP_THREADS) as ex:
            futures = []
            for i, b in enumerate(valid):
                wait = start + i / rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                futures.append(ex.submit(send, b))
            return [f.result() for f in futures]

    for b in valid[:2]:  # warm-up
        send(b)
    # The lower of two closed-loop runs: one run's rate moved by half on this machine, and an
    # open-loop rate near the true capacity would measure the queue, not the attacker.
    (closed, capacity), (closed2, capacity2) = closed_loop(), closed_loop()
    if capacity2 < capacity:
        closed, capacity = closed2, capacity2
    rate = load * capacity
    alone = open_loop(rate)
    results: dict = {
        "valid_requests": n_valid,
        "concurrency": concurrency,
        "max_tokens": max_tokens,
        "capacity_rps": capacity,
        "load": load,
        "rate_rps": rate,
        "p50_ms_closed_loop": statistics.median(t for _, t in closed),
        "p99_ms_closed_loop": _pct([t for _, t in closed], 0.99),
    }
    abusive: list[tuple[str, int, float]] = []
    # The attacker runs in a process of its own at the lowest priority: its client-side work
    # (its threads' sockets and their share of a GIL) would otherwise be charged to the
    # valid client's latencies, which a real attacker, on a machine of its own, cannot do. What
    # the server spends on its requests is what the benchmark measures.
    spec = {
        "url": url,
        "limits": [cfg.max_body_bytes, cfg.max_prompt_chars, cfg.max_new_tokens_limit],
        "kinds": kinds,
        "concurrency": concurrency,
        "rate": rate,
        "nice": attacker_nice,
        "min_count": len(kinds or ALL_KINDS),  # every kind once
        "until": max(1.0, deadline - time.perf_counter()),
        "headers": abuse_headers or {},
    }
    attacker = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--attack"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        attacker.stdin.write(json.dumps(spec) + "\n")
        attacker.stdin.flush()
        started = attacker.stdout.readline().strip()  # its interpreter is up and sending
        if started != "started":
            raise RuntimeError(f"the attacker process did not start: {started!r}")
        mixed = open_loop(rate)
        with contextlib.suppress(BrokenPipeError):  # it may have ended (``until``)
            attacker.stdin.write("stop\n")
            attacker.stdin.close()
        rows = json.loads(attacker.stdout.readline() or "[]")
        abusive.extend((kind, status, ms) for kind, status, ms in rows)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            attacker.wait(timeout=max(1.0, deadline - time.perf_counter()) + 60)
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    for label, rows in (("alone", alone), ("with_abuse", mixed)):
        ms = [t for _, t in rows]
        results[f"p50_ms_{label}"] = statistics.median(ms)
        results[f"p99_ms_{label}"] = _pct(ms, 0.99)
    results["p99_ratio"] = results["p99_ms_with_abuse"] / results["p99_ms_alone"]
    statuses = [s for s, _ in closed + alone + mixed]
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
    lines = [
        f"capacity {results['capacity_rps']:.1f} req/s (closed loop, p50 "
        f"{results['p50_ms_closed_loop']:.0f} ms); open loop at {results['rate_rps']:.1f} req/s "
        f"(load {results['load']:g})"
    ]
    rows = [("phase", "p50 ms", "p99 ms")]
    for label in ("alone", "with_abuse"):
        rows.append(
            (
                label,
                f"{results[f'p50_ms_{label}']:.0f}",
                f"{results[f'p99_ms_{label}']:.0f}",
            )
        )
    lines += [" | ".join(f"{c:>12}" for c in r) for r in rows]
    lines.append(
        f"p99 ratio {results['p99_ratio']:.2f}; valid non-200 "
        f"{results['valid_non_200']}; 5xx {results['errors_5xx']}"
    )
    for kind, counts in results["abusive_statuses"].items():
        lines.append(f"  {kind:>24}: {counts}")
    return "\n".join(lines)


def _two_clients(cfg, in_flight: int, rate: float) -> tuple[dict, tempfile.TemporaryDirectory]:
    """``cfg`` set to serve two clients with fresh keys (``valid``, unlimited; ``attacker``,
    with the share given); (each client's headers for ``measure``, the keys file's folder)."""
    import secrets

    folder = tempfile.TemporaryDirectory(prefix="gs-ray-abuse-")
    keys = {name: secrets.token_urlsafe(24) for name in ("valid", "attacker")}
    path = Path(folder.name) / "api_keys"
    path.write_text(
        f"valid {keys['valid']}\nattacker {keys['attacker']} in_flight={in_flight} rate={rate}\n"
    )
    path.chmod(0o600)
    cfg.api_keys_file = str(path)
    auth = {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}
    return {"valid_headers": auth["valid"], "abuse_headers": auth["attacker"]}, folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--run-dir", help="a finished gs-ray run to deploy on a local Ray")
    where.add_argument("--url", help="a running gs-ray server (its base URL)")
    parser.add_argument("--serve-run-dir", help="with --url: the run it serves (its limits)")
    parser.add_argument("--requests", type=int, default=120, help="valid completions per phase")
    parser.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="the capacity phase's and the attacker's",
    )
    parser.add_argument(
        "--load",
        type=float,
        default=0.5,
        help="the open-loop phases' rate, as a share of the measured capacity",
    )
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds, both phases")
    parser.add_argument("--kinds", nargs="+", help="only these abusive kinds (default: all)")
    parser.add_argument(
        "--client-limits",
        nargs=2,
        type=float,
        metavar=("IN_FLIGHT", "RATE"),
        help="with --run-dir: serve two clients, each with its own API key in a "
        "serve.api_keys_file: the valid one (no limit) and the attacker, whose line gives it "
        "a share of its own: in_flight=IN_FLIGHT rate=RATE (requests per second)",
    )
    parser.add_argument("--smoke", action="store_true", help="a few requests: seconds")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    nice = ATTACKER_NICE
    if args.smoke:
        nice = 0  # a loaded suite must not starve the smoke's attacker: its figures do not count
        args.requests, args.concurrency, args.max_tokens = 10, 2, 2
        args.time_limit = min(args.time_limit, 240)

    from gs_ray.config import ServeConfig
    from gs_ray.serving.app import serve_config_for

    run_dir = args.run_dir or args.serve_run_dir
    cfg = serve_config_for(run_dir) if run_dir else ServeConfig()
    headers: dict[str, dict] = {"valid_headers": {}, "abuse_headers": {}}
    if args.client_limits:
        if not args.run_dir:
            parser.error("--client-limits deploys the run itself: give --run-dir")
        in_flight, rate = args.client_limits
        headers, keys_dir = _two_clients(cfg, int(in_flight), rate)  # kept to the end of main
    if args.url:
        results = measure(
            args.url,
            args.requests,
            args.concurrency,
            args.max_tokens,
            cfg,
            args.time_limit,
            args.kinds,
            **headers,
            load=args.load,
            attacker_nice=nice,
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
                **headers,
                load=args.load,
                attacker_nice=nice,
            )
        finally:
            serve.shutdown()
            ray.shutdown()
    results.update(cpus=os.cpu_count(), smoke=args.smoke, client_limits=args.client_limits)
    print(_table(results))
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), results)
    return results


if __name__ == "__main__":
    if sys.argv[1:] == ["--attack"]:  # the attacker's own process (measure starts it)
        _attack()
    else:
        main()
