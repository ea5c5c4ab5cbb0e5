"""Stage II's checkpoint against the gradient dimension d: bytes, write time, read time.

The centroid actor's checkpoint (``CentroidHost.save_checkpoint``: ``gs_ray/statefile.py``,
arrays as raw bytes in ``.bin``, the rest in JSON) holds what the host needs to resume exactly:

- the validation gradients: ``data.n_val`` rows (256), kept for the result's metrics;
- the exact cluster caches (``cache=samples``, the default ``gradients`` transport):
  K * alpha * |B| rows (7 * 5 * 32 = 1,120 at K = 7); the ``partial_sums`` transport's
  ledger (``cache=external``) keeps no rows, only (batch, row) entries and the batches' tokens;
- the centroids and the epoch's first centroids (float32) and the running sums (float64):
  4 K rows' worth.

This builds that state with the real host (``CentroidHost`` with the default config's
clusterer, K fixed) from synthetic planted gradient rows (no model): the validation pass,
K selection, then online batches until every cluster's cache is full. It saves the state
(``save_checkpoint``, as the Ray executor does every ``stage2.checkpoint_every`` batches and at
every phase end), flushes it to disk (fsync, which gs-ray does not do: the time the disk takes),
and loads it into a fresh host (``load_checkpoint``; from the page cache, just written), at
each d. Rows per d are what the default config holds, so bytes grow as rows * 4 d.

    python benchmarks/stage2_checkpoint.py --json benchmarks/results/stage2_checkpoint.json
    python benchmarks/stage2_checkpoint.py --smoke     # seconds: small d, K = 3

Runs whose state would not fit ``--max-gb`` (about 2.2x the state at the peak: the state,
its copy while saving, the loaded copy) are skipped and listed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gs_ray.config import Config  # noqa: E402
from gs_ray.stage2.batch import GradientBatch  # noqa: E402
from gs_ray.stage2.host import CentroidHost  # noqa: E402
from gs_ray.stage2.launch import make_clusterer  # noqa: E402
from gs_ray.stage2.plan import ONLINE, VAL  # noqa: E402

GB = 2**30
# LoRA r = 32 on q_proj and v_proj (docs/scaling.md): 16 layers * (2*32*2048 + 32*2048 + 512*32)
# for Llama-3.2-1B, 32 layers * 4 * 32 * 4096 for Llama-2-7B.
D_1B = 3_407_872
D_7B = 16_777_216
TRANSPORT = {"samples": "gradients", "external": "partial_sums"}


def config(k: int, n_val: int, alpha: int, batch: int, cache: str) -> Config:
    cfg = Config()
    cfg.clustering.n_clusters = k
    cfg.clustering.alpha = alpha
    cfg.clustering.batch_size = batch
    cfg.data.n_val = n_val
    cfg.stage2.transport = TRANSPORT[cache]
    return cfg


def state_rows(k: int, n_val: int, alpha: int, batch: int, cache: str) -> int:
    """Gradient rows (float32, d each) the state holds: validation rows, cached rows, and the
    centroids, the epoch's first centroids and the float64 sums (2 rows each) per cluster."""
    return n_val + (k * alpha * batch if cache == "samples" else 0) + 4 * k


class Planted:
    """Rows of K planted directions plus as much noise (cosine ~0.7 to their own direction),
    cluster of row i = i mod K: every cluster gets the same number of rows."""

    def __init__(self, d: int, k: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.k, self.d = k, d
        dirs = self.rng.standard_normal((k, d), dtype=np.float32)
        self.dirs = dirs / np.linalg.norm(dirs, axis=1, keepdims=True)

    def rows(self, start: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (start + np.arange(n)) % self.k
        G = self.rng.standard_normal((n, self.d), dtype=np.float32)
        G *= np.float32(1 / np.sqrt(self.d))
        G += self.dirs[labels]
        return G, labels


def build_host(
    d: int, k: int, n_val: int, alpha: int, batch: int, cache: str, tokens: int, seed: int
) -> tuple[CentroidHost, Config]:
    """The host after the validation pass, K selection and online batches that fill every
    cluster's cache (cache=samples: rows; external: ledger entries and the batches' tokens)."""
    cfg = config(k, n_val, alpha, batch, cache)
    n_online = k * alpha * batch
    n_samples = n_val + n_online

    def no_evictions(plan):  # the caches only fill here
        raise AssertionError("the benchmark fills the caches, never evicts")

    host = CentroidHost(make_clusterer(cfg), n_samples)
    gen = Planted(d, k, seed)
    for t, start in enumerate(range(0, n_val, batch)):
        G, _ = gen.rows(start, min(batch, n_val - start))
        host.apply(VAL, 0, t, np.arange(start, start + len(G)), GradientBatch(G))
    host.initialize()
    # the planted direction of each found cluster: rows are sent to the cluster they join
    centers = host.centers()
    to_cluster = np.argmax(gen.dirs @ centers.T, axis=1)
    pair = (list(range(tokens)), list(range(tokens)))
    for t, start in enumerate(range(0, n_online, batch)):
        G, planted = gen.rows(start, batch)
        idx = n_val + start + np.arange(batch)
        if cache == "samples":
            host.apply(ONLINE, 0, t, idx, GradientBatch(G))
        else:
            labels = to_cluster[planted]
            unit = G / np.linalg.norm(G, axis=1, keepdims=True)
            sums = np.zeros((k, d), dtype=np.float64)
            np.add.at(sums, labels, unit)
            out = {
                "labels": labels,
                "keep": np.ones(batch, dtype=bool),
                "start_labels": labels,
                "sums": sums,
                "n_zero": 0,
            }
            host.apply_sums(t, 0, t, out, [pair] * batch, 0, no_evictions)
    counts = host.clusterer.cache_count_
    if not (counts == alpha * batch).all():
        raise RuntimeError(f"caches not filled evenly: {counts.tolist()} (d={d})")
    return host, cfg


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def measure(
    d: int,
    k: int,
    n_val: int,
    alpha: int,
    batch: int,
    cache: str,
    tokens: int,
    repeats: int,
    seed: int,
    work: Path,
) -> dict:
    start = time.perf_counter()
    host, cfg = build_host(d, k, n_val, alpha, batch, cache, tokens, seed)
    built = time.perf_counter() - start
    folder = work / f"ckpt-{cache}-{d}"
    writes, syncs, reads = [], [], []
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        host.save_checkpoint(folder)
        t1 = time.perf_counter()
        _fsync_folder(folder)
        t2 = time.perf_counter()
        fresh = CentroidHost(make_clusterer(cfg), len(host.labels))
        t3 = time.perf_counter()
        assert fresh.load_checkpoint(folder)
        t4 = time.perf_counter()
        writes.append(t1 - t0)
        syncs.append(t2 - t1)
        reads.append(t4 - t3)
        if not (
            np.array_equal(fresh.centers(), host.centers()) and fresh.position == host.position
        ):
            raise RuntimeError("the checkpoint did not restore the state")
        del fresh
    files = {p.name: p.stat().st_size for p in folder.iterdir()}
    nbytes = sum(files.values())
    rewrites = []  # saves alternate between two array files, overwritten in place: steady state
    for _ in range(3):
        t0 = time.perf_counter()
        host.save_checkpoint(folder)
        rewrites.append(time.perf_counter() - t0)
    rows = state_rows(k, n_val, alpha, batch, cache)
    shutil.rmtree(folder, ignore_errors=True)
    write, sync, read = min(writes), min(syncs), min(reads)
    return {
        "d": d,
        "cache": cache,
        "transport": TRANSPORT[cache],
        "k": k,
        "rows": rows,
        "bytes": nbytes,
        "bytes_per_row": nbytes / rows,
        "row_equivalents": nbytes / (4 * d),
        "bin_bytes": files.get("centroids.0.bin"),
        "json_bytes": files.get("centroids.json"),
        "write_s": round(write, 4),
        "rewrite_s": round(rewrites[-1], 4),
        "fsync_s": round(sync, 4),
        "read_s": round(read, 4),
        "write_fsync_mb_s": round(nbytes / (write + sync) / 1e6, 1),
        "build_s": round(built, 2),
        "repeats": repeats,
    }


def extrapolate(rows: list[dict], k: int, n_val: int, alpha: int, batch: int) -> dict:
    """Bytes at d = 3.4M (1B) and 16.8M (7B) from the rows the state holds (bytes per row =
    4 d, as measured), seconds from the write + fsync rate of the largest d measured."""
    out = {}
    for cache in ("samples", "external"):
        measured = [r for r in rows if r["cache"] == cache]
        if not measured:
            continue
        top = max(measured, key=lambda r: r["d"])
        overhead = top["bytes"] / (top["rows"] * 4 * top["d"])  # ~1: the arrays are the state
        n_rows = state_rows(k, n_val, alpha, batch, cache)
        out[cache] = {}
        for name, d in (("llama-3.2-1b", D_1B), ("llama-2-7b", D_7B)):
            nbytes = n_rows * 4 * d * overhead
            out[cache][name] = {
                "d": d,
                "rows": n_rows,
                "bytes": int(nbytes),
                "gb": round(nbytes / 1e9, 1),
                "write_fsync_s_at_measured_rate": round(
                    nbytes / (top["write_fsync_mb_s"] * 1e6), 1
                ),
                "rate_from_d": top["d"],
            }
    return out


def _print(rows: list[dict], skipped: list[dict], extra: dict) -> None:
    print(
        "| cache (transport) | d | rows | bytes | bytes/row | write s | rewrite s | fsync s | "
        "read s | write+fsync MB/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['cache']} ({r['transport']}) | {r['d']:,} | {r['rows']:,} | "
            f"{r['bytes']:,} | {r['bytes_per_row']:,.0f} | {r['write_s']:.3f} | "
            f"{r['rewrite_s']:.3f} | {r['fsync_s']:.3f} | {r['read_s']:.3f} | "
            f"{r['write_fsync_mb_s']:,.0f} |"
        )
    for s in skipped:
        print(f"skipped: {s['cache']} d={s['d']:,}: about {s['peak_gb']:.1f} GB at the peak")
    for cache, models in extra.items():
        for name, e in models.items():
            print(
                f"extrapolated, {cache}, {name} (d = {e['d']:,}): {e['gb']} GB, "
                f"{e['write_fsync_s_at_measured_rate']} s at the rate measured at "
                f"d = {e['rate_from_d']:,}"
            )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--dims",
        default="16384,32768,65536,131072,262144,524288,1048576",
        help="gradient dimensions d (comma-separated)",
    )
    ap.add_argument("--caches", default="samples,external")
    ap.add_argument("--k", type=int, default=7, help="clusters (docs/scaling.md uses K = 7)")
    ap.add_argument("--n-val", type=int, default=Config().data.n_val)
    ap.add_argument("--alpha", type=int, default=Config().clustering.alpha)
    ap.add_argument("--batch", type=int, default=Config().clustering.batch_size)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per sample (the ledger's)")
    ap.add_argument("--repeats", type=int, default=2, help="saves and loads per d (best kept)")
    ap.add_argument("--max-gb", type=float, default=4.0, help="skip states whose peak exceeds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="folder for the checkpoints (default: a temporary one)")
    ap.add_argument("--smoke", action="store_true", help="d = 1,024 and 4,096, K = 3: seconds")
    ap.add_argument("--json", help="write the results to this JSON file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.dims, args.k, args.n_val, args.alpha, args.batch = "1024,4096", 3, 24, 2, 8
        args.tokens, args.repeats = 16, 1
    dims = [int(x) for x in args.dims.split(",")]
    caches = [c.strip() for c in args.caches.split(",")]
    rows, skipped = [], []
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gs-ray-ckpt-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        for cache in caches:
            for d in dims:
                n = state_rows(args.k, args.n_val, args.alpha, args.batch, cache)
                peak = 2.2 * n * 4 * d / GB
                if peak > args.max_gb:
                    skipped.append({"cache": cache, "d": d, "peak_gb": round(peak, 2)})
                    continue
                rows.append(
                    measure(
                        d,
                        args.k,
                        args.n_val,
                        args.alpha,
                        args.batch,
                        cache,
                        args.tokens,
                        args.repeats,
                        args.seed,
                        work,
                    )
                )
                r = rows[-1]
                print(
                    f"{cache} d={d:,}: {r['bytes'] / 1e6:,.1f} MB, write {r['write_s']:.3f} s "
                    f"+ fsync {r['fsync_s']:.3f} s, read {r['read_s']:.3f} s",
                    flush=True,
                )
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    extra = extrapolate(rows, args.k, args.n_val, args.alpha, args.batch)
    result = {
        "rows": rows,
        "skipped": skipped,
        "extrapolation": extra,
        "settings": {
            "k": args.k,
            "n_val": args.n_val,
            "alpha": args.alpha,
            "batch_size": args.batch,
            "tokens": args.tokens,
            "repeats": args.repeats,
            "smoke": args.smoke,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "date": time.strftime("%Y-%m-%d"),
    }
    _print(rows, skipped, extra)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
