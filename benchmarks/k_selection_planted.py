"""The K-selection rule on planted mixtures: the K found, the ARI against the planted labels
and the structure verdict, over a grid of cases and seeds (tests/planted_mixtures.py).

    python benchmarks/k_selection_planted.py                # the full grid, markdown table
    python benchmarks/k_selection_planted.py --seeds 2 --d 64

Each row: the case, d, the planted K, the K found per seed, the mean ARI of the initial
partition (the K selection's own K-means labels) against the planted labels, how many seeds
were called weak (``summary()["structure"]["weak"]``, when the estimator reports it) and the
mean seconds per ``initialize`` (n rows, k_max = 8, n_init = 10, one thread).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from planted_mixtures import make  # noqa: E402

from gs_ray.core.clustering import GradientSpaceClustering  # noqa: E402

CASES = {  # name -> (planted K, generator kwargs)
    "separated K=5 (cos 0, noise 1)": (5, dict(gen="mixture", k=5, cos=0.0, noise=1.0)),
    "separated K=5 (cos 0, noise 2.5)": (5, dict(gen="mixture", k=5, cos=0.0, noise=2.5)),
    "overlapping K=5 (cos 0.5, noise 1)": (5, dict(gen="mixture", k=5, cos=0.5, noise=1.0)),
    "overlapping K=5 (cos 0.5, noise 1.5)": (5, dict(gen="mixture", k=5, cos=0.5, noise=1.5)),
    "overlapping K=5 (cos 0.5, noise 2)": (5, dict(gen="mixture", k=5, cos=0.5, noise=2.0)),
    "overlapping K=3 (cos 0.5, noise 1.5)": (3, dict(gen="mixture", k=3, cos=0.5, noise=1.5)),
    "separated K=8 (cos 0.2, noise 1.5)": (8, dict(gen="mixture", k=8, cos=0.2, noise=1.5)),
    "one cluster, Gaussian (noise 1)": (1, dict(gen="one_cluster", kind="gaussian", noise=1.0)),
    "one cluster, Gaussian (noise 3)": (1, dict(gen="one_cluster", kind="gaussian", noise=3.0)),
    "one cluster, anisotropic (noise 1)": (1, dict(gen="one_cluster", kind="anisotropic")),
    "one cluster, heavy-tailed t2 (noise 1)": (1, dict(gen="one_cluster", kind="heavy")),
    "structureless": (1, dict(gen="structureless")),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--d", type=int, nargs="+", default=[64, 1024])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--only", default="", help="substring of the case names to run")
    p.add_argument("--smoke", action="store_true", help="two cases, one seed, d=32, n=96: seconds")
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args(argv)
    if a.smoke:
        a.seeds, a.d, a.n = 1, [32], 96
    rows = []
    print("| case | d | K planted | K found per seed | mean ARI | weak | s/init |")
    print("|---|---|---|---|---|---|---|")
    smoke_cases = {next(iter(CASES)), "structureless"}
    for name, (k_true, case) in CASES.items():
        if a.only not in name or (a.smoke and name not in smoke_cases):
            continue
        for d in a.d:
            ks, aris, weak, secs = [], [], [], []
            for seed in range(a.seeds):
                X, y = make({**case, "n": a.n, "d": d}, seed)
                t = time.perf_counter()
                est = GradientSpaceClustering(random_state=seed).initialize(X)
                secs.append(time.perf_counter() - t)
                ks.append(est.n_clusters_)
                keep = np.linalg.norm(X, axis=1) > 0
                aris.append(adjusted_rand_score(y[keep], est.init_labels_))
                structure = est.summary().get("structure")
                weak.append(None if structure is None else structure["weak"])
            w = "-" if weak[0] is None else f"{sum(weak)}/{len(weak)}"
            rows.append(
                {
                    "case": name,
                    "d": d,
                    "n": a.n,
                    "k_planted": k_true,
                    "k_found": ks,
                    "mean_ari": float(np.mean(aris)),
                    "weak": weak,
                    "seconds_per_init": float(np.mean(secs)),
                }
            )
            print(
                f"| {name} | {d} | {k_true} | {' '.join(map(str, ks))} | "
                f"{np.mean(aris):.2f} | {w} | {np.mean(secs):.1f} |",
                flush=True,
            )
    if a.json:
        from gs_ray.io import write_json

        write_json(Path(a.json), {"rows": rows})


if __name__ == "__main__":
    with threadpool_limits(1):
        main()
