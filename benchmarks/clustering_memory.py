"""Peak memory of the clusterer's initialisation (SVD + K selection) against its input size.

Each gradient dimension d runs in a fresh subprocess: it builds n planted float32 gradients
(n, d) in row chunks (so building them costs little beyond the array itself), then calls
``GradientSpaceClustering.initialize`` and reports

- ``extra_peak``: the largest amount of memory allocated by ``initialize`` on top of the input
  (tracemalloc, which NumPy reports its buffers to), and
- ``peak_rss``: the process's peak resident set (VmHWM: interpreter, libraries, input and
  ``initialize`` together),

each also as a ratio to the input's size. Target (issue 10): peak under 2x the float32 input at
d = 3.4e6, n = 256. The default ``--cache external`` leaves out the exact cluster cache
(K * alpha * batch_size * d float32, the online state, allocated by ``initialize`` but not part
of the SVD); ``--cache samples`` includes it.

    python benchmarks/clustering_memory.py --json benchmarks/results/clustering_memory.json
    python benchmarks/clustering_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

GB = 2**30


def _rss_hwm() -> tuple[int, int]:
    """(current, peak) resident set of this process in bytes, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def child(d: int, n: int, k: int, cache: str, seed: int) -> dict:
    """One measurement, in this (fresh) process."""
    import tracemalloc

    import numpy as np

    from gs_ray.core.clustering import GradientSpaceClustering

    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((k, d), dtype=np.float32)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    labels = rng.integers(0, k, n)
    G = np.empty((n, d), dtype=np.float32)
    step = 8
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        noise = rng.standard_normal((rows.stop - rows.start, d), dtype=np.float32)
        noise *= 0.8 / np.sqrt(d)
        noise += dirs[labels[rows]]
        noise *= (10.0 ** rng.uniform(-1, 0, rows.stop - rows.start)).astype(np.float32)[:, None]
        G[rows] = noise
        del noise
    del dirs
    rss_before, _ = _rss_hwm()
    tracemalloc.start()
    start = time.perf_counter()
    est = GradientSpaceClustering(cache=cache, random_state=seed).initialize(G)
    seconds = time.perf_counter() - start
    _, extra_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    _, hwm = _rss_hwm()
    return {
        "d": d,
        "n": n,
        "cache": cache,
        "input_bytes": G.nbytes,
        "rss_before_bytes": rss_before,
        "extra_peak_bytes": extra_peak,
        "peak_rss_bytes": hwm,
        "extra_peak_ratio": extra_peak / G.nbytes,
        "peak_rss_ratio": hwm / G.nbytes,
        "seconds": round(seconds, 2),
        "k": est.n_clusters_,
        "planted_k": k,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dims", type=float, nargs="+", default=[1e5, 1e6, 3.4e6])
    ap.add_argument("--quick", action="store_true", help="small dims (1e4, 1e5) for a smoke run")
    ap.add_argument("--smoke", action="store_true", help="d = 1e4 and n = 64 only: seconds")
    ap.add_argument("--n", type=int, default=256, help="validation gradients (rows)")
    ap.add_argument("--k", type=int, default=5, help="planted clusters")
    ap.add_argument("--cache", choices=["external", "samples"], default="external")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows to this JSON file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(int(args.dims[0]), args.n, args.k, args.cache, args.seed)))
        return
    if args.smoke:
        args.dims, args.n = [1e4], 64
    dims = [1e4, 1e5] if args.quick else args.dims
    rows = []
    header = f"{'d':>10} {'n':>5} {'input GB':>9} {'extra peak GB':>14} {'x input':>8} "
    header += f"{'peak RSS GB':>12} {'x input':>8} {'s':>7} {'K':>3}"
    print(header)
    for d in dims:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--dims",
            str(d),
            "--n",
            str(args.n),
            "--k",
            str(args.k),
            "--cache",
            args.cache,
            "--seed",
            str(args.seed),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(
            f"{r['d']:>10,} {r['n']:>5} {r['input_bytes'] / GB:>9.3f} "
            f"{r['extra_peak_bytes'] / GB:>14.3f} {r['extra_peak_ratio']:>8.3f} "
            f"{r['peak_rss_bytes'] / GB:>12.3f} {r['peak_rss_ratio']:>8.3f} "
            f"{r['seconds']:>7.1f} {r['k']:>3}",
            flush=True,
        )
    if args.json:
        from gs_ray.io import write_json

        write_json(Path(args.json), {"rows": rows})


if __name__ == "__main__":
    main()
