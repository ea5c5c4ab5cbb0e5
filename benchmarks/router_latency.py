"""The router at batch 1: latency and agreement with the gradient clusters, per variant.

For a finished run, each variant of the router (the encoder router: float or int8, int8 with the
FFN output layers kept float, ``router.max_length`` as trained or shorter; and the TF-IDF router,
``router.kind: tfidf``) routes prompts its head never trained on (the run's ``test`` split and
the router stage's own hold-out) and is scored against the clusters the experts were trained on
(Stage II's, ``stage2/assignments.jsonl``, with the routability step's merges). The run has one
router of the two kinds; the other is fitted here as the router stage would fit it (same rows,
seed and hold-out). Scores:

* ``agreement_test`` / ``agreement_holdout`` / ``agreement_all``: share of prompts sent to the
  cluster they were assigned by gradient, the router's own measure of success, on the run's
  test prompts, on the training prompts the router stage held out (``n_holdout`` in the
  router's metrics), and on both;
* ``agreement_with_float``: share routed as the float router with the trained max length routes;
* ``p50_ms`` / ``p99_ms``: one prompt at a time on one torch thread (the router replica's share:
  ``serve.router_cpus`` 0.5 is one thread), tokenise + encode + head + argmax. The variants take
  turns prompt by prompt, so background load falls on all of them alike.

    python benchmarks/router_latency.py --run-dir runs/<run> --json benchmarks/results/router.json
    python benchmarks/router_latency.py --run-dir runs/<run> --smoke --json /tmp/router.json

``--smoke`` (seconds; the suite runs it on test_pipeline's run): 8 test and 8 holdout prompts,
one pass, one shorter length (32)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FFN_OUTPUT = r"layer\.\d+\.output\.dense"  # MiniLM's FFN output layers (1536 -> 384)
SMOKE = {"max_prompts": 8, "max_lengths": "32", "repeats": 1}  # --smoke: 8 test + 8 holdout


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def router_rows(run) -> dict[str, tuple[list[str], list[int]]]:
    """The router stage's prompts and clusters, read from a finished run (nothing is written):
    ``fit`` (the rows ``routing.stage`` fitted on: ``Prepared.fit_rows`` with a cluster), ``test``
    (the run's test split) and ``holdout`` (the part of ``fit`` that the fit itself held out:
    ``stratified_split`` with the run's seed). Clusters are those the experts and the router were
    trained on: Stage II's, with the routability step's merges applied."""
    import numpy as np

    from gs_ray.prepare import prepare
    from gs_ray.routing.router import stratified_split

    cfg, base_path = run.cfg, run.base_path()
    p = prepare(cfg, run.run, base_model=lambda *_: base_path, read_only=True)
    p.run.release_lock()  # read only: nothing of the run is written here
    samples = p.samples
    labels, _ = p.assignments()
    fit = p.fit_rows()
    fit = fit[labels[fit] >= 0]
    _, hold = stratified_split(labels[fit], cfg.router.holdout_fraction, cfg.run.seed)
    test = p.splits.test[labels[p.splits.test] >= 0]
    return {
        name: ([samples[i].prompt for i in rows], [int(labels[i]) for i in rows])
        for name, rows in (("fit", fit), ("test", test), ("holdout", fit[np.sort(hold)]))
    }


def fit_other_kind(run, own, rows: dict[str, tuple[list[str], list[int]]]):
    """The router of the kind the run does not have (``encoder`` for a TF-IDF run, ``tfidf`` for
    an encoder run), fitted as the router stage fits one: on the same rows, with the run's
    seed and ``holdout_fraction`` (so its hold-out is the same)."""
    import dataclasses

    from gs_ray.routing.router import TfidfRouter, make_router

    kind = "encoder" if isinstance(own, TfidfRouter) else TfidfRouter.kind
    cfg = dataclasses.replace(run.cfg.router, kind=kind)
    return make_router(cfg, run.n_experts, run.cfg.run.seed).fit(*rows["fit"])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished gs-ray run")
    parser.add_argument("--max-lengths", default="64,32", help="shorter encoder lengths to try")
    parser.add_argument("--repeats", type=int, default=1, help="timed passes over the prompts")
    parser.add_argument("--max-prompts", type=int, help="at most this many test and holdout each")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes: {SMOKE}")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    import copy

    import numpy as np
    import torch

    from gs_ray.routing.router import Router, TfidfRouter
    from gs_ray.serving.pool import ServedRun

    torch.set_num_threads(1)
    run = ServedRun.open(args.run_dir)
    rows = router_rows(run)
    sets = {name: (p[: args.max_prompts], c[: args.max_prompts]) for name, (p, c) in rows.items()}
    prompts = sets["test"][0] + sets["holdout"][0]
    clusters = sets["test"][1] + sets["holdout"][1]
    n_test = len(sets["test"][0])
    own = run.router()
    other = fit_other_kind(run, own, rows)
    encoder, tfidf = (other, own) if isinstance(other, Router) else (own, other)
    trained = encoder.max_length
    lengths = [trained] + [int(x) for x in args.max_lengths.split(",") if int(x) < trained]
    variants: dict[str, Router | TfidfRouter] = {}
    for length in lengths:
        for kind in ("float", "int8", "int8-ffnout-float"):
            if kind == "int8-ffnout-float" and length != trained:
                continue
            # a fresh router per variant (its own head): the encoder is loaded per length
            router = Router.from_head(
                copy.deepcopy(encoder.head), encoder=encoder.encoder_name, max_length=length
            )
            if kind != "float":
                router.quantize(FFN_OUTPUT if kind == "int8-ffnout-float" else None)
            variants[f"{kind}@{length}"] = router
    variants["tfidf"] = tfidf
    tokens = [len(x) for x in variants[f"float@{trained}"].encoder.tokenizer(prompts)["input_ids"]]
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
        "router_kind": "tfidf" if own is tfidf else "encoder",  # the run's; the other: fitted
        "smoke": args.smoke,
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
