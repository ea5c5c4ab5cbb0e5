"""The router at batch 1: latency and agreement with the gradient clusters, per variant.

For a finished run, each variant of the served router (float or int8 encoder, int8 with the FFN
output layers kept float, ``router.max_length`` as trained or shorter; ``router.kind: tfidf``
fitted on the same training prompts) routes prompts its head never trained on (the run's
``test`` split and the router's own hold-out, all clustered by their gradients in Stage II) and
is scored by:

* ``agreement_test`` / ``agreement_holdout`` / ``agreement_all``: share of prompts sent to the
  cluster Stage II assigned them by gradient (``stage2/assignments.jsonl``), the router's own
  measure of success, on the run's test prompts, on the training prompts the router stage held
  out (``n_holdout`` in the router's metrics), and on both;
* ``agreement_with_float``: share routed as the float router with the trained max length routes;
* ``p50_ms`` / ``p99_ms``: one prompt at a time on one torch thread (the router replica's share:
  ``serve.router_cpus`` 0.5 is one thread), tokenise + encode + head + argmax. The variants take
  turns prompt by prompt, so background load falls on all of them alike.

    python benchmarks/router_latency.py --run-dir runs/<run> --json benchmarks/results/router.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FFN_OUTPUT = r"layer\.\d+\.output\.dense"  # MiniLM's FFN output layers (1536 -> 384)


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def held_out_prompts(run_dir: str) -> dict[str, tuple[list[str], list[int]]]:
    """Prompts the router's head never trained on, with their Stage II clusters: ``test`` (the
    run's test split) and ``holdout`` (the training prompts ``routing.stage`` held out,
    ``stratified_split`` with the run's seed). Rows without a cluster are left out."""
    from gs_ray.core.models import load_tokenizer
    from gs_ray.data import load_samples
    from gs_ray.routing.router import stratified_split
    from gs_ray.serving.pool import ServedRun

    run = ServedRun.open(run_dir)
    samples, _ = load_samples(run.cfg.data, load_tokenizer(run.base_path()), run.cfg.run.seed)
    by_id = {s.id: s for s in samples}
    rows = [r for r in run.run.assignments() if r["cluster"] is not None]
    test = [r for r in rows if r["split"] == "test"]
    train = [r for r in rows if r["split"] == "train"]  # in sample order, as the stage's
    _, hold = stratified_split(
        [r["cluster"] for r in train], run.cfg.router.holdout_fraction, run.cfg.run.seed
    )
    holdout = [train[i] for i in hold]
    return {
        name: ([by_id[r["id"]].prompt for r in part], [int(r["cluster"]) for r in part])
        for name, part in (("test", test), ("holdout", holdout))
    }


def tfidf_router(run_dir: str):
    """``router.kind: tfidf`` fitted as the router stage fits a router: on the run's clustered
    training prompts with its seed and ``holdout_fraction`` (so its hold-out is the same)."""
    import dataclasses

    from gs_ray.core.models import load_tokenizer
    from gs_ray.data import load_samples
    from gs_ray.routing.router import TfidfRouter
    from gs_ray.serving.pool import ServedRun

    run = ServedRun.open(run_dir)
    samples, _ = load_samples(run.cfg.data, load_tokenizer(run.base_path()), run.cfg.run.seed)
    by_id = {s.id: s for s in samples}
    train = [r for r in run.run.assignments() if r["cluster"] is not None and r["split"] == "train"]
    cfg = dataclasses.replace(run.cfg.router, kind="tfidf")
    router, _ = TfidfRouter.fit(
        [by_id[r["id"]].prompt for r in train],
        [int(r["cluster"]) for r in train],
        run.n_experts,
        cfg,
        run.cfg.run.seed,
    )
    return router


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished gs-ray run")
    parser.add_argument("--max-lengths", default="64,32", help="shorter encoder lengths to try")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    from gs_ray.serving.pool import ServedRun

    torch.set_num_threads(1)
    run = ServedRun.open(args.run_dir)
    sets = held_out_prompts(args.run_dir)
    prompts = sets["test"][0] + sets["holdout"][0]
    clusters = sets["test"][1] + sets["holdout"][1]
    n_test = len(sets["test"][0])
    trained = run.router().max_length
    lengths = [trained] + [int(x) for x in args.max_lengths.split(",") if int(x) < trained]
    variants = {}
    for length in lengths:
        for kind in ("float", "int8", "int8-ffnout-float"):
            if kind == "int8-ffnout-float" and length != trained:
                continue
            router = run.router()
            router.max_length = length  # before the encoder loads: it is loaded per length
            if kind != "float":
                router.quantize(FFN_OUTPUT if kind == "int8-ffnout-float" else None)
            variants[f"{kind}@{length}"] = router
    variants["tfidf"] = tfidf_router(args.run_dir)
    tokens = [len(x) for x in run.router().encoder.tokenizer(prompts)["input_ids"]]
    routes = {name: [] for name in variants}
    times = {name: [] for name in variants}
    for router in variants.values():  # warm-up
        for p in prompts[:5]:
            router.predict_proba([p])
    for rep in range(args.repeats):
        for p in prompts:
            for name, router in variants.items():
                start = time.perf_counter()
                k = int(router.predict_proba([p])[0].argmax())
                times[name].append(1000 * (time.perf_counter() - start))
                if rep == 0:
                    routes[name].append(k)
    y = np.array(clusters)
    ref = np.array(routes[f"float@{trained}"])
    part = {"test": slice(0, n_test), "holdout": slice(n_test, None), "all": slice(None)}
    results = {
        "run": run.name,
        "n_test_prompts": n_test,
        "n_holdout_prompts": len(prompts) - n_test,
        "n_experts": run.n_experts,
        "prompt_tokens_p50": statistics.median(tokens),
        "prompt_tokens_max": max(tokens),
        "trained_max_length": trained,
        "cpus": os.cpu_count(),
        "load_avg_1min": os.getloadavg()[0],
        "variants": {
            name: {
                "p50_ms": statistics.median(times[name]),
                "p99_ms": _pct(times[name], 0.99),
                **{
                    f"agreement_{key}": float(np.mean(np.array(routes[name])[sl] == y[sl]))
                    for key, sl in part.items()
                },
                "agreement_with_float": float(np.mean(np.array(routes[name]) == ref)),
            }
            for name in variants
        },
    }
    print(
        f"{n_test} test + {len(prompts) - n_test} holdout prompts, K = {run.n_experts}, "
        f"tokens p50 {results['prompt_tokens_p50']} max {results['prompt_tokens_max']}, "
        f"load {results['load_avg_1min']:.1f}"
    )
    print(
        f"{'variant':<22} {'p50 ms':>8} {'p99 ms':>8} {'test':>7} {'holdout':>8} {'all':>7} "
        f"{'= float':>8}"
    )
    for name, v in results["variants"].items():
        print(
            f"{name:<22} {v['p50_ms']:8.2f} {v['p99_ms']:8.2f} {v['agreement_test']:7.4f} "
            f"{v['agreement_holdout']:8.4f} {v['agreement_all']:7.4f} "
            f"{v['agreement_with_float']:8.4f}"
        )
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), results)
    return results


if __name__ == "__main__":
    main()
