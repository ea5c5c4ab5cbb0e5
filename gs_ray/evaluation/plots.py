"""Figures a person would rather look at than read, written into ``run_dir/plots``."""

from __future__ import annotations

import json
from collections import Counter

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gs_ray.rundir import RunDir  # noqa: E402


def stage2_plots(run: RunDir) -> list[str]:
    """Explained variance, silhouette vs K, and cluster sizes by source domain."""
    ks = json.loads(run.k_selection_json.read_text())
    chosen = ks["chosen"]
    out = []

    ratio = np.asarray(ks["explained_variance_ratio"])
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(np.arange(1, len(ratio) + 1), ratio, marker=".", lw=1)
    ax.axhline(
        chosen["threshold"],
        color="tab:red",
        ls="--",
        lw=1,
        label=f"chosen threshold {chosen['threshold']:.2f}",
    )
    ax.axvline(
        chosen["n_components"],
        color="tab:red",
        ls=":",
        lw=1,
        label=f"{chosen['n_components']} components",
    )
    ax.set(
        xlabel="SVD components",
        ylabel="explained variance (cumulative)",
        title="Validation gradients: explained variance",
        ylim=(0, 1.02),
    )
    ax.legend(loc="lower right")
    out.append(_save(fig, run, "explained_variance.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    for threshold in sorted({r["threshold"] for r in ks["table"]}):
        rows = [r for r in ks["table"] if r["threshold"] == threshold]
        valid = [r for r in rows if not r.get("rejected") and r.get("silhouette") is not None]
        line = ax.plot(
            [r["k"] for r in valid],
            [r["silhouette"] for r in valid],
            marker="o",
            label=f"{threshold:.2f} ({rows[0]['n_components']} comp.)",
        )
        rejected = [r for r in rows if r.get("rejected") and r.get("silhouette") is not None]
        ax.scatter(
            [r["k"] for r in rejected],
            [r["silhouette"] for r in rejected],
            marker="x",
            color=line[0].get_color(),
        )
    floor = structureless_floor(ks.get("structure"))
    if floor:  # what the same selection gives on structureless data of this spectrum
        fk, mean, clear, own = floor
        ax.plot(
            fk, own, color="black", lw=2, marker="D", ms=4, label="each K's candidate (cosine), vs:"
        )
        ax.plot(fk, mean, color="0.4", lw=1.5, ls="--", label="structureless (mean)")
        ax.fill_between(fk, mean, clear, color="0.6", alpha=0.25, label="within the margin: weak")
    if chosen.get("silhouette") is not None:
        ax.scatter(
            [chosen["k"]],
            [chosen["silhouette"]],
            s=160,
            facecolors="none",
            edgecolors="tab:red",
            lw=2,
            label=f"chosen K={chosen['k']}",
            zorder=5,
        )
    else:
        ax.set_title(f"chosen K={chosen['k']}: {ks.get('single_cluster_reason') or ''}")
    ax.set(xlabel="K (x: rejected, a cluster under the minimum size)", ylabel="silhouette")
    if not ax.get_title():
        ax.set_title("K selection (SVD + silhouette)")
    ax.legend(title="variance threshold", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.set_size_inches(8.5, 4)
    out.append(_save(fig, run, "silhouette_vs_k.png"))
    # (a curve inside the grey band is no more than structureless data gives: weak structure)

    rows = [r for r in run.assignments() if r["split"] == "train" and r["cluster"] is not None]
    if rows:
        out.append(cluster_domain_plot(run, rows, chosen["k"]))
    return out


def cluster_domain_plot(run: RunDir, rows: list[dict], k: int) -> str:
    """Stacked bars: cluster sizes broken down by source domain (where labels exist)."""
    counts = Counter((r["cluster"], r.get("domain") or "unlabelled") for r in rows)
    domains = sorted({d for _, d in counts})
    fig, ax = plt.subplots(figsize=(7, 4))
    bottom = np.zeros(k)
    for d in domains:
        vals = np.array([counts.get((c, d), 0) for c in range(k)])
        ax.bar(np.arange(k), vals, bottom=bottom, label=d)
        bottom += vals
    ax.set(
        xlabel="cluster",
        ylabel="training samples",
        title="Cluster sizes by source domain",
        xticks=np.arange(k),
    )
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, run, "cluster_domains.png")


def structureless_floor(structure: dict | None) -> tuple[list, list, list, list] | None:
    """(K, the structureless reference's mean silhouette, the level a K must pass to be clear:
    mean + null_margin sd, and the K's own candidate's cosine silhouette, the number compared
    with them) from k_selection.json's ``structure``; None without a reference."""
    rows = [r for r in (structure or {}).get("per_k", []) if r.get("null_silhouette") is not None]
    if not rows:
        return None
    margin = float(structure.get("null_margin", 0.0))
    rows = sorted(rows, key=lambda r: r["k"])
    return (
        [r["k"] for r in rows],
        [r["null_silhouette"] for r in rows],
        [r["null_silhouette"] + margin * (r.get("null_std") or 0.0) for r in rows],
        [r.get("silhouette_cosine") for r in rows],
    )


def smoothed(values: list[float], span: int | None = None) -> np.ndarray:
    """Exponential moving average (bias-corrected, as Adam's), ``span`` steps (default: a
    twentieth of the curve, at least 5): the trend of a per-step loss that is mostly noise."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    span = span or max(5, len(x) // 20)
    beta = 1.0 - 2.0 / (span + 1.0)
    out, avg = np.empty_like(x), 0.0
    for i, v in enumerate(x):
        avg = beta * avg + (1.0 - beta) * v
        out[i] = avg / (1.0 - beta ** (i + 1))
    return out


def loss_curves_plot(run: RunDir, curves: dict[str, list[float]], name: str, title: str) -> str:
    """Training loss per step, one colour per run (warm-up, experts): the raw per-step loss
    faint, its moving average (``smoothed``) bold."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, losses in curves.items():
        steps = np.arange(1, len(losses) + 1)
        raw = ax.plot(steps, losses, lw=0.7, alpha=0.25)
        ax.plot(steps, smoothed(losses), lw=1.8, color=raw[0].get_color(), label=label)
    ax.set(xlabel="optimizer step", ylabel="training loss", title=title)
    ax.legend(fontsize=8)
    return _save(fig, run, name)


def _save(fig, run: RunDir, name: str) -> str:
    path = run.plots / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def pipeline_plots(run: RunDir, k: int) -> list[str]:
    """Training loss curves of the warm-up and the experts; expert x cluster held-out losses."""
    out = []
    curves = {}
    warm = run.warmup_losses
    if warm.exists():
        curves["warm-up"] = json.loads(warm.read_text())["train_loss"]
    for c in range(k):
        record = run.adapter_record(run.expert(c))
        if record and record.get("losses"):
            curves[f"expert {c}"] = record["losses"]
    if curves:
        out.append(loss_curves_plot(run, curves, "training_loss.png", "LoRA training loss"))
    ev = run.metrics().get("evaluation")
    if ev and ev.get("expert_vs_cluster_loss"):
        m = np.array(
            [[np.nan if v is None else v for v in row] for row in ev["expert_vs_cluster_loss"]]
        )
        fig, ax = plt.subplots(figsize=(1.2 * k + 3, 1.0 * k + 2))
        im = ax.imshow(m, cmap="viridis_r")
        mid = np.nanmean(m)
        for (i, j), v in np.ndenumerate(m):
            color = "black" if v < mid else "white"  # readable on light and dark cells
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color=color, fontsize=8)
        ax.set(
            xlabel="cluster of the test samples",
            ylabel="expert",
            xticks=range(k),
            yticks=range(k),
            title="Held-out loss: expert x cluster (diagonal = own)",
        )
        fig.colorbar(im, ax=ax, shrink=0.8)
        out.append(_save(fig, run, "expert_cluster_loss.png"))
    tune = run.tune_results_json
    if tune.exists():
        out.append(tune_plot(run, json.loads(tune.read_text())["table"]))
    return out


def tune_plot(run: RunDir, table: list[dict]) -> str:
    """K chosen with Ray Tune: validation loss of the routed experts and silhouette per K."""
    table = sorted(table, key=lambda r: r["k"])
    ks = [r["k"] for r in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["val_loss"] for r in table], marker="o", color="tab:blue", label="val loss")
    ax.set(xlabel="K", ylabel="validation loss of routed experts", title="K with Ray Tune")
    ax2 = ax.twinx()
    ax2.plot(
        ks, [r["silhouette"] for r in table], marker="s", color="tab:orange", label="silhouette"
    )
    ax2.set_ylabel("silhouette")
    best = min(table, key=lambda r: r["val_loss"])
    ax.axvline(best["k"], color="tab:red", ls="--", lw=1, label=f"best K={best['k']}")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    return _save(fig, run, "tune_k.png")


def k_ablation_plot(run: RunDir, rows: list[dict]) -> str:
    """The paper's Fig. 6: cluster cohesion (cosine silhouette) and held-out loss against K."""
    rows = sorted(rows, key=lambda r: r["k"])
    ks = [r["k"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ks, [r["test_loss_routed"] for r in rows], "o-", label="held-out loss, routed")
    ax.plot(ks, [r["test_loss_oracle"] for r in rows], "s--", label="held-out loss, oracle")
    for r in rows:
        if r["source"] != "ablation":
            ax.annotate(
                "one LoRA" if r["k"] == 1 else "the run",
                (r["k"], r["test_loss_routed"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
    ax.set(
        xlabel="K (number of clusters)",
        ylabel="held-out loss (nats / token)",
        title="K ablation (paper Fig. 6)",
    )
    ax.set_xticks(ks)
    sil = [(r["k"], r["silhouette"]) for r in rows if r.get("silhouette") is not None]
    if sil:
        ax2 = ax.twinx()
        ax2.plot(*zip(*sil), "^:", color="tab:green", label="silhouette (cosine)")
        ax2.set_ylabel("silhouette of the training gradients", color="tab:green")
        lines = ax.get_legend_handles_labels()
        more = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8)
    else:
        ax.legend(fontsize=8)
    return _save(fig, run, "eval_k_ablation.png")


def sts_plot(run: RunDir, sts: dict) -> str:
    """The paper's Fig. 4: input-embedding similarity against gradient similarity over STS
    sentence pairs, coloured by the human score."""
    pairs = sts["pairs"]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    pts = ax.scatter(
        [q["embedding_cosine"] for q in pairs],
        [q["gradient_cosine"] for q in pairs],
        c=[q["score"] for q in pairs],
        cmap="viridis",
        s=10,
        alpha=0.8,
    )
    fig.colorbar(pts, ax=ax, label="human similarity (0-5)")
    r = sts["gradient_vs_embedding"]
    title = f"STS pairs: gradient vs embedding similarity (n={sts['n_pairs']}"
    if r.get("pearson") is not None:
        title += f", Pearson {r['pearson']:.2f}, Spearman {r['spearman']:.2f}"
    ax.set(
        xlabel="cosine of the sentence embeddings",
        ylabel="cosine of the LoRA gradients",
        title=title + ")",
    )
    ax.title.set_fontsize(9)
    return _save(fig, run, "eval_sts_similarity.png")
