"""Stage II on Ray: is the central centroid actor a bottleneck, and do gradient workers scale?

Runs Stage II (one online epoch and the final pass) of the embedded default on a local Ray with
1 and with 2 gradient workers (one CPU and one torch thread each: one core against two), for
each transport, and reports per pass:

* bytes moved into the centroid actor per sample,
* the share of the pass's wall time the centroid actor is busy,
* samples/s and the speed-up of 2 workers over 1.

    python benchmarks/stage2_scaling.py --json benchmarks/results/stage2_scaling.json

Targets on a 2-core machine: centroid actor busy <= 10% of the pass; 2 workers >= 1.5x one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def measure(prepared, cfg, workers: int, transport: str, checkpoint_dir: Path) -> dict:
    """One Stage II run; returns per-pass figures of the online epoch and the final pass."""
    from gs_ray.config import Config
    from gs_ray.stage2 import Stage2Plan, run_stage2_ray

    c = Config.from_dict(cfg.to_dict())
    c.stage2.num_workers = workers
    c.stage2.transport = transport
    c.stage2.checkpoint_every = 0
    p = prepared
    plan = Stage2Plan.build(p.lengths, p.splits, c)
    start = time.perf_counter()
    out = run_stage2_ray(
        plan, p.samples, c, p.base_path, str(p.run.warmup_adapter), p.pad_id, checkpoint_dir
    )
    total = time.perf_counter() - start
    rows = {}
    for ps in out.info["passes"]:
        if ps["phase"] == "val":
            continue
        rows[ps["phase"]] = {
            "seconds": ps["seconds"],
            "samples_per_s": ps["samples"] / ps["seconds"],
            "centroid_busy_fraction": ps["centroid_busy_seconds"] / ps["seconds"],
            "bytes_per_sample": ps["bytes_in"] / ps["samples"],
        }
    return {"workers": workers, "transport": transport, "total_seconds": total,
            "labels": out.labels, "passes": rows}  # fmt: skip


def actor_update_cost(
    dim: int, k: int = 7, batch: int = 32, alpha: int = 5, steps: int = 12
) -> dict:
    """Seconds per online batch of the centroid host's own work, without Ray, at gradient
    dimension ``dim``: the exact cache (assign + FIFO of vectors) against the external cache
    (ledger + per-cluster sums, as with the partial_sums transport)."""
    import numpy as np

    from gs_ray.core.clustering import (
        GradientSpaceClustering,
        cluster_sums,
        cosine_assign,
        normalize_rows,
    )

    rng = np.random.default_rng(0)
    centers = rng.standard_normal((k, dim)).astype(np.float32)
    out = {}
    for cache in ("samples", "external"):
        est = GradientSpaceClustering(n_clusters=k, alpha=alpha, batch_size=batch, cache=cache)
        est.n_clusters_, est.cluster_centers_ = k, centers.copy()
        est._reset_online_state(dim)
        G = rng.standard_normal((batch, dim)).astype(np.float32)
        times = []
        for step in range(steps):
            if cache == "samples":
                t = time.perf_counter()
                est.partial_fit(G)
            else:  # the worker assigns and sums; the host books and applies the sums
                Xn, norms = normalize_rows(G)
                labels = cosine_assign(Xn, est.cluster_centers_)
                added, _ = cluster_sums(Xn, labels, k, norms > 0)
                evicted = np.zeros_like(added)  # summed by the workers that hold the rows
                t = time.perf_counter()
                est.push_ledger(step, labels, norms > 0)
                est.partial_fit_external(added, evicted, batch)
            times.append(time.perf_counter() - t)
        out[cache] = float(np.median(times[2:]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--samples", type=int, default=1200, help="demo corpus size")
    parser.add_argument("--transports", default="gradients,partial_sums")
    parser.add_argument(
        "--actor-dim",
        type=int,
        default=1_000_000,
        help="gradient dimension for the centroid-host cost (no Ray)",
    )
    args = parser.parse_args(argv)

    import numpy as np
    import ray

    from gs_ray.config import Config
    from gs_ray.local_ray import start_local_ray
    from gs_ray.logs import setup_logging
    from gs_ray.prepare import prepare
    from gs_ray.rundir import versions
    from gs_ray.training.warmup import warmup_local

    setup_logging("WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="gsr-bench-"))
    cfg = Config()
    cfg.data.demo_size = args.samples
    cfg.clustering.max_epochs = 1
    cfg.run.output_dir, cfg.run.name = str(tmp), "bench"
    prepared = prepare(cfg)
    warmup_local(prepared)
    start_local_ray(num_cpus=2, log_to_driver=False)  # loopback only, reaped with us
    results = []
    try:
        for transport in args.transports.split(","):
            for workers in (1, 2):
                results.append(
                    measure(prepared, cfg, workers, transport, tmp / f"ckpt-{transport}-{workers}")
                )
    finally:
        ray.shutdown()

    print(f"\nStage II scaling, embedded default, {len(prepared.samples)} samples, "
          f"{platform.machine()} {os.cpu_count()} CPUs")  # fmt: skip
    print(
        f"{'transport':<13}{'workers':>8}{'pass':>8}{'s':>8}{'samples/s':>11}{'busy %':>8}{'KB/sample':>11}"
    )
    for r in results:
        for phase, ps in r["passes"].items():
            print(f"{r['transport']:<13}{r['workers']:>8}{phase:>8}{ps['seconds']:>8.1f}"
                  f"{ps['samples_per_s']:>11.1f}{100 * ps['centroid_busy_fraction']:>8.2f}"
                  f"{ps['bytes_per_sample'] / 1024:>11.1f}")  # fmt: skip
    by = {(r["transport"], r["workers"]): r for r in results}
    exact1, exact2 = by[("gradients", 1)], by[("gradients", 2)]
    online = "online"
    speedup = exact2["passes"][online]["samples_per_s"] / exact1["passes"][online]["samples_per_s"]
    busy = max(r["passes"][online]["centroid_busy_fraction"] for r in results)
    summary = {
        "speedup_2_workers": speedup,
        "centroid_busy_fraction": busy,
        "bytes_per_sample": exact2["passes"][online]["bytes_per_sample"],
        "same_assignments_1_vs_2_workers": bool(np.array_equal(exact1["labels"], exact2["labels"])),
    }
    if ("partial_sums", 2) in by:
        ps2 = by[("partial_sums", 2)]
        summary["bytes_per_sample_partial_sums"] = ps2["passes"][online]["bytes_per_sample"]
        summary["partial_sums_speedup_2_workers"] = (
            ps2["passes"][online]["samples_per_s"]
            / by[("partial_sums", 1)]["passes"][online]["samples_per_s"]
        )
        summary["same_assignments_partial_sums"] = bool(
            np.array_equal(exact2["labels"], ps2["labels"])
        )
    print(f"\nspeed-up of 2 workers over 1 (online pass): {speedup:.2f}x (target >= 1.5)")
    print(f"centroid actor busy, worst online pass: {100 * busy:.2f}% (target <= 10%)")
    print(f"bytes into the centroid actor per sample: {summary['bytes_per_sample']:.0f}")
    for k, v in summary.items():
        if k.startswith("same_") or "partial" in k:
            print(f"{k}: {v}")
    cost = actor_update_cost(args.actor_dim)
    per_elem = {c: 1e9 * v / args.actor_dim for c, v in cost.items()}
    print(f"\ncentroid host work per online batch (K=7, |B|=32, alpha=5, d={args.actor_dim:,}): "
          f"exact cache {1e3 * cost['samples']:.1f} ms, external cache {1e3 * cost['external']:.1f} ms "
          f"({per_elem['samples']:.1f} vs {per_elem['external']:.1f} ns per gradient dimension)")  # fmt: skip
    summary["actor_seconds_per_batch"] = cost
    summary["actor_ns_per_dim_per_batch"] = per_elem
    summary["actor_dim"] = args.actor_dim
    report = {**summary, "runs": [{k: v for k, v in r.items() if k != "labels"} for r in results],
              "samples": len(prepared.samples), "cpus": os.cpu_count(), "versions": versions()}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
