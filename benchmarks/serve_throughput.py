"""Serving throughput of a finished run, in one process (no HTTP): why the experts replica runs
mixed-expert batches.

The same N requests (prompts from the run's data, each sent to the expert the router picks) are
answered three ways by the same ``ExpertPool``:

* **(a) one at a time**: batch size 1, what a server without batching does;
* **(b) mixed batches**: ``--batch`` requests per ``generate`` whatever their experts (peft's
  per-row ``adapter_names``), what the Serve experts deployment does;
* **(c) grouped by expert**: each batch split by expert, one ``generate`` per group with that
  adapter active, the alternative design.

All three are greedy and give the same answers (checked). Reported: requests/s, new tokens/s, the
ratios b/a and b/c, and the router's time per prompt at batch 1 and in batches of ``--batch``.

    python benchmarks/serve_throughput.py --run-dir runs/<run> --json benchmarks/results/serve.json
    python benchmarks/serve_throughput.py --run-dir runs/<run> --smoke   # seconds
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOKE = {"requests": 9, "batch": 4, "max_new_tokens": 5}  # --smoke (the suite's): seconds


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="a finished gs-ray run")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--smoke", action="store_true", help=f"tiny sizes, seconds: {SMOKE}")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)

    import torch

    from gs_ray.data import load_samples
    from gs_ray.serving.pool import ServedRun

    if args.threads:
        torch.set_num_threads(args.threads)
    run = ServedRun.open(args.run_dir)
    pool = run.expert_pool()
    router = run.router()
    samples, _ = load_samples(run.cfg.data, pool.tokenizer, run.cfg.run.seed)
    prompts = [s.prompt for s in random.Random(args.seed).sample(samples, args.requests)]

    m, b = args.max_new_tokens, args.batch
    batches = [range(i, min(i + b, len(prompts))) for i in range(0, len(prompts), b)]
    router.predict(prompts[:2])  # load the encoder
    t_route1, _ = _timed(lambda: [router.predict(p) for p in prompts])
    t_route_b, routed = _timed(lambda: [router.predict([prompts[i] for i in r]) for r in batches])
    experts = [int(k) for part in routed for k in part]

    def one_at_a_time():
        return [pool.generate([prompts[i]], [experts[i]], m)[0] for i in range(len(prompts))]

    def mixed():
        out = []
        for rows in batches:
            out += pool.generate([prompts[i] for i in rows], [experts[i] for i in rows], m)
        return out

    def grouped():
        out = [None] * len(prompts)
        for rows in batches:
            for k in sorted({experts[i] for i in rows}):
                group = [i for i in rows if experts[i] == k]
                gens = pool.generate([prompts[i] for i in group], [k] * len(group), m)
                for i, g in zip(group, gens, strict=True):
                    out[i] = g
        return out

    pool.generate(prompts[:2], experts[:2], 4)  # warm-up
    results = {}
    answers = {}
    for name, fn in (
        ("one_at_a_time", one_at_a_time),
        ("mixed_batches", mixed),
        ("grouped_by_expert", grouped),
    ):
        seconds, gens = _timed(fn)
        answers[name] = [g.text for g in gens]
        tokens = sum(g.n_new_tokens for g in gens)
        results[name] = {
            "seconds": seconds,
            "requests_per_s": len(gens) / seconds,
            "new_tokens_per_s": tokens / seconds,
        }
    same = answers["one_at_a_time"] == answers["mixed_batches"] == answers["grouped_by_expert"]
    out = {
        "run_dir": str(Path(args.run_dir).resolve()),
        "model": run.cfg.model.name,
        "n_experts": run.n_experts,
        "requests": len(prompts),
        "batch": b,
        "max_new_tokens": m,
        "threads": torch.get_num_threads(),
        "experts_used": sorted(set(experts)),
        **results,
        "speedup_mixed_vs_one": results["mixed_batches"]["requests_per_s"]
        / results["one_at_a_time"]["requests_per_s"],
        "speedup_mixed_vs_grouped": results["mixed_batches"]["requests_per_s"]
        / results["grouped_by_expert"]["requests_per_s"],
        "identical_answers": same,
        "router_ms_per_prompt_batch1": 1000 * t_route1 / len(prompts),
        "router_ms_per_prompt_batched": 1000 * t_route_b / len(prompts),
    }
    print(f"{'variant':<20}{'req/s':>10}{'new tok/s':>12}{'seconds':>10}")
    for name in results:
        r = results[name]
        print(
            f"{name:<20}{r['requests_per_s']:>10.2f}{r['new_tokens_per_s']:>12.1f}"
            f"{r['seconds']:>10.2f}"
        )
    print(
        f"mixed / one-at-a-time: {out['speedup_mixed_vs_one']:.2f}x   "
        f"mixed / grouped: {out['speedup_mixed_vs_grouped']:.2f}x   identical answers: {same}"
    )
    print(
        f"router: {out['router_ms_per_prompt_batch1']:.1f} ms/prompt at batch 1, "
        f"{out['router_ms_per_prompt_batched']:.1f} ms/prompt in batches of {b}"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
