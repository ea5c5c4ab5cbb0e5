"""Time per stage of the whole pipeline, and the experts packed into shared Ray Train runs against
one run per adapter.

Runs ``gs-ray run`` (every stage, on a local Ray) on the embedded default, or on ``--config``, or
reads a finished run (``--run-dir``). Then, in the same process and on the same cluster, it
trains the run's adapters (the K experts and the generalist) again twice, into scratch folders:
packed (``experts.pack: auto``, the default: as many runs as the cluster holds at once) and as
the reference, one Ray Train run per adapter (``pack: off``), both in parallel. It reports:

* each stage's wall time, from the run manifest;
* the two trainings' wall times, the speed-up, and whether they gave identical adapters (they
  must: packing changes how many worker start-ups are paid, not what is trained).

    python benchmarks/pipeline_stages.py --json benchmarks/results/pipeline_stages.json
    python benchmarks/pipeline_stages.py --smoke --json /tmp/p.json   # tiny sizes, minutes

``--smoke`` runs a small pipeline (240 demo samples, one online epoch) and trains one Ray Train
run instead of two (each run's start-up costs more CPU than these adapters' steps): where the run
trained several adapters in one shared run, the one of them with the fewest steps is trained
again alone, with the run's own settings, and compared with the run's (packed = alone, against
what the pipeline itself trained); otherwise two adapters with at most 2 steps each are
trained packed into one run and the second of them again alone. No speed-up is reported then.
That an adapter trained in a shared run equals the one trained alone is checked only here: the
suite runs this smoke on its end-to-end run (tests/test_pipeline.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

SMOKE_RUN = ["--data.demo_size", "240", "--clustering.max_epochs", "1", "--experts.max_steps", "4"]
SMOKE_STEPS = 2
SMOKE_ADAPTERS = 2  # packed into one run; the last of them also alone, in a run of its own


def retrain(
    run_dir: Path, scratch: Path, max_steps: int | None = None, smoke: bool = False
) -> dict:
    """The run's adapters trained again, packed and one run per adapter; wall seconds of each,
    and whether every adapter came out the same both ways. ``smoke``: the first
    ``SMOKE_ADAPTERS`` of them, packed into a single run, and the last of these alone."""
    from gs_ray.prepare import prepare
    from gs_ray.rundir import GENERALIST, RunDir
    from gs_ray.training.experts import expert_job, generalist_job
    from gs_ray.training.pretrain import base_model_for
    from gs_ray.training.ray_train import train_many_on_ray

    run = RunDir(run_dir)
    p = prepare(run.config(), run, base_model=base_model_for, read_only=True)
    try:
        labels, k = p.assignments()
        if smoke:
            shared = _one_of_a_shared_run(run, k, p.cfg.fallback.enabled)
            if shared is not None:
                return _alone_against_the_run(p, labels, k, shared, scratch)
        experts = p.cfg.experts
        if max_steps is not None:
            experts = dataclasses.replace(experts, max_steps=max_steps)
            p.cfg = dataclasses.replace(p.cfg, experts=experts)
        out = {}
        for pack in ("auto", "off"):
            folder = scratch / pack
            jobs = [expert_job(p, labels, c, str(folder / f"expert_{c}")) for c in range(k)]
            jobs = [j for j in jobs if j.samples]
            if p.cfg.fallback.enabled:
                jobs.append(generalist_job(p, labels, k, str(folder / GENERALIST)))
            if smoke:
                jobs = jobs[:SMOKE_ADAPTERS]
                if pack == "off":
                    jobs = jobs[-1:]  # the last of the packed ones, alone
            cfg = dataclasses.replace(experts, pack=pack, parallel=True)
            start = time.perf_counter()
            records = train_many_on_ray(
                jobs,
                p.cfg.model,
                p.cfg.lora,
                cfg,
                p.pad_id,
                str(folder.resolve() / "ray_train"),
                max_concurrent=1 if smoke and pack != "off" else None,
            )
            seconds = time.perf_counter() - start
            failed = {n: r.get("error") for n, r in records.items() if not r.get("ok")}
            if failed:
                raise RuntimeError(f"pack {pack}: training failed: {failed}")
            runs = sorted({r["run"] for r in records.values()})
            out[pack] = {"seconds": seconds, "runs": runs, "jobs": [j.name for j in jobs]}
        identical = all(
            _same_adapter(scratch / "auto" / name, scratch / "off" / name)
            for name in out["off"]["jobs"]
        )
    finally:
        p.run.release_lock()
    return {
        "adapters": len(out["auto"]["jobs"]),
        "packed_runs": out["auto"]["runs"],
        "experts_packed_seconds": out["auto"]["seconds"],
        "experts_unpacked_seconds": out["off"]["seconds"],
        "packing_speedup": None if smoke else out["off"]["seconds"] / out["auto"]["seconds"],
        "packed": out["auto"]["jobs"],
        "alone": out["off"]["jobs"],
        "identical": identical,
        "k": k,
    }


def _one_of_a_shared_run(run, k: int, generalist: bool) -> str | None:
    """The adapter with the fewest steps among those the run trained in a Ray Train run shared
    with another adapter (its records' ``run``), or None where every adapter had a run alone."""
    from collections import Counter

    from gs_ray.rundir import GENERALIST, expert_name

    folders = {expert_name(c): run.expert(c) for c in range(k)}
    if generalist:
        folders[GENERALIST] = run.generalist
    records = {}
    for name, folder in folders.items():
        record = run.adapter_record(folder)
        if record and record.get("run") and record.get("steps"):
            records[name] = record
    sizes = Counter(r["run"] for r in records.values())
    shared = [n for n, r in records.items() if sizes[r["run"]] > 1]
    return min(shared, key=lambda n: (records[n]["steps"], n)) if shared else None


def _alone_against_the_run(p, labels, k: int, name: str, scratch: Path) -> dict:
    """``name`` (trained by the run in a shared Ray Train run) trained again alone, with the
    run's settings, and compared with the run's adapter."""
    from gs_ray.rundir import GENERALIST, expert_name
    from gs_ray.training.experts import expert_job, generalist_job
    from gs_ray.training.ray_train import train_many_on_ray

    folder = scratch / "off"
    if name == GENERALIST:
        job, theirs = generalist_job(p, labels, k, str(folder / name)), p.run.generalist
    else:
        c = next(c for c in range(k) if expert_name(c) == name)
        job, theirs = expert_job(p, labels, c, str(folder / name)), p.run.expert(c)
    cfg = dataclasses.replace(p.cfg.experts, pack="off", parallel=True)
    start = time.perf_counter()
    records = train_many_on_ray(
        [job], p.cfg.model, p.cfg.lora, cfg, p.pad_id, str(folder.resolve() / "ray_train")
    )
    seconds = time.perf_counter() - start
    if not records[name].get("ok"):
        raise RuntimeError(f"{name}: training failed: {records[name].get('error')}")
    packed_in = p.run.adapter_record(theirs)["run"]
    return {
        "adapters": 1,
        "packed_runs": [packed_in],
        "experts_packed_seconds": None,  # the run's own training
        "experts_unpacked_seconds": seconds,
        "packing_speedup": None,
        "packed": [name],
        "alone": [name],
        "identical": _same_adapter(theirs, folder / name),
        "k": k,
    }


def _same_adapter(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    wa = load_file(str(a / "adapter_model.safetensors"))
    wb = load_file(str(b / "adapter_model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[n] == wb[n]).all() for n in wa)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML config (default: the embedded default)")
    parser.add_argument("--run-dir", help="a finished run to read instead of running one")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (see the docstring)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)

    import ray

    from gs_ray import pipeline
    from gs_ray.config import load_config
    from gs_ray.logs import setup_logging
    from gs_ray.rundir import RunDir, versions

    setup_logging("INFO")
    tmp = Path(tempfile.mkdtemp(prefix="gsr-stages-"))
    start = time.perf_counter()
    if args.run_dir:
        run = RunDir(Path(args.run_dir))
        if not ray.is_initialized():
            from gs_ray.ray_utils import init_ray

            init_ray()
    else:
        overrides = ["--run.output_dir", str(tmp), "--run.name", "bench"]
        cfg = load_config(args.config, overrides + (SMOKE_RUN if args.smoke else []))
        run = pipeline.run(cfg)
    total = time.perf_counter() - start
    manifest = run.manifest()
    stages = {name: st["seconds"] for name, st in manifest["stages"].items()}
    again = retrain(run.path, tmp / "retrain", SMOKE_STEPS if args.smoke else None, args.smoke)
    # The retrained adapters are scratch; the run made here (no --run-dir) stays, reported.
    shutil.rmtree(tmp if args.run_dir else tmp / "retrain", ignore_errors=True)
    if not args.run_dir:
        ray.shutdown()

    cpus = os.cpu_count()
    device = "GPU" if _gpu() else "no GPU"
    what = args.run_dir or args.config or "embedded default"
    print(f"\nPipeline stages, {what}, K={again['k']}, {cpus} CPUs, {device}")
    print(f"{'stage':<12}{'seconds':>10}{'share':>8}")
    for name, sec in stages.items():
        print(f"{name:<12}{sec:>10.1f}{100 * sec / sum(stages.values()):>7.1f}%")
    print(f"{'total':<12}{sum(stages.values()):>10.1f}   (wall incl. Ray start-up {total:.1f}s)")
    speedup = again["packing_speedup"]
    packed_s = again["experts_packed_seconds"]
    print(
        f"\n{again['adapters']} adapters: packed into {len(again['packed_runs'])} runs "
        + (f"{packed_s:.1f}s" if packed_s is not None else "(the run's own training)")
        + f"; {len(again['alone'])} of them one run each "
        f"{again['experts_unpacked_seconds']:.1f}s"
        + (f" -> speed-up {speedup:.2f}x" if speedup is not None else "")
        + f"; identical adapters: {again['identical']}"
    )
    report = {
        "stages_seconds": stages,
        "total_seconds": sum(stages.values()),
        "wall_seconds": total,
        **again,
        "smoke": args.smoke,
        "cpus": cpus,
        "versions": versions(),
        "run_dir": str(run.path),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
