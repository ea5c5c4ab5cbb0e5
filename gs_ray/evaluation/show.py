"""``gs-ray show``: a plain-text summary of a run directory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from gs_ray.routing.router import ROUTER_JSON
from gs_ray.rundir import RunDir


def show(path: str | Path) -> str:
    """Summary: data counts, stage timings, K selection, cluster x domain table, metrics."""
    run = RunDir(path)
    if not run.manifest_path.exists():
        raise SystemExit(f"gs-ray show: {path} is not a run directory (no manifest.json)")
    m = run.manifest()
    lines = [f"run {run.path}  (created {m.get('created')}, seed {m.get('seed')})"]
    base = m.get("base_model", {})
    if base:
        lines.append(
            f"base model: {base.get('path')} ({base.get('model_type')}, "
            f"hidden {base.get('hidden_size')}, {base.get('num_hidden_layers')} layers)"
        )
    data = m.get("data")
    if data:
        drops = ", ".join(f"{k}={v}" for k, v in data.get("dropped", {}).items()) or "none"
        lines.append(
            f"data: {data['source']}: read {data['rows_read']}, used {data['used']}, "
            f"truncated {data['truncated']}, dropped {drops}; splits {data.get('splits')}"
        )
    lines.append("stages:")
    for name, st in m.get("stages", {}).items():
        extra = {k: v for k, v in st.items() if k not in ("status", "seconds")}
        lines.append(f"  {name:<10} {st['status']:<5} {st['seconds']:>9.1f}s  {extra or ''}")
    ks_path = run.k_selection_json
    if ks_path.exists():
        ks = json.loads(ks_path.read_text())
        ch = ks["chosen"]
        sil = ch.get("silhouette")
        lines.append(
            f"K selection: K={ch['k']} silhouette "
            f"{'- (no K >= 2 passed)' if sil is None else f'{sil:.3f}'} at threshold "
            f"{ch['threshold']:.2f} ({ch['n_components']} components)"
        )
        if ks.get("structure"):  # the verdict against the structureless reference
            lines.append(f"  structure: {ks['structure']['verdict']}")
    if run.assignments_path.exists():
        rows = [r for r in run.assignments() if r["split"] == "train"]
        counts = Counter((r["cluster"], r.get("domain") or "-") for r in rows)
        clusters = sorted({c for c, _ in counts})
        domains = sorted({d for _, d in counts})
        width = max(8, *(len(d) for d in domains))
        lines.append("clusters x domains (training samples):")
        lines.append(
            "  " + "cluster".ljust(8) + "".join(d.rjust(width + 1) for d in domains) + "  total"
        )
        for c in clusters:
            vals = [counts.get((c, d), 0) for d in domains]
            lines.append(
                "  "
                + str(c).ljust(8)
                + "".join(str(v).rjust(width + 1) for v in vals)
                + f"  {sum(vals)}"
            )
    metrics = run.metrics()
    experts = run.expert_records()
    ev = metrics.get("evaluation", {})
    own = {row["cluster"]: row for row in ev.get("own_cluster", [])}
    if experts:
        lines.append("experts (held-out loss on their own cluster vs the warm-up adapter):")
        for e in experts:
            c = e["cluster"]
            row = own.get(c, {})
            held = (
                f"{row['expert']:.4f} vs {row['warmup']:.4f}"
                if row.get("expert") is not None
                else "-"
            )
            lines.append(
                f"  expert {c}: {e.get('n_train', 0)} samples, {e.get('steps', 0)} steps, "
                f"{e.get('engine', 'copied warm-up')}, held-out {held}"
            )
    if "router" in metrics:
        r = metrics["router"]
        lines.append(
            f"router: holdout accuracy {r.get('holdout_accuracy')} "
            f"(chance {r.get('chance_accuracy')})"
        )
    if ev:
        base = ev.get("test_loss_base")
        lines.append(
            (f"held-out loss: base model {base:.4f}, " if base is not None else "held-out loss: ")
            + f"warm-up {ev['test_loss_warmup']:.4f}, routed experts "
            f"{ev['test_loss_routed']:.4f}, oracle routing {ev['test_loss_oracle']:.4f}; "
            f"router latency {ev.get('router_latency_ms', 0):.1f} ms/prompt"
        )
    if metrics:
        lines.append("metrics:")
        for key, value in metrics.items():
            text = json.dumps(value)
            lines.append(f"  {key}: {text if len(text) < 300 else text[:297] + '...'}")
    plots = (
        sorted(p.name for p in (run.path / "plots").glob("*.png"))
        if (run.path / "plots").exists()
        else []
    )
    if plots:
        lines.append("plots: " + ", ".join(plots))
    if run.eval_json.exists():
        from gs_ray.evaluation.baselines import table

        lines.append(f"gs-ray eval ({run.eval_json}):")
        lines += ["  " + line for line in table(json.loads(run.eval_json.read_text())).split("\n")]
    elif (run.router / ROUTER_JSON).exists():
        lines.append(f"compare with the baselines: gs-ray eval {run.path}")
    if run.report_html.exists():
        lines.append(f"report: {run.report_html} (open it in a browser)")
    if (run.router / ROUTER_JSON).exists():
        lines.append(f"serve: gs-ray serve {run.path}")
    return "\n".join(lines)
