"""Stage II as a pipeline stage: run an executor on a prepared run and write its outputs (the
clusterer's, and those of any other consumers of the gradient stream)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from gs_ray.config import Config, config_from_dict
from gs_ray.core.clustering import within_cluster_variance
from gs_ray.io import write_json
from gs_ray.prepare import Prepared
from gs_ray.rundir import SKIPPED, UNASSIGNED
from gs_ray.stage2.computer import GradientComputer
from gs_ray.stage2.consumers import ClusteringConsumer, ConsumerSet, GradientConsumer
from gs_ray.stage2.executors import run_stage2_local, run_stage2_ray
from gs_ray.stage2.host import CentroidHost
from gs_ray.stage2.launch import make_clusterer
from gs_ray.stage2.plan import Stage2Plan
from gs_ray.stage2.result import Stage2Result
from gs_ray.stage2.rows import RowStore
from gs_ray.stage2.transports import TRANSPORTS

log = logging.getLogger(__name__)


def stage2_config(p: Prepared) -> Config:
    """The run's config, with K from the Ray Tune stage when K was tuned (a copy)."""
    cfg = p.cfg
    if cfg.clustering.k_selection != "tune":
        return cfg
    cfg = config_from_dict(cfg.to_dict())
    cfg.clustering.n_clusters = p.run.manifest()["stages"]["tune"]["best_k"]
    return cfg


def stage2_local(p: Prepared, consumers: Sequence[GradientConsumer] = ()) -> Stage2Result:
    """Stage II in this process (reference): gradients, K selection, online epochs, final pass;
    ``consumers`` read the same gradients."""
    with p.run.stage("stage2") as info:
        cfg = stage2_config(p)
        if not TRANSPORTS[cfg.stage2.transport].whole_gradients:
            raise ValueError("the local reference pipeline implements the exact transport only")
        computer = GradientComputer(p.base_path, cfg, p.run.warmup_adapter, p.pad_id)
        plan = Stage2Plan.build(p.lengths, p.splits, cfg, p.calibration_rows())
        rows = RowStore.of_plan(plan, len(p.samples), cfg.stage2.keep_rows_mb)
        host = CentroidHost(make_clusterer(cfg), len(p.samples), consumers=consumers, rows=rows)
        res = run_stage2_local(plan, p.samples, computer, host)
        write_stage2_outputs(p, res)
        info.update(k=res.k, executor="local")
    p.run.discard_stage2_checkpoint()  # a stale one (a Ray attempt before): done, never resumed
    return res


def stage2_ray(
    p: Prepared, resume: bool = False, consumers: Sequence[GradientConsumer] = ()
) -> Stage2Result:
    """Stage II on Ray: gradient workers and the centroid actor (``gs_ray.stage2.executors``);
    ``consumers`` read the same gradients inside the centroid actor."""
    with p.run.stage("stage2") as info:
        cfg = stage2_config(p)
        plan = Stage2Plan.build(p.lengths, p.splits, cfg, p.calibration_rows())
        res = run_stage2_ray(
            plan,
            p.samples,
            cfg,
            p.base_path,
            str(p.run.warmup_adapter),
            p.pad_id,
            p.run.checkpoint_dir,
            resume=resume,
            consumers=consumers,
        )
        write_stage2_outputs(p, res)
        info.update(
            k=res.k,
            **{
                key: res.info.get(key)
                for key in ("executor", "workers", "transport", "resumed_from")
            },
        )
    # Marked done with its outputs written: the checkpoint (every gradient row the centroid
    # actor holds, 393 MB at d = 65,536, ~20 GB at Llama-3.2-1B; docs/scaling.md) is only a
    # way to resume an unfinished Stage II.
    p.run.discard_stage2_checkpoint()
    return res


def write_stage2_outputs(p: Prepared, res: Stage2Result) -> None:
    """K table, centroids, layout and assignments into the run directory; metrics (the
    pipeline draws the figures: ``evaluation.plots.stage2_plots``)."""
    run, c = p.run, res.clusterer
    summary = ClusteringConsumer(c, len(res.labels)).write(run)
    run.stage2.mkdir(parents=True, exist_ok=True)
    write_json(run.param_names_json, res.layout)
    if (res.labels == UNASSIGNED).any():
        raise RuntimeError("Stage II finished with unassigned samples")
    split_of = {int(i): name for name in ("train", "test") for i in getattr(p.splits, name)}
    rows = [
        {
            "id": s.id,
            "split": split_of[i],
            "domain": s.domain,
            **(
                {"cluster": None, "skipped": "non-finite gradient"}
                if res.labels[i] == SKIPPED
                else {"cluster": int(res.labels[i])}
            ),
        }
        for i, s in enumerate(p.samples)
    ]
    run.write_jsonl(run.assignments_path, rows)
    train_labels = res.labels[p.splits.train]
    train_labels = train_labels[train_labels >= 0]
    online = {
        key: v
        for key, v in summary.items()
        if key not in ("k_selection", "explained_variance_ratio", "singular_values", "gradient_dim")
    }
    run.add_metrics(
        stage2={
            **online,
            "cluster_sizes_train": np.bincount(train_labels, minlength=res.k).tolist(),
            "skipped_ids": [p.samples[i].id for i in res.skipped],
            "gradient_dim": res.layout.get("projection_dim") or res.layout.get("dim"),
            "val_variance": within_cluster_variance(res.val_grads, c.predict(res.val_grads)),
            **res.info,
        }
    )
    if res.consumers:
        run.add_metrics(consumers=ConsumerSet(res.consumers).write(run))
