"""Time per stage of the whole pipeline, and parallel against sequential expert training.

Runs ``gs-ray run`` (every stage, on a local Ray) on the embedded default, or on ``--config``.
Then, in the same process and on the same cluster, it trains the same K experts again one after
another: the same jobs, the same data, into scratch folders. It reports:

* each stage's wall time, from the run manifest;
* the experts stage run in parallel against the same experts trained sequentially.

    python benchmarks/pipeline_stages.py --json benchmarks/results/pipeline_stages.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def sequential_experts(run_dir: Path, scratch: Path) -> tuple[float, dict]:
    """Train the run's experts again, one after another; (wall seconds, records)."""
    from gs_ray.prepare import prepare
    from gs_ray.rundir import RunDir
    from gs_ray.training.experts import expert_job
    from gs_ray.training.pretrain import base_model_for
    from gs_ray.training.ray_train import train_many_on_ray

    run = RunDir(run_dir)
    p = prepare(run.config(), run, base_model=base_model_for)
    labels, k = p.assignments()
    jobs = [
        expert_job(p, labels, c, str(scratch / f"e{c}"), name=f"seq_expert_{c}") for c in range(k)
    ]
    start = time.perf_counter()
    records = train_many_on_ray(jobs, p.cfg.model, p.cfg.lora, p.cfg.experts, p.pad_id,
                                str(scratch.resolve() / "ray_train"), parallel=False)  # fmt: skip
    return time.perf_counter() - start, records


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the embedded default)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import ray

    from gs_ray import pipeline
    from gs_ray.config import load_config
    from gs_ray.logs import setup_logging
    from gs_ray.rundir import versions

    setup_logging("INFO")
    tmp = Path(tempfile.mkdtemp(prefix="gsr-stages-"))
    cfg = load_config(args.config, ["--run.output_dir", str(tmp), "--run.name", "bench"])
    start = time.perf_counter()
    run = pipeline.run(cfg)
    total = time.perf_counter() - start
    manifest = run.manifest()
    stages = {name: st["seconds"] for name, st in manifest["stages"].items()}
    k = manifest["stages"]["stage2"]["k"]
    parallel_s = stages["experts"]
    seq_s, records = sequential_experts(run.path, tmp / "sequential")
    if not all(r.get("ok") for r in records.values()):
        raise RuntimeError(f"sequential expert training failed: {records}")
    ray.shutdown()

    cpus = os.cpu_count()
    device = "GPU" if _gpu() else "no GPU"
    print(f"\nPipeline stages, {args.config or 'embedded default'}, K={k}, {cpus} CPUs, {device}")
    print(f"{'stage':<12}{'seconds':>10}{'share':>8}")
    for name, sec in stages.items():
        print(f"{name:<12}{sec:>10.1f}{100 * sec / sum(stages.values()):>7.1f}%")
    print(f"{'total':<12}{sum(stages.values()):>10.1f}   (wall incl. Ray start-up {total:.1f}s)")
    speedup = seq_s / parallel_s
    print(f"\nexperts: {k} in parallel {parallel_s:.1f}s, one after another {seq_s:.1f}s "
          f"-> speed-up {speedup:.2f}x")  # fmt: skip
    report = {
        "stages_seconds": stages, "total_seconds": sum(stages.values()), "wall_seconds": total,
        "k": k, "experts_parallel_seconds": parallel_s, "experts_sequential_seconds": seq_s,
        "experts_parallel_speedup": speedup, "cpus": cpus, "versions": versions(),
        "run_dir": str(run.path),
    }  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
