"""Stage II on Ray: is the central centroid actor a bottleneck, and do gradient workers scale?

Runs Stage II (one online epoch and the final pass) of the embedded default on a local Ray with
1 and with 2 gradient workers (one CPU and one torch thread each: one core against two), for
each transport, and reports per pass:

* bytes moved into the centroid actor per sample,
* the share of the pass's wall time the centroid actor is busy,
* samples/s and the speed-up of 2 workers over 1.

    python benchmarks/stage2_scaling.py --json benchmarks/results/stage2_scaling.json

Targets on a 2-core machine: centroid actor busy <= 10% of the pass; 2 workers >= 1.5x one.

The ``collective`` transport runs with 1, 2 and 3 workers (|B_t| = clustering.batch_size split
over the workers; its assignments must equal the exact transport's) and reports its time per
online step split into compute, collective and update. A synthetic run at the Llama-2-7B LoRA
gradient dimension (d = 16,777,216, K = 7; ``--collective-dim``) measures the per-step all-reduce
+ update of the collective transport with real gloo processes and no model, against the centroid
actor's work per batch of the exact and partial-sums transports at the same d (extrapolated
linearly from ``--actor-dim``: their exact cache alone would need K * alpha * |B| * d * 4 bytes =
75 GB at that d).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def measure(
    prepared,
    cfg,
    workers: int,
    transport: str,
    checkpoint_dir: Path,
    k: int | None = None,
    checkpoints: bool = False,
) -> dict:
    """One Stage II run; returns per-pass figures of the online epoch and the final pass.
    ``k``: K fixed (None: chosen as configured); ``checkpoints``: the default checkpoint
    interval (else none mid-pass, a pure timing run)."""
    from gs_ray.config import config_from_dict
    from gs_ray.stage2 import Stage2Plan, run_stage2_ray

    c = config_from_dict(cfg.to_dict())
    c.stage2.num_workers = workers
    c.stage2.transport = transport
    c.stage2.cpus_per_worker = min(1.0, 2 / workers)  # 3 collective ranks share 2 cores
    if not checkpoints:
        c.stage2.checkpoint_every = 10_000  # no mid-pass checkpoints in a timing run
    if k is not None:
        c.clustering.n_clusters = k
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
            # the actor's CPU time over the same wall time: busy minus this is waiting for a core
            "centroid_busy_cpu_fraction": ps.get("centroid_busy_cpu_seconds", 0.0) / ps["seconds"],
            "checkpoint_fraction": ps.get("centroid_checkpoint_seconds", 0.0) / ps["seconds"],
            "batches": -(-ps["samples"] // c.clustering.batch_size),
            "bytes_per_sample": ps["bytes_in"] / ps["samples"],
        }
    return {
        "workers": workers,
        "k": out.clusterer.n_clusters_,
        "transport": transport,
        "total_seconds": total,
        "labels": out.labels,
        "passes": rows,
        "step_seconds": out.info.get("step_seconds"),
        "collective_bytes_per_worker": out.info.get("collective_bytes_per_worker"),
    }


def _collective_rank(rank: int, world: int, port: int, dim: int, k: int, steps: int, queue):
    """One rank of the synthetic collective step: all-reduce of (K, d) float64 sums + update."""
    import numpy as np
    import torch
    import torch.distributed as dist

    from gs_ray.core.clustering import GradientSpaceClustering
    from gs_ray.stage2.collective import TorchCollective

    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    est = GradientSpaceClustering(n_clusters=k, cache="external")
    est.n_clusters_ = k
    est.cluster_centers_ = np.full((k, dim), 1.0 / np.sqrt(dim), dtype=np.float32)
    est.n_features_in_ = dim
    est._reset_online_state(dim)
    comm = TorchCollective()
    delta = np.full((k, dim), 1e-3, dtype=np.float64)  # stands for (entering - evicted) sums
    times = []
    for step in range(steps):
        delta.fill(1e-3 / (step + 1))
        dist.barrier()
        t0 = time.perf_counter()
        total = comm.all_reduce_sum(delta)
        t1 = time.perf_counter()
        est.partial_fit_external(total, None, 32 * world, 0)  # evictions are in the total
        t2 = time.perf_counter()
        times.append((t1 - t0, t2 - t1))
    dist.destroy_process_group()
    queue.put((rank, times, comm.bytes // steps))


def collective_step_cost(dim: int, k: int = 7, workers: int = 2, steps: int = 4) -> dict:
    """Per-step collective (all-reduce of K * d float64) and update seconds, and bytes per
    worker, with ``workers`` gloo processes on this machine and no model (synthetic sums)."""
    import numpy as np
    import torch.multiprocessing as mp

    from gs_ray.local_ray import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_collective_rank, args=(r, workers, port, dim, k, steps, queue))
        for r in range(workers)
    ]
    for proc in procs:
        proc.start()
    got = [queue.get(timeout=1800) for _ in procs]
    for proc in procs:
        proc.join()
    per_rank = [np.array(times[1:]) for _, times, _ in got]  # the first step warms up
    coll = float(max(np.median(t[:, 0]) for t in per_rank))
    upd = float(max(np.median(t[:, 1]) for t in per_rank))
    payload = got[0][2]
    return {
        "dim": dim,
        "k": k,
        "workers": workers,
        "collective_seconds": coll,
        "update_seconds": upd,
        "step_seconds": coll + upd,
        "allreduce_payload_bytes_per_worker": payload,
        "ring_bytes_sent_per_worker": int(2 * (workers - 1) / workers * payload),
    }


# ---------------------------------------------------- busy share: the real actor, synthetic workers


class SyntheticComputer:
    """A model-free stand-in for ``GradientComputer``: planted gradient rows (K centres plus
    noise, the same centres on every worker) after a fixed compute time per batch, slept (a
    GPU's time: it takes no CPU from the centroid actor)."""

    nonfinite = "fail"

    def __init__(self, dim: int, k: int, compute_s: float, seed: int, batch: int = 32):
        import numpy as np

        means = planted_means(dim, k)
        rng = np.random.default_rng(seed)
        self.pool = [
            (means[rng.integers(0, k, batch)] + 2 * rng.standard_normal((batch, dim))).astype(
                np.float32
            )
            for _ in range(4)
        ]
        self.compute_s, self.calls = compute_s, 0

    def __call__(self, pairs: list):
        self.calls += 1
        time.sleep(self.compute_s)
        return self.pool[pairs[0][0] % len(self.pool)][: len(pairs)]

    def layout(self) -> dict:
        return {}


def planted_means(dim: int, k: int):
    import numpy as np

    return np.random.default_rng(12345).standard_normal((k, dim)).astype(np.float32)


def synthetic_classes():
    """(worker, host) classes for the synthetic pass: the real ``GradientWorker`` (both
    transports' worker side) around a ``SyntheticComputer``, and the real ``CentroidHost``
    with K planted centroids in place of the validation pass."""
    import threading

    from gs_ray.stage2.host import CentroidHost
    from gs_ray.stage2.worker import GradientWorker

    class SyntheticWorker(GradientWorker):
        def __init__(self, dim: int, k: int, compute_s: float, seed: int):
            self.computer = SyntheticComputer(dim, k, compute_s, seed)
            self.faults, self.marker_dir, self.busy_seconds = [], "", 0.0
            self.model_lock = threading.Lock()
            self._init_partial_sums(reconstructed=False)

    class PlantedHost(CentroidHost):
        def plant(self, dim: int, k: int) -> None:
            c = self.clusterer
            c.n_clusters_, c.cluster_centers_ = k, planted_means(dim, k)
            c._reset_online_state(dim)

    return SyntheticWorker, PlantedHost


def synthetic_busy(
    dim: int, k: int, workers: int, transport: str, compute_s: float, batches: int
) -> dict:
    """The online pass of ``batches`` batches of 32 through the real centroid actor and the
    transport's real calls, from ``workers`` synthetic gradient workers (Ray must be up):
    the share of the pass's wall time the centroid actor is busy, and its time per batch."""
    from collections import deque

    import numpy as np
    import ray

    from gs_ray.core.clustering import GradientSpaceClustering
    from gs_ray.stage2.plan import ONLINE
    from gs_ray.stage2.transports import TRANSPORTS, make_transport
    from gs_ray.stage2.worker import worker_actor_class

    worker_cls, host_cls = synthetic_classes()
    tr = make_transport(transport)
    Worker = worker_actor_class(worker_cls).options(num_cpus=0)
    ws = [Worker.remote(dim, k, compute_s, seed) for seed in range(workers)]
    est = GradientSpaceClustering(n_clusters=k, cache=TRANSPORTS[transport].cache)
    host = ray.remote(host_cls).options(num_cpus=0).remote(est, 32 * batches)
    tr.bind(ws)
    try:
        ray.get([host.plant.remote(dim, k), *[w.stats.remote() for w in ws]])
        tr.start_phase(ONLINE, host)
        window: deque = deque()
        start = time.perf_counter()
        for t in range(batches):
            idx = np.arange(32 * t, 32 * (t + 1))
            pairs, ids = [(t, j) for j in range(32)], [f"{t}-{j}" for j in range(32)]
            window.append(tr.submit((ONLINE, 0, t), t, idx, ids, pairs, t % workers, host))
            while len(window) > 2 * workers:  # stage2.max_in_flight = 2
                ray.get(window.popleft())
        while window:
            ray.get(window.popleft())
        wall = time.perf_counter() - start
        busy = ray.get(host.status.remote())["busy_seconds"]
    finally:
        for actor in [*ws, host]:
            ray.kill(actor)
    return {
        "dim": dim,
        "k": k,
        "workers": workers,
        "transport": transport,
        "compute_s_per_batch": compute_s,
        "batches": batches,
        "seconds": wall,
        "ideal_seconds": batches * compute_s / workers,
        "centroid_busy_fraction": busy / wall,
        "centroid_ms_per_batch": 1e3 * busy / batches,
        # the per-batch compute time below which this actor would be busy more than 5%
        "break_even_compute_s_at_5pct": busy / batches * workers / 0.05,
    }


def actor_update_cost(
    dim: int, k: int = 7, batch: int = 32, alpha: int = 5, steps: int = 12
) -> dict:
    """Seconds per online batch of the centroid host's own work, without Ray, at gradient
    dimension ``dim``: the exact cache (assign + FIFO of vectors) against the external cache
    (ledger + per-cluster sums, as with the partial_sums transport)."""
    import numpy as np

    from gs_ray.core.clustering import GradientSpaceClustering
    from gs_ray.core.cosine import cluster_sums, cosine_assign, normalize_rows

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
    parser.add_argument("--transports", default="gradients,partial_sums,collective")
    parser.add_argument(
        "--collective-dim",
        type=int,
        default=16_777_216,
        help="gradient dimension of the synthetic collective step (Llama-2-7B LoRA: 16,777,216)",
    )
    parser.add_argument("--collective-workers", type=int, default=2)
    parser.add_argument("--only-synthetic", action="store_true", help="skip the Ray runs")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="the model-free parts at small d (65,536 collective, 4,096 host): seconds",
    )
    parser.add_argument(
        "--busy-ks",
        default="2,4,8,16",
        help="K values of the busy-share sweep (2 workers, real passes with the default "
        "checkpoint interval, and the synthetic passes); empty: no sweep",
    )
    parser.add_argument(
        "--synthetic-workers",
        default="2,8",
        help="worker counts of the synthetic passes (real centroid actor, model-free workers)",
    )
    parser.add_argument(
        "--synthetic-compute-s",
        type=float,
        default=None,
        help="compute time per batch of 32 of a synthetic worker (default: the 1-worker exact "
        "pass's, measured here; 0.37 s with --only-synthetic, as measured on the 2-core CPU)",
    )
    parser.add_argument("--synthetic-batches", type=int, default=48)
    parser.add_argument("--synthetic-dim", type=int, default=65_536)
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
    from gs_ray.ray_utils import init_ray
    from gs_ray.training.pretrain import base_model_for
    from gs_ray.training.warmup import warmup_local

    setup_logging("WARNING")
    if args.smoke:
        args.only_synthetic, args.collective_dim, args.actor_dim = True, 65_536, 4_096
        args.busy_ks, args.synthetic_workers, args.synthetic_dim = "4", "2", 4_096
        args.synthetic_batches, args.synthetic_compute_s = 8, 0.02
    if args.only_synthetic:
        init_ray(num_cpus=2, log_to_driver=False)  # RAY_ADDRESS (the suite's cluster), or a new one
        try:
            report = synthetic(args, {})
        finally:
            ray.shutdown()
        if args.json:
            from gs_ray.io import write_json

            write_json(Path(args.json), report)
        return report
    tmp = Path(tempfile.mkdtemp(prefix="gsr-bench-"))
    cfg = Config()
    cfg.data.demo_size = args.samples
    cfg.clustering.max_epochs = 1
    cfg.run.output_dir, cfg.run.name = str(tmp), "bench"
    prepared = prepare(cfg, base_model=base_model_for)
    warmup_local(prepared)
    start_local_ray(num_cpus=2, log_to_driver=False)  # loopback only, reaped with us
    results, sweep = [], []
    try:
        for transport in args.transports.split(","):
            for workers in (1, 2, 3) if transport == "collective" else (1, 2):
                results.append(
                    measure(prepared, cfg, workers, transport, tmp / f"ckpt-{transport}-{workers}")
                )
        for k in [int(k) for k in args.busy_ks.split(",") if k]:
            for transport in ("gradients", "partial_sums"):
                run = measure(prepared, cfg, 2, transport, tmp / f"ckpt-k{k}-{transport}", k, True)
                sweep.append({k_: v for k_, v in run.items() if k_ != "labels"})
        exact1 = next(r for r in results if r["transport"] == "gradients" and r["workers"] == 1)
        online1 = exact1["passes"]["online"]
        if args.synthetic_compute_s is None:  # one worker's time per batch, as measured here
            args.synthetic_compute_s = online1["seconds"] / online1["batches"]
        report = synthetic(args, {})
    finally:
        ray.shutdown()
        # the run and its checkpoints (GBs at K = 16): the figures are in the report
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nStage II scaling, embedded default, {len(prepared.samples)} samples, "
        f"{platform.machine()} {os.cpu_count()} CPUs"
    )
    print(
        f"{'transport':<13}{'workers':>8}{'pass':>8}{'s':>8}{'samples/s':>11}{'busy %':>8}"
        f"{'KB/sample':>11}"
    )
    for r in results:
        for phase, ps in r["passes"].items():
            print(
                f"{r['transport']:<13}{r['workers']:>8}{phase:>8}{ps['seconds']:>8.1f}"
                f"{ps['samples_per_s']:>11.1f}{100 * ps['centroid_busy_fraction']:>8.2f}"
                f"{ps['bytes_per_sample'] / 1024:>11.1f}"
            )
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
    if ("collective", 2) in by:
        same = all(
            np.array_equal(exact2["labels"], by[("collective", w)]["labels"]) for w in (1, 2, 3)
        )
        summary["same_assignments_collective"] = same
        summary["collective_step_seconds"] = {
            str(w): by[("collective", w)]["step_seconds"] for w in (1, 2, 3)
        }
        print(f"same_assignments_collective (1, 2, 3 workers vs exact): {same}")
        for w in (1, 2, 3):
            st = by[("collective", w)]["step_seconds"]
            print(
                f"collective {w} worker(s), per step: compute {1e3 * st['compute']:.1f} ms, "
                f"collective {1e3 * st['collective']:.1f} ms, update {1e3 * st['update']:.1f} ms"
            )
    if sweep:
        print(
            "\nbusy share of the centroid actor against K (2 workers, real passes, checkpoints "
            "every stage2.checkpoint_every batches)"
        )
        print(
            f"{'transport':<13}{'K':>4}{'online s':>10}{'busy %':>8}{'cpu %':>7}{'ckpt %':>8}"
            f"{'ms/batch':>10}"
        )
        for r in sweep:
            ps = r["passes"]["online"]
            print(
                f"{r['transport']:<13}{r['k']:>4}{ps['seconds']:>10.1f}"
                f"{100 * ps['centroid_busy_fraction']:>8.2f}"
                f"{100 * ps['centroid_busy_cpu_fraction']:>7.2f}"
                f"{100 * ps['checkpoint_fraction']:>8.2f}"
                f"{1e3 * ps['centroid_busy_fraction'] * ps['seconds'] / ps['batches']:>10.1f}"
            )
        summary["busy_against_k"] = [
            {
                "transport": r["transport"],
                "k": r["k"],
                "workers": 2,
                "centroid_busy_fraction": r["passes"]["online"]["centroid_busy_fraction"],
                "centroid_busy_cpu_fraction": r["passes"]["online"]["centroid_busy_cpu_fraction"],
                "checkpoint_fraction": r["passes"]["online"]["checkpoint_fraction"],
            }
            for r in sweep
        ]
    report = {
        **report,
        **summary,
        "runs": [{k: v for k, v in r.items() if k != "labels"} for r in results],
        "sweep_runs": sweep,
        "samples": len(prepared.samples),
    }
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), report)
    return report


def synthetic(args, report: dict) -> dict:
    """The model-free parts: the real centroid actor fed by synthetic workers (busy share
    against K and workers), centroid-host work per batch, the collective step at the 7B d."""
    import platform as _platform

    from gs_ray.rundir import versions

    summary = report
    compute_s = 0.37 if args.synthetic_compute_s is None else args.synthetic_compute_s
    rows = []
    for workers in [int(w) for w in args.synthetic_workers.split(",") if w]:
        for k in [int(k) for k in args.busy_ks.split(",") if k]:
            for transport in ("gradients", "partial_sums"):
                rows.append(
                    synthetic_busy(
                        args.synthetic_dim, k, workers, transport, compute_s, args.synthetic_batches
                    )
                )
    if rows:
        print(
            f"\nsynthetic workers (compute {1e3 * compute_s:.0f} ms per batch of 32, slept), "
            f"real centroid actor, d={args.synthetic_dim:,}, {args.synthetic_batches} batches"
        )
        print(
            f"{'transport':<13}{'workers':>8}{'K':>4}{'s':>8}{'ideal s':>9}{'busy %':>8}"
            f"{'ms/batch':>10}{'5% needs compute >= s':>23}"
        )
        for r in rows:
            print(
                f"{r['transport']:<13}{r['workers']:>8}{r['k']:>4}{r['seconds']:>8.2f}"
                f"{r['ideal_seconds']:>9.2f}{100 * r['centroid_busy_fraction']:>8.2f}"
                f"{r['centroid_ms_per_batch']:>10.1f}{r['break_even_compute_s_at_5pct']:>23.3f}"
            )
    summary["synthetic_busy"] = rows
    cost = actor_update_cost(args.actor_dim)
    per_elem = {c: 1e9 * v / args.actor_dim for c, v in cost.items()}
    print(
        f"\ncentroid host work per online batch (K=7, |B|=32, alpha=5, d={args.actor_dim:,}): "
        f"exact cache {1e3 * cost['samples']:.1f} ms, external cache {1e3 * cost['external']:.1f} "
        "ms "
        f"({per_elem['samples']:.1f} vs {per_elem['external']:.1f} ns per gradient dimension)"
    )
    summary["actor_seconds_per_batch"] = cost
    summary["actor_ns_per_dim_per_batch"] = per_elem
    summary["actor_dim"] = args.actor_dim
    coll = collective_step_cost(args.collective_dim, workers=args.collective_workers)
    scale = args.collective_dim / args.actor_dim
    summary["collective_7b"] = coll
    summary["collective_step_seconds_7b"] = coll["step_seconds"]
    summary["actor_seconds_per_batch_7b_extrapolated"] = {c: v * scale for c, v in cost.items()}
    print(
        f"\ncollective step at d={args.collective_dim:,}, K=7, {args.collective_workers} gloo "
        f"workers: all-reduce {coll['collective_seconds']:.2f} s + update "
        f"{coll['update_seconds']:.2f} s = {coll['step_seconds']:.2f} s per step; "
        f"{coll['allreduce_payload_bytes_per_worker'] / 1e6:.0f} MB all-reduced per worker "
        f"({coll['ring_bytes_sent_per_worker'] / 1e6:.0f} MB sent by a ring); centroid actor "
        f"at the same d (extrapolated): exact {cost['samples'] * scale:.2f} s, partial sums "
        f"{cost['external'] * scale:.2f} s per batch, plus receiving the batch"
    )
    report = {
        **summary,
        "cpus": os.cpu_count(),
        "machine": _platform.machine(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "versions": versions(),
    }
    return report


if __name__ == "__main__":
    main()
