"""One self-contained HTML report of a run (plots embedded), and one JSON with every number.

``build_report(run_dir)`` reads what the run directory holds: the manifest (configuration,
versions, data counts, what ran where and for how long), metrics (warm-up, K selection, Stage II,
experts, router, held-out evaluation), ``gs-ray eval``'s ``eval/eval.json`` when it exists, and
every figure under ``plots/``. It writes ``report/report.html`` (no external file: images are
base64 data URIs, so the file can be mailed or attached to a ticket) and ``report/report.json``.
``gs-ray run`` and ``gs-ray eval`` rebuild it at their end; ``gs-ray report RUN_DIR`` on demand.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from pathlib import Path
from typing import Any

from gs_ray.io import write_json
from gs_ray.rundir import RunDir

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
.verdict { font-size: 1.15em; background: #f4f7fb; border-left: 4px solid #36c; padding: .6em 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .25em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; } tr.best td { background: #e8f5e9; font-weight: 600; }
figure { display: inline-block; margin: .5em; vertical-align: top; }
figure img { max-width: 520px; border: 1px solid #ddd; }
figcaption { font-size: .85em; color: #555; } pre { background: #f7f7f7; padding: .8em;
overflow-x: auto; font-size: .8em; max-height: 28em; } .note { color: #555; font-size: .9em; }
"""


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return html.escape(str(x))


def _table(header: list[str], rows: list[list[Any]], best: int | None = None) -> str:
    """An HTML table; ``best``: the index of the row to highlight."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = "".join(f"<td>{c if isinstance(c, _Raw) else _num(c)}</td>" for c in row)
        body.append(f"<tr{' class=best' if i == best else ''}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


class _Raw(str):
    """Text that is already HTML."""


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _stages(manifest: dict) -> str:
    rows = []
    for name, info in manifest.get("stages", {}).items():
        extra = {k: v for k, v in info.items() if k not in ("status", "seconds", "finished")}
        rows.append(
            [
                name,
                info.get("status", "not done"),
                info.get("seconds"),
                _Raw(html.escape(json.dumps(extra)[:160])),
            ]
        )
    return _table(["stage", "status", "seconds", "details"], rows)


def _vs(entry: dict | None, named: bool = False) -> str:
    """A paired difference as 'mean [lo, hi] verdict' (and the baseline's name)."""
    if not entry:
        return "-"
    who = f"{html.escape(entry['method'])}: " if named else ""
    return (
        f"{who}{entry['mean']:+.4f} [{entry['lo']:+.4f}, {entry['hi']:+.4f}] "
        f"<i>{html.escape(entry['verdict'])}</i>"
    )


def _tune_section(tune: dict[str, Any]) -> str:
    """Ray Tune's K search: routed held-out loss per K, the K it chose, and whether the gradient
    structure is weak (then the routed loss, not the silhouette, is what picked K)."""
    rows = "".join(
        f"<tr><td>{_num(r['k'])}</td><td>{_num(r.get('k_routed', r['k']))}</td>"
        f"<td>{_num(r['val_loss'])}</td><td>{_num(r.get('silhouette'))}</td></tr>"
        for r in tune["table"]
    )
    weak = (
        "<p><b>The gradient structure is weak</b> "
        f"({html.escape(tune.get('structure_verdict', ''))})"
        f"; the routed loss prefers K = {_num(tune['best_k'])}.</p>"
        if tune.get("weak_structure")
        else ""
    )
    return (
        f"<h2>K chosen by Ray Tune</h2><p>K = {_num(tune['best_k'])} by "
        f"{html.escape(tune['rule'])}; "
        f"the best silhouette was at K = {_num(tune['best_silhouette_k'])}.</p>{weak}"
        "<table><tr><th>K</th><th>K after the merge</th><th>routed held-out loss</th>"
        f"<th>silhouette</th></tr>{rows}</table>"
    )


def _eval_section(ev: dict) -> str:
    methods = ev["methods"]
    names = list(methods)
    losses = [m["test_loss"] for m in methods.values()]
    deployable = [i for i, m in enumerate(methods.values()) if m.get("deployable", True)]
    best = min(deployable, key=lambda i: losses[i]) if deployable else None
    rows = []
    for name, m in methods.items():
        loss = _num(m["test_loss"]) + (
            f" ± {m['test_loss_std']:.4f}" if m.get("test_loss_std") else ""
        )
        em = m.get("exact_match")
        rows.append(
            [
                name,
                _Raw(loss),
                _Raw(_vs(m.get("vs_reference"))),
                _Raw(_vs(m.get("vs_best_baseline"), named=True)),
                None if em is None else round(em, 3),
                m.get("forward_passes_per_query"),
                m.get("latency_ms_per_query"),
                m.get("train_steps"),
                m.get("train_seconds"),
            ]
        )
    out = [
        _table(
            [
                "method",
                "held-out loss",
                "vs one LoRA (95% interval)",
                "vs the best other baseline",
                "exact match",
                "forward passes / query",
                "ms / query",
                "train steps",
                "train s",
            ],
            rows,
            best,
        )
    ]
    r = ev.get("routing")
    if r:
        gap = r["routed_minus_oracle"]
        per = ", ".join("-" if a is None else f"{a:.2f}" for a in r["router_accuracy_per_cluster"])
        out.append(
            f"<p class=note>Routing: routed - oracle {gap['mean']:+.4f} nats "
            f"[{gap['lo']:+.4f}, {gap['hi']:+.4f}]; router accuracy "
            f"{_num(r['router_accuracy'])} (per cluster: {per}); a misrouted row costs "
            f"{r['misroute_cost']:.3f} nats more than its own cluster's expert "
            f"({100 * (r['misrouted_share'] or 0):.0f}% misrouted).</p>"
        )
    domains = sorted({d for m in methods.values() for d in m.get("test_loss_by_domain", {})})
    if domains:
        rows = [[n, *[methods[n]["test_loss_by_domain"].get(d) for d in domains]] for n in names]
        out.append("<h3>Held-out loss per domain</h3>" + _table(["method", *domains], rows))
    out.append(
        f"<p class=note>{_num(ev['n_test'])} held-out samples (sha256 "
        f"{_num(ev['test_ids_sha256'][:12])}...), {_num(ev['n_exact_match_items'])} checkable "
        "items "
        f"generated per method, seeds {_num(ev['seeds'])}. Budget: "
        f"{html.escape(ev['budget']['rule'])}"
        f". Highlighted: the lowest loss of a deployable method. Eval took "
        f"{ev['seconds']:.0f} s.</p>"
    )
    return "\n".join(out)


def _analyses(an: dict) -> str:
    """Theorem 2 (variance within clusters vs the whole set), routers compared (Table 3), the K
    ablation (Fig. 6), gradient vs embedding similarity (Fig. 4), clusters by domain (Fig. 5) and
    top TF-IDF terms per cluster (Table 2) for each partition."""
    out = []
    rows = [
        [name, a["theorem2"]["within"], a["theorem2"]["total"], a["theorem2"]["ratio"]]
        for name, a in an.items()
        if isinstance(a, dict) and "theorem2" in a
    ]
    if rows:
        out.append(
            "<h3>Theorem 2: gradient variance within clusters</h3>"
            + _table(
                ["partition", "within clusters (pooled)", "whole set", "ratio"],
                rows,
                best=min(range(len(rows)), key=lambda i: rows[i][3] or 1),
            )
            + "<p class=note>Variance of the unit training gradients (ELREA's random projection, "
            "which keeps squared distances in expectation). Lower is tighter.</p>"
        )
    routers = an.get("routers")
    if routers:
        rows = [[r["description"], r["agreement"], r["latency_ms"]] for r in routers]
        out.append(
            "<h3>Routers compared (paper Table 3)</h3>"
            + _table(
                ["router", "agreement with the gradient assignment", "ms / prompt (batch 1)"],
                rows,
                best=max(range(len(rows)), key=lambda i: rows[i][1] or 0),
            )
            + "<p class=note>On the held-out rows: how often each router picks the cluster that "
            "the "
            "query's own gradient (with its answer) is assigned to.</p>"
        )
    ablation = an.get("k_ablation")
    if ablation:
        rows = [
            [
                r["k"],
                {
                    "single_lora": "one LoRA on everything",
                    "run": "the run (online)",
                    "ablation": "K fixed",
                }.get(r["source"], r["source"]),
                r.get("silhouette"),
                r["test_loss_routed"],
                r["test_loss_oracle"],
                r.get("router_agreement"),
            ]
            for r in ablation
        ]
        out.append(
            "<h3>K ablation (paper Fig. 6)</h3>"
            + _table(
                [
                    "K",
                    "partition",
                    "silhouette (cosine, training gradients)",
                    "held-out loss, routed",
                    "held-out loss, oracle",
                    "router agreement",
                ],
                rows,
                best=min(range(len(rows)), key=lambda i: rows[i][3]),
            )
        )
    sts = an.get("sts")
    if sts:
        rows = [
            [name.replace("_", " "), sts[key]["pearson"], sts[key]["spearman"]]
            for key, name in (
                ("gradient_vs_embedding", "gradient vs embedding"),
                ("gradient_vs_human", "gradient vs human score"),
                ("embedding_vs_human", "embedding vs human score"),
            )
        ]
        out.append(
            "<h3>Gradient vs input-embedding similarity (paper Fig. 4)</h3>"
            + _table(["correlation over sentence pairs", "Pearson", "Spearman"], rows)
            + f"<p class=note>{_num(sts['n_pairs'])} pairs of {html.escape(sts['file'])}: cosine "
            "of the "
            "two sentences' LoRA gradients (warm-up adapter) and of their encoder embeddings."
            "</p>"
        )
    for name, a in an.items():
        if name in ("routers", "k_ablation", "sts"):
            continue
        domains = sorted({d for row in a["domains"].values() for d in row})
        table = _table(
            ["cluster", *domains, "top TF-IDF terms"],
            [
                [
                    c,
                    *[row.get(d, 0) for d in domains],
                    _Raw(html.escape(", ".join(a["top_terms"].get(c, [])))),
                ]
                for c, row in a["domains"].items()
            ],
        )
        out.append(f"<h3>{html.escape(name)}: clusters by domain, top terms</h3>{table}")
    return "\n".join(out)


def _figures(run: RunDir) -> str:
    out = []
    for png in sorted((run.path / "plots").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        caption = png.stem.replace("_", " ")
        out.append(
            f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,'
            f'{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
        )
    return "\n".join(out) or "<p class=note>No figures yet.</p>"


def deploy_advice(
    run_path: str, ev: dict | None, held: dict | None, k_sel: dict | None
) -> tuple[str, str]:
    """What to deploy, in one sentence, and the command to run next: from ``gs-ray eval``'s
    verdict where there is one, else from what the run alone says (the gradient structure, and
    the routed or deployed held-out loss against the generalist or the warm-up adapter)."""
    v = (ev or {}).get("verdict")
    if v:
        if v["verdict"] == "pays off":
            return (
                f"Deploy GradientSpace (router, experts, generalist fallback): {v['headline']}.",
                f"gs-ray serve {run_path}   # model 'gs-ray' routes",
            )
        return (
            f"Deploy the generalist (one LoRA on everything): {v['headline']}; the routed "
            "experts do not earn their cost here.",
            f"gs-ray serve {run_path}   # then ask for model 'gs-ray/generalist'",
        )
    structure = (k_sel or {}).get("structure") or {}
    said = []
    if structure:
        said.append(
            "the gradient structure is "
            + (
                "weak (K = 1 is as good as any)"
                if structure.get("weak")
                else f"clear at K = {structure.get('k')}"
            )
        )
    held = held or {}
    routed = held.get("test_loss_deployed", held.get("test_loss_routed"))
    other_key = "test_loss_generalist" if "test_loss_generalist" in held else "test_loss_warmup"
    other = held.get(other_key)
    if routed is not None and other is not None:
        who = "the generalist" if other_key == "test_loss_generalist" else "the warm-up adapter"
        said.append(
            f"held-out loss {routed:.4f} as deployed against {other:.4f} for {who} "
            f"({routed - other:+.4f}; no interval before gs-ray eval)"
        )
    summary = "; ".join(said) if said else "no held-out numbers yet"
    return (
        f"Not decided yet: {summary}. gs-ray eval compares it with one LoRA and the other "
        "baselines, with intervals.",
        f"gs-ray eval {run_path}",
    )


def build_report(run_dir: str | Path) -> Path:
    """Write ``report/report.html`` and ``report/report.json`` for the run; return the HTML."""
    run = RunDir.open(run_dir)
    manifest, metrics = run.manifest(), run.metrics()
    ev = _read_json(run.eval_json)
    k_sel = _read_json(run.k_selection_json)
    numbers = {
        "manifest": manifest,
        "metrics": metrics,
        "eval": ev,
        "k_selection": k_sel,
        "advice": dict(
            zip(
                ("deploy", "next"),
                deploy_advice(str(run.path), ev, metrics.get("evaluation"), k_sel),
                strict=True,
            )
        ),
    }
    write_json(run.report_json, numbers)

    parts = [
        f"<h1>gs-ray run: {html.escape(run.path.name)}</h1>",
        f"<p class=note>{html.escape(str(run.path))} · report built "
        f"{dt.datetime.now().isoformat(timespec='seconds')}</p>",
    ]
    held = metrics.get("evaluation")
    advice, command = deploy_advice(str(run.path), ev, held, k_sel)
    if ev and ev.get("verdict"):
        v = ev["verdict"]
        parts.append(
            f"<p class=verdict><b>Verdict: GradientSpace {html.escape(v['verdict'])}"
            f"</b> against one LoRA on everything. {html.escape(v['headline'])}.</p>"
        )
    parts.append(
        f"<p class=verdict><b>What to deploy.</b> {html.escape(advice)}<br>Next: "
        f"<code>{html.escape(command)}</code></p>"
    )
    if held:
        parts.append("<h2>Held-out loss</h2>")
        parts.append(
            _table(
                ["", "loss"],
                [
                    ["base model (no adapter)", held.get("test_loss_base")],
                    ["warm-up adapter", held.get("test_loss_warmup")],
                    ["GradientSpace, routed", held.get("test_loss_routed")],
                    ["GradientSpace, oracle routing", held.get("test_loss_oracle")],
                    *(
                        [
                            ["generalist (one LoRA on everything)", held["test_loss_generalist"]],
                            [
                                "GradientSpace as deployed (router + generalist fallback, "
                                f"{100 * held['generalist_share']:.0f}% fall back)",
                                held["test_loss_deployed"],
                            ],
                        ]
                        if "test_loss_deployed" in held
                        else []
                    ),
                ],
            )
        )
        parts.append(
            f"<p class=note>{_num(held.get('n_test'))} held-out samples; the router agrees with "
            f"the gradient clusters on {100 * held.get('router_test_accuracy', 0):.1f}% "
            f"of them.</p>"
        )
        own = held.get("own_cluster", [])
        if own:
            parts.append(
                _table(
                    ["cluster", "samples", "its expert", "warm-up"],
                    [[o["cluster"], o["n"], o["expert"], o["warmup"]] for o in own],
                )
            )
    parts.append("<h2>GradientSpace against the baselines (gs-ray eval)</h2>")
    parts.append(
        _eval_section(ev)
        if ev
        else f"<p class=note>Not run yet: <code>gs-ray eval {html.escape(str(run.path))}</code></p>"
    )
    if ev and ev.get("analyses"):
        parts.append("<h2>The paper's analyses</h2>" + _analyses(ev["analyses"]))
    if k_sel:
        chosen = k_sel.get("chosen", {})
        parts.append(
            f"<h2>Clusters</h2><p>K = {_num(chosen.get('k'))} (silhouette "
            f"{_num(chosen.get('silhouette'))}, {_num(chosen.get('n_components'))} SVD "
            f"components at variance threshold {_num(chosen.get('threshold'))}).</p>"
        )
        merge = k_sel.get("routability")
        if merge:
            parts.append(
                f"<p>Routability: K {_num(merge['k_before'])} &rarr; {_num(merge['k_after'])}; the "
                f"cross-validated router agreement went from "
                f"{_num(merge['agreement_before'])} to {_num(merge['agreement_after'])}"
                + (
                    f"; on {_num(merge['n_held'])} held-out calibration rows (not part of the "
                    f"centroids) from {_num(merge['held_agreement_before'])} to "
                    f"{_num(merge['held_agreement_after'])}"
                    if merge.get("n_held")
                    else ""
                )
                + f" (target {_num(merge['target'])}).</p>"
            )
            if merge.get("merges"):
                parts.append(
                    "<ul>"
                    + "".join(f"<li>{html.escape(m)}</li>" for m in merge["merges"])
                    + "</ul>"
                )
        if k_sel.get("structure"):  # weak or clear, against the structureless reference
            parts.append(f"<p>{html.escape(k_sel['structure']['verdict'])}</p>")
    if run.tune_results_json.exists():  # clustering.k_selection: tune
        parts.append(_tune_section(json.loads(run.tune_results_json.read_text())))
    parts.append("<h2>Figures</h2>" + _figures(run))
    parts.append("<h2>What ran, where, how long</h2>" + _stages(manifest))
    parts.append(
        "<h2>Data</h2><pre>" + html.escape(json.dumps(manifest.get("data"), indent=1)) + "</pre>"
    )
    parts.append(
        "<h2>Configuration</h2><pre>"
        + html.escape(json.dumps(manifest.get("config"), indent=1))
        + "</pre>"
    )
    parts.append(
        "<h2>Versions</h2><pre>"
        + html.escape(json.dumps(manifest.get("versions"), indent=1))
        + "</pre>"
    )
    page = (
        f"<!doctype html><html><head><meta charset=utf-8><title>gs-ray: "
        f"{html.escape(run.path.name)}</title><style>{_STYLE}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>"
    )
    run.report_html.parent.mkdir(parents=True, exist_ok=True)
    run.report_html.write_text(page, encoding="utf-8")
    return run.report_html
