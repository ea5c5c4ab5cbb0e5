"""Targeted selection on real data: does training on the selected subset lower the target's
held-out loss?

A finished run directory (``gs-ray run --config docs/examples/data-mix.yaml``: SmolLM2-135M on
a 600-record mix of GSM8K, MATH, CodeAlpaca, TinyStories and FinancialPhraseBank) gives the pool
(its ``data`` section), the base model and the warm-up adapter. The target is ``--n-target``
records of one domain (GSM8K train by default) that are not in the pool; the held-out set is
``--n-heldout`` records of that domain's test file (evaluation only: nothing is selected or
tuned on it). Each method of ``--methods`` runs ``gs-ray select`` (``select(cfg, run_dir)``) at
``--budget``; then one LoRA per selected subset is trained from the warm-up adapter, in this
process, for the same ``--steps`` optimizer steps (batch size and learning rate of the run's
``experts`` section), and every adapter's mean response loss on the held-out records is computed
in one ``adapter_losses`` call. Two references: ``all`` (the same training on the whole pool that
the methods select from) and ``none`` (the warm-up adapter itself); ``base`` (no adapter) is
reported too.

The source run directory is only read: its manifest, config, warm-up adapter (and tiny-llama's
base model) are copied into ``--out`` (default: a new temporary folder), where the selections and
adapters go, with the target and held-out JSONL files. Prints a table, writes ``--json``. Not a
test: nothing is asserted. Trailing ``-- --section.key value`` pairs override the run's config
(as ``gs-ray``'s options do), e.g. ``-- --gsnr.members 2 --gsnr.max_steps 3``.

    PYTHONPATH=. .venv/bin/python benchmarks/selection_real.py --run-dir runs/data-mix \
        --out /tmp/selection-real --json benchmarks/results/selection_real.json

``--smoke`` (seconds; tests/test_benchmarks_smoke.py runs it): 2 steps, 6 target and 8 held-out
records, GIST, LESS-style (256 dimensions) and random (G-SNR trains its members on Ray Train:
give ``--methods`` to add it). Without ``--run-dir`` it needs neither a run nor the shared data:
it first builds a tiny run here (120 demo records, a 1-layer tiny Llama with random weights, the
warm-up in this process) and draws the target and held-out records from demo corpora of other
seeds (``math``, written as ``{question, answer}`` JSONL like GSM8K's)::

    .venv/bin/python benchmarks/selection_real.py --smoke --out /tmp/sr --json /tmp/sr.json
    .venv/bin/python benchmarks/selection_real.py --smoke --run-dir RUN \
        --methods gist,gsnr -- --gsnr.members 2 --gsnr.max_steps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from gs_ray.config import Config, MixSource, load_config  # noqa: E402
from gs_ray.core.models import load_adapter, load_base_model, load_tokenizer  # noqa: E402
from gs_ray.data import DataReport, Example, Sample, load_samples, read_examples  # noqa: E402
from gs_ray.data.demo import build_demo_corpus  # noqa: E402
from gs_ray.data.loading import tokenize  # noqa: E402
from gs_ray.logs import setup_logging  # noqa: E402
from gs_ray.prepare import prepare  # noqa: E402
from gs_ray.rundir import WARMUP, RunDir, adapter_complete  # noqa: E402
from gs_ray.selection.ranking import budget_count  # noqa: E402
from gs_ray.selection.select import select  # noqa: E402
from gs_ray.training.loop import TorchEngine, adapter_losses, train_adapter  # noqa: E402
from gs_ray.training.pretrain import base_model_for  # noqa: E402
from gs_ray.training.warmup import warmup_local  # noqa: E402

REFERENCES = ("all", "none")  # the whole pool; the warm-up adapter alone
# What a copy of a run needs for ``select(cfg, run_dir)``: its manifest and config, the warm-up
# adapter and (tiny-llama) its base model; metrics.json is where select adds its figures.
RUN_FILES = ("manifest.json", "config.yaml", "metrics.json", WARMUP, "base_model")
METHODS = "gist,less,gsnr,random"
DOMAIN = "gsm8k"
TARGET_SOURCE = "../shared/data/math/gsm8k/train.jsonl"
HELDOUT_SOURCE = "../shared/data/math/gsm8k/test.jsonl"
# --smoke: tiny sizes; without --run-dir, a tiny demo run built here (random weights: seconds)
SMOKE = {"steps": 2, "n_target": 6, "n_heldout": 8}
SMOKE_METHODS = "gist,less,random"  # G-SNR trains its members on Ray Train: a minute here
SMOKE_OVERRIDES = ["--selection.less_dim", "256"]
SMOKE_RUN = [
    "--data.demo_size",
    "120",
    "--model.tiny_hidden_size",
    "32",
    "--model.tiny_num_layers",
    "1",
    "--model.tiny_vocab_size",
    "2048",
    "--model.tiny_pretrain_steps",
    "0",
]
SMOKE_DOMAIN = "math"


def smoke_run(out: Path) -> tuple[Path, Path, Path]:
    """For ``--smoke`` without a run: a tiny demo run with a warm-up adapter (in this process),
    and target and held-out sources of ``SMOKE_DOMAIN`` records from demo corpora of other
    seeds, as GSM8K-style ``{question, answer}`` JSONL. Returns (run, target, held-out)."""
    cfg = load_config(None, [*SMOKE_RUN, "--run.output_dir", str(out), "--run.name", "smoke"])
    p = prepare(cfg, None, base_model=base_model_for)
    try:
        warmup_local(p)
    finally:
        p.run.release_lock()
    sources = []
    for name, seed in (("target", 12345), ("heldout", 54321)):
        rows = [r for r in build_demo_corpus(200, seed=seed) if r["domain"] == SMOKE_DOMAIN]
        path = out / f"{name}-source.jsonl"
        path.write_text(
            "".join(
                json.dumps({"question": r["instruction"], "answer": r["output"]}) + "\n"
                for r in rows
            )
        )
        sources.append(path)
    return p.run.path, sources[0], sources[1]


def copy_run(source: Path, target: Path) -> RunDir:
    """The parts of a finished run that selection reads, copied (the source stays untouched)."""
    src = RunDir.open(source)
    if not src.stage_done(WARMUP) or not adapter_complete(src.warmup_adapter):
        raise SystemExit(f"{src.path}: no finished warm-up adapter (run gs-ray run first)")
    target.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        path = src.path / name
        if path.is_dir():
            shutil.copytree(path, target / name, dirs_exist_ok=True)
        elif path.is_file():
            shutil.copy2(path, target / name)
    return RunDir.open(target)


def domain_entry(cfg: Config, args: argparse.Namespace, source: str) -> MixSource:
    """A mix entry that reads ``source`` as the run's mix reads the target domain (its prompt and
    response templates, unless given on the command line)."""
    own = next((e for e in cfg.data.mix if e.domain == args.domain), None)
    prompt = args.prompt or (own.prompt if own and own.prompt else "{question}")
    response = args.response or (own.response if own and own.response else "{answer}")
    return MixSource(source=source, domain=args.domain, prompt=prompt, response=response)


def read_domain(cfg: Config, entry: MixSource) -> list[Example]:
    """Every record of one source, rendered by the entry (the mix reader, all records)."""
    data = dataclasses.replace(cfg.data, source="mix", mix=[entry], max_samples=None)
    examples, _ = read_examples(data, cfg.run.seed)
    return examples


def draw(
    examples: list[Example],
    n: int,
    exclude: set[str],
    rng: np.random.Generator,
    tokenizer,
    cfg: Config,
    prefix: str,
) -> tuple[list[Example], list[Sample], DataReport]:
    """``n`` records whose prompt is not in ``exclude``, in a seeded random order, skipping those
    the run's template and ``max_length`` would drop; ids prefixed with ``prefix``."""
    candidates = [ex for ex in examples if ex.prompt.strip() not in exclude]
    report = DataReport(source=prefix)
    chosen, samples = [], []
    for i in rng.permutation(len(candidates)):
        if len(chosen) == n:
            break
        ex = dataclasses.replace(candidates[i], id=f"{prefix}-{candidates[i].id}")
        sample = tokenize(ex, tokenizer, cfg.data, report)
        if sample is not None:
            chosen.append(ex)
            samples.append(sample)
    if len(chosen) < n:
        print(f"warning: only {len(chosen)} {prefix} records usable (asked for {n})")
    return chosen, samples, report


def target_row(ex: Example, cfg: Config) -> dict[str, object]:
    """A target record in the fields that ``selection.target`` is read with (``data.*``; not
    ``messages``, whose prompt would read "user: ...", unlike the held-out records)."""
    d = cfg.data
    if d.format == "alpaca":
        return {"id": ex.id, d.instruction_field: ex.prompt, d.output_field: ex.response}
    return {"id": ex.id, d.prompt_field: ex.prompt, d.response_field: ex.response}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_selection(cfg: Config, run: RunDir, method: str, target: Path, budget: str) -> dict:
    """``select`` with one method; its wall time, storage and the selected ids."""
    sel = dataclasses.replace(cfg.selection, method=method, target=str(target), budget=budget)
    start = time.perf_counter()
    select(dataclasses.replace(cfg, selection=sel), str(run.path))
    seconds = time.perf_counter() - start
    summary = json.loads(run.selection_summary(method).read_text())
    ranked = RunDir.read_jsonl(run.selection_scores(method))
    return {
        "selection_s": round(seconds, 1),
        "ids": [r["id"] for r in ranked[: summary["n_selected"]]],
        "stored_bytes": summary["stored_bytes"],
        "gist_bytes": summary.get("gist_bytes"),
        "folder_bytes": folder_bytes(run.selection(method)),
        "k": summary.get("k"),
        "summary": {k: v for k, v in summary.items() if k != "singular_values"},
    }


def train_subset(
    cfg: Config,
    base_path: str,
    run: RunDir,
    samples: list[Sample],
    train_cfg,
    pad_id: int,
    out: Path,
) -> dict:
    """One LoRA from the warm-up adapter on ``samples``, ``train_cfg.max_steps`` steps."""
    model = load_adapter(load_base_model(base_path, cfg.model), run.warmup_adapter)
    start = time.perf_counter()
    losses = train_adapter(TorchEngine(model, train_cfg), samples, train_cfg, pad_id, cfg.run.seed)
    seconds = time.perf_counter() - start
    model.save_pretrained(str(out))
    return {
        "steps": len(losses),
        "train_s": round(seconds, 1),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", help="a finished run (config + warm-up adapter)")
    ap.add_argument("--methods", help=f"default {METHODS} (smoke: {SMOKE_METHODS})")
    ap.add_argument("--budget", default="10%", help="a share (10%%) or a count (60)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps of every training")
    ap.add_argument("--batch-size", type=int, help="default: the run's experts.batch_size")
    ap.add_argument("--lr", type=float, help="default: the run's experts.lr")
    ap.add_argument("--domain", help=f"the target's domain as the mix names it ({DOMAIN})")
    ap.add_argument("--target-source", help=f"default {TARGET_SOURCE}")
    ap.add_argument("--heldout-source", help=f"default {HELDOUT_SOURCE}")
    ap.add_argument("--prompt", help="prompt template (default: the run's mix entry, {question})")
    ap.add_argument("--response", help="response template (default: the mix entry, {answer})")
    ap.add_argument("--n-target", type=int, default=24)
    ap.add_argument("--n-heldout", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0, help="draws the target and held-out records")
    ap.add_argument("--out", help="work folder (default: a new temporary folder)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, seconds (see above)")
    ap.add_argument("overrides", nargs="*", help="--section.key value pairs (after --)")
    args = ap.parse_args(argv)
    if not args.run_dir and not args.smoke:
        ap.error("--run-dir is required (without it, only --smoke builds a tiny run)")
    if args.smoke:
        vars(args).update(SMOKE)
        args.methods = args.methods or SMOKE_METHODS
        args.overrides = [*SMOKE_OVERRIDES, *args.overrides]
    setup_logging("INFO")
    methods = [m.strip() for m in (args.methods or METHODS).split(",") if m.strip()]
    if set(methods) & set(REFERENCES):
        ap.error(f"--methods: {', '.join(REFERENCES)} are the references, always run")
    started = time.perf_counter()

    out = Path(args.out or tempfile.mkdtemp(prefix="selection-real-")).resolve()
    if args.run_dir:
        source_run = Path(args.run_dir).resolve()
        args.domain = args.domain or DOMAIN
    else:  # --smoke alone: a tiny run and generated sources, no shared data needed
        source_run, target_source, heldout_source = smoke_run(out / "source")
        args.target_source = args.target_source or str(target_source)
        args.heldout_source = args.heldout_source or str(heldout_source)
        args.domain = args.domain or SMOKE_DOMAIN
    args.target_source = args.target_source or TARGET_SOURCE
    args.heldout_source = args.heldout_source or HELDOUT_SOURCE
    cfg = load_config(source_run / "config.yaml", args.overrides)
    if cfg.data.format == "messages":
        ap.error("data.format messages: the target would not be rendered as the held-out set")
    run = copy_run(source_run, out / "run")
    base_path = base_model_for(cfg, run.path)
    tokenizer = load_tokenizer(base_path)
    pad_id = int(tokenizer.pad_token_id)
    pool, _ = load_samples(cfg.data, tokenizer, cfg.run.seed)
    pool_examples, _ = read_examples(cfg.data, cfg.run.seed)
    pool_prompts = {ex.prompt.strip() for ex in pool_examples}
    domain_of = {s.id: s.domain for s in pool}
    base_rate = float(np.mean([d == args.domain for d in domain_of.values()]))

    rng = np.random.default_rng(args.seed)
    train_ex = read_domain(cfg, domain_entry(cfg, args, args.target_source))
    target_ex, _, _ = draw(train_ex, args.n_target, pool_prompts, rng, tokenizer, cfg, "target")
    target = out / "target.jsonl"
    target.write_text("".join(json.dumps(target_row(ex, cfg)) + "\n" for ex in target_ex))
    test_ex = read_domain(cfg, domain_entry(cfg, args, args.heldout_source))
    seen = pool_prompts | {ex.prompt.strip() for ex in target_ex}
    held_ex, heldout, held_report = draw(
        test_ex, args.n_heldout, seen, rng, tokenizer, cfg, "heldout"
    )
    (out / "heldout.jsonl").write_text(
        "".join(
            json.dumps({"id": ex.id, "prompt": ex.prompt, "response": ex.response}) + "\n"
            for ex in held_ex
        )
    )
    print(
        f"pool {len(pool)} samples ({base_rate:.1%} {args.domain}); target {len(target_ex)} "
        f"records of {args.target_source} not in the pool; held-out {len(heldout)} of "
        f"{args.heldout_source} ({held_report.truncated} truncated to {cfg.data.max_length} "
        f"tokens); work folder {out}"
    )

    rows: dict[str, dict] = {}
    for method in methods:
        rows[method] = run_selection(cfg, run, method, target, args.budget)
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # G-SNR's local Ray: its workers' memory back for training
    rows["all"] = {"ids": [s.id for s in pool]}
    rows["none"] = {"ids": []}

    exp = cfg.experts
    train_cfg = dataclasses.replace(
        exp,
        epochs=args.steps * max(1, exp.grad_accum),
        max_steps=args.steps,
        batch_size=args.batch_size or exp.batch_size,
        lr=args.lr or exp.lr,
    )
    by_id = {s.id: s for s in pool}
    adapters = {"none": str(run.warmup_adapter)}
    for name, row in rows.items():
        row["n_selected"] = len(row["ids"])
        row["target_share"] = (
            float(np.mean([domain_of[i] == args.domain for i in row["ids"]]))
            if row["ids"]
            else None
        )
        if name == "none":
            continue
        folder = out / "adapters" / name
        row.update(
            train_subset(
                cfg, base_path, run, [by_id[i] for i in row["ids"]], train_cfg, pad_id, folder
            )
        )
        adapters[name] = str(folder)
        print(
            f"{name}: {row['n_selected']} samples, {row['steps']} steps in {row['train_s']} s, "
            f"train loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}"
        )

    start = time.perf_counter()
    losses = adapter_losses(
        base_path, cfg.model, adapters, [s.pair for s in heldout], pad_id, base_key="base"
    )
    eval_s = time.perf_counter() - start
    for name, row in rows.items():
        x = losses[name]
        row.update(heldout_loss=float(x.mean()), heldout_sem=float(x.std(ddof=1) / np.sqrt(len(x))))
        if "random" in losses and name != "random":  # paired with random: same held-out records
            d = x - losses["random"]
            row["vs_random"] = float(d.mean())
            row["vs_random_sem"] = float(d.std(ddof=1) / np.sqrt(len(d)))
    base_loss = float(losses["base"].mean())

    print(
        f"\npool {len(pool)} ({base_rate:.1%} {args.domain}), budget {args.budget} "
        f"({budget_count(args.budget, len(pool))} samples), {args.steps} steps of batch "
        f"{train_cfg.batch_size} (lr {train_cfg.lr}) from the warm-up adapter; held-out: "
        f"{len(heldout)} {args.domain} test records; base model {base_loss:.4f}"
    )
    head = (
        f"{'method':8} {'selected':>8} {'target share':>12} {'selection s':>11} "
        f"{'stored bytes':>13} {'held-out loss':>15} {'vs random':>16}"
    )
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        share = f"{r['target_share']:.1%}" if r["target_share"] is not None else "-"
        sel_s = f"{r['selection_s']:.1f}" if "selection_s" in r else "-"
        stored = f"{r['stored_bytes']:,d}" if "stored_bytes" in r else "-"
        vs = f"{r['vs_random']:+.4f}±{r['vs_random_sem']:.4f}" if "vs_random" in r else "-"
        print(
            f"{name:8} {r['n_selected']:8d} {share:>12} {sel_s:>11} {stored:>13} "
            f"{r['heldout_loss']:8.4f}±{r['heldout_sem']:.4f} {vs:>16}"
        )
    print(
        "(loss: mean response-token loss per held-out record, ± its standard error; vs random: "
        "the paired mean difference; stored bytes: the method's per-pool-sample store, "
        "summary.json; GIST's basis and G-SNR's members are in the JSON's gist_bytes / "
        "folder_bytes)"
    )

    if args.json:
        result = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": {
                "platform": platform.platform(),
                "cores": os.cpu_count(),
                "python": sys.version.split()[0],
            },
            "model": cfg.model.name,
            "lora": dataclasses.asdict(cfg.lora),
            "run_dir": str(source_run),
            "work_dir": str(out),
            "pool_size": len(pool),
            "pool_target_share": base_rate,
            "domain": args.domain,
            "budget": args.budget,
            "n_budget": budget_count(args.budget, len(pool)),
            "steps": args.steps,
            "batch_size": train_cfg.batch_size,
            "lr": train_cfg.lr,
            "n_target": len(target_ex),
            "target_source": args.target_source,
            "n_heldout": len(heldout),
            "heldout_source": args.heldout_source,
            "heldout_truncated": held_report.truncated,
            "seed": args.seed,
            "overrides": args.overrides,
            "smoke": args.smoke,
            "base_heldout_loss": base_loss,
            "eval_s": eval_s,
            "total_s": time.perf_counter() - started,
            "methods": rows,
            "heldout_losses": {k: v.tolist() for k, v in losses.items()},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
