"""G-SNR on planted label noise: does the LoRA ensemble's gradient signal-to-noise ratio rank clean
samples above samples whose response was swapped for another sample's?

Demo-corpus samples; a seeded fraction (``--noisy``) get the response of another, random sample
(the prompt stays). ``gsnr_scores`` trains ``--members`` LoRA adapters on all of them at once on Ray
(a local Ray started here, or RAY_ADDRESS), scores every sample (``energy``), and the same members
score them again with the ``coordinate`` form. Prints, per form, the AUC (the chance that a clean
sample scores above a noisy one; 0.5 = no signal) and the share of clean samples among the top
``1 - noisy`` fraction; writes them to ``--json``.

    .venv/bin/python benchmarks/gsnr_planted.py --n 96 --members 4 \
        --json benchmarks/results/gsnr_planted.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from gs_ray.config import load_config  # noqa: E402
from gs_ray.core.models import load_tokenizer  # noqa: E402
from gs_ray.data import Sample, load_samples  # noqa: E402
from gs_ray.selection.gsnr import gsnr_scores, member_scores, select_top  # noqa: E402
from gs_ray.training.pretrain import base_model_for  # noqa: E402


def swap_responses(samples: list[Sample], fraction: float, seed: int) -> np.ndarray:
    """Give a seeded ``fraction`` of the samples another sample's response (in place); returns the
    noisy mask."""
    rng = np.random.default_rng(seed)
    noisy = np.zeros(len(samples), dtype=bool)
    noisy[rng.choice(len(samples), int(round(fraction * len(samples))), replace=False)] = True
    originals = [s.pair for s in samples]
    for i in np.flatnonzero(noisy):
        j = int(rng.choice([k for k in range(len(samples)) if k != i]))
        ids, labels = originals[i]
        prompt = sum(1 for t in labels if t == -100)
        other_ids, other_labels = originals[j]
        response = other_ids[sum(1 for t in other_labels if t == -100) :]
        samples[i].input_ids = list(ids[:prompt]) + list(response)
        samples[i].labels = [-100] * prompt + list(response)
    return noisy


def auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    p, n = scores[positive], scores[~positive]
    greater = (p[:, None] > n[None, :]).mean()
    return float(greater + 0.5 * (p[:, None] == n[None, :]).mean())


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=96, help="demo samples")
    ap.add_argument("--noisy", type=float, default=0.25, help="share with a swapped response")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per member")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--work", help="where the members go (default: a new temporary folder)")
    ap.add_argument(
        "--smoke", action="store_true", help="32 samples, 2 members, 2 steps, in one Ray Train run"
    )
    ap.add_argument("overrides", nargs="*", help="--section.key value pairs (after --)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.n, args.members, args.steps = 32, 2, 2
    return args


def setup(args: argparse.Namespace, work: str):
    """The config, the base model, the samples (a seeded share with a swapped response) and the
    noisy mask of a run with these arguments: the same every time."""
    cfg = load_config(
        None,
        [
            "--data.demo_size",
            str(args.n),
            "--gsnr.members",
            str(args.members),
            "--gsnr.max_steps",
            str(args.steps),
            "--gsnr.use_gpu",
            "auto",
            "--gsnr.zero_stage",
            "1",
            "--run.seed",
            str(args.seed),
            *(["--gsnr.parallel", "false"] if args.smoke else []),  # one run: one start-up
            *args.overrides,
        ],
    )
    base = base_model_for(cfg, work)
    tokenizer = load_tokenizer(base)
    samples, _ = load_samples(cfg.data, tokenizer, cfg.run.seed)
    noisy = swap_responses(samples, args.noisy, args.seed)
    return cfg, base, samples, noisy, int(tokenizer.pad_token_id)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    work = args.work or tempfile.mkdtemp(prefix="gsnr-planted-")
    cfg, base, samples, noisy, pad = setup(args, work)
    start = time.perf_counter()
    result = gsnr_scores(cfg, samples, base, pad, work)
    coord_cfg = dataclasses.replace(cfg, gsnr=dataclasses.replace(cfg.gsnr, form="coordinate"))
    pairs, ids = [s.pair for s in samples], [s.id for s in samples]
    scores = {
        "energy": result.scores,
        "coordinate": member_scores(coord_cfg, base, result.members, pairs, ids, pad),
    }
    keep = 1 - args.noisy
    rows = {}
    for form, s in scores.items():
        top = select_top(s, keep)
        rows[form] = {
            "auc_clean_above_noisy": auc(s, ~noisy),
            "clean_share_of_top": float((~noisy[top]).mean()),
        }
    print(f"{'form':<12} {'AUC clean>noisy':>16} {'clean share of top':>20}")
    for form, r in rows.items():
        print(f"{form:<12} {r['auc_clean_above_noisy']:>16.3f} {r['clean_share_of_top']:>20.3f}")
    print(
        f"(chance: AUC 0.5, clean share {keep:.2f}); training {result.seconds['training']:.0f}s, "
        f"scoring {result.seconds['scoring']:.0f}s"
    )
    if args.json:
        out = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(),
            "python": sys.version.split()[0],
            "n": len(samples),
            "noisy": args.noisy,
            "members": args.members,
            "steps": args.steps,
            "model": cfg.model.name,
            "lora_r": cfg.lora.r,
            "results": rows,
            "seconds": result.seconds,
            "total_s": time.perf_counter() - start,
            "member_final_loss": {k: r["losses"][-1] for k, r in result.records.items()},
            "member_steps": {k: len(r["losses"]) for k, r in result.records.items()},
            "member_paths": [str(m) for m in result.members],
            "scores": {form: [float(x) for x in s] for form, s in scores.items()},
        }
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
