"""Targeted selection on the demo corpus: does each method pick the target's domain?

A target set of one domain (records of a demo corpus drawn with another seed, so none is in the
pool), one warm-up, then ``gs-ray select`` with GIST, LESS-style and random on the same run. The
table shows, per method, the share of the selected records whose ``domain`` is the target's
(precision), the seconds the selection took (target gradients, pool pass, scoring) and the bytes
each method stores for the pool. Not a test: nothing is asserted.

    .venv/bin/python benchmarks/selection_demo.py --demo-size 400 \
        --json benchmarks/results/selection_demo.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from gs_ray.config import load_config
from gs_ray.data.demo import build_demo_corpus
from gs_ray.rundir import RunDir
from gs_ray.selection.select import select


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-size", type=int, default=400)
    ap.add_argument("--domain", default="math")
    ap.add_argument("--n-target", type=int, default=24)
    ap.add_argument("--budget", default="10%")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--less-dim", type=int, default=8192)
    ap.add_argument("--out", default="benchmarks/results/selection_demo")
    ap.add_argument("--json")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="120 samples, a tiny model with random weights (no pretraining): seconds",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        args.demo_size, args.n_target, args.hidden, args.layers = 120, 8, 32, 1
        args.less_dim = 256

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "target.jsonl"
    records = [
        r for r in build_demo_corpus(n_samples=400, seed=12345) if r["domain"] == args.domain
    ]
    target.write_text("".join(json.dumps(r) + "\n" for r in records[: args.n_target]))
    overrides = [
        "--data.demo_size",
        str(args.demo_size),
        "--model.tiny_hidden_size",
        str(args.hidden),
        "--model.tiny_num_layers",
        str(args.layers),
        "--model.tiny_vocab_size",
        "2048",
        *(["--model.tiny_pretrain_steps", "0"] if args.smoke else []),
        "--selection.target",
        str(target),
        "--selection.budget",
        args.budget,
        "--selection.less_dim",
        str(args.less_dim),
        "--run.output_dir",
        str(out / "runs"),
    ]
    run_dir = None
    rows = []
    for method in ("gist", "less", "random"):
        cfg = load_config(None, [*overrides, "--selection.method", method])
        start = time.perf_counter()
        run = select(cfg, run_dir)
        seconds = time.perf_counter() - start
        run_dir = str(run.path)  # later methods reuse the warm-up
        selected = RunDir.read_jsonl(run.selection_selected(method))
        summary = json.loads(run.selection_summary(method).read_text())
        rows.append(
            {
                "method": method,
                "n_selected": len(selected),
                "precision": sum(r["domain"] == args.domain for r in selected) / len(selected),
                "seconds": round(seconds, 1),
                "stored_bytes": summary["stored_bytes"],
                "k": summary.get("k"),
            }
        )
    pool = build_demo_corpus(n_samples=args.demo_size, seed=0)
    base = sum(r["domain"] == args.domain for r in pool) / len(pool)
    print(
        f"pool {len(pool)} demo records, {base:.1%} {args.domain}; target {args.n_target} "
        f"{args.domain} records; budget {args.budget}"
    )
    print(f"{'method':8} {'selected':>8} {'precision':>9} {'seconds':>8} {'stored bytes':>13} k")
    for r in rows:
        print(
            f"{r['method']:8} {r['n_selected']:8d} {r['precision']:9.1%} {r['seconds']:8.1f} "
            f"{r['stored_bytes']:13,d} {r['k'] or ''}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"base_rate": base, "rows": rows, **vars(args)}, indent=2)
        )


if __name__ == "__main__":
    main()
