"""Throughput of the per-sample LoRA gradient engine against a batch-1 loop and a training step.

On one batch of realistic samples of mixed lengths (from the built-in demo corpus), in one process:

  (a) the engine as the pipeline uses it: ``compute_bucketed(engine, pairs, pad_id, micro_batch)``
      with the configured micro-batch (``GradientConfig.batch_size``);
  (b) a loop of batch-1 backwards over the unpadded samples (what LESS does): ``loop_gradients``;
  (c) one ordinary forward+backward training step into the LoRA parameters' ``.grad``, on the same
      length-sorted micro-batches as (a) (accumulating): the floor per-sample gradients cannot beat;
  (c') the same training step on one padded batch of all samples (for information).

Prints a table and the throughput ratios a/b (``speedup_vs_loop``) and a/c
(``ratio_vs_train_step``), checks (a) against (b) once, and writes everything to ``--json``.

    .venv/bin/python benchmarks/gradient_throughput.py --json benchmarks/results/gradient_tiny.json
    .venv/bin/python benchmarks/gradient_throughput.py --model smollm2-135m --batch 8 --repeats 1
    .venv/bin/python benchmarks/gradient_throughput.py --smoke --json /tmp/g.json   # seconds
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from gs_ray.config import Config, DataConfig  # noqa: E402
from gs_ray.core.gradients import (  # noqa: E402
    LoRAGradientEngine,
    collate,
    compute_bucketed,
    loop_gradients,
    lora_parameters,
    per_sample_loss,
)
from gs_ray.core.models import (  # noqa: E402
    add_lora,
    load_base_model,
    load_tokenizer,
    materialize_base_model,
    resolve_device,
)
from gs_ray.data import load_samples  # noqa: E402

TARGET_VS_TRAIN_STEP = 0.8  # a/c: per-sample gradients cost at most 1.25x a training step
TARGET_VS_LOOP = 1.0  # a/b: never slower than the batch-1 loop
B_STD = 0.02  # scale of the random LoRA B matrices (a fresh adapter has B = 0)
SMOKE = {"batch": 4, "micro_batch": 2, "repeats": 1, "device": "cpu"}  # --smoke (the suite's)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llama", help="tiny-llama | smollm2-135m | HF path")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--batch", type=int, default=32, help="samples in the benchmark batch")
    p.add_argument("--micro-batch", type=int, default=None, help="default: GradientConfig")
    p.add_argument("--repeats", type=int, default=5, help="timed runs (median, best)")
    p.add_argument("--seed", type=int, default=0, help="model, LoRA, sample choice")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="write the results to this file")
    p.add_argument("--smoke", action="store_true", help=f"tiny sizes, seconds: {SMOKE}")
    args = p.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def stratified_by_length(lengths: np.ndarray, k: int, seed: int) -> np.ndarray:
    """One sample drawn at random from each of k equal-count length quantile bins."""
    rng = np.random.default_rng(seed)
    order = np.argsort(lengths, kind="stable")
    return np.array([rng.choice(part) for part in np.array_split(order, k)])


def padded_waste(lengths: list[int], groups: list[list[int]]) -> float:
    """Pad tokens / all tokens when each group is padded to its longest member."""
    total = sum(len(g) * max(lengths[i] for i in g) for g in groups)
    return 1.0 - sum(lengths) / total


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, pairs, groups, pad_id, device) -> None:
    """Mean per-sample loss, backward into .grad; micro-batches accumulate (weighted by size)."""
    model.zero_grad(set_to_none=True)
    n = len(pairs)
    for g in groups:
        batch = collate([pairs[i] for i in g], pad_id).to(device)
        loss = per_sample_loss(model, batch).mean() * (len(g) / n)
        loss.backward()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "gs-ray"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config()
    cfg.model.name = args.model
    cfg.model.device = args.device
    cfg.model.tiny_pretrain_steps = 0  # the weights' values do not change the cost
    micro = args.micro_batch or cfg.gradients.batch_size
    device = resolve_device(args.device)

    # ---- the model, exactly as the pipeline builds it, then a "warmed-up" adapter (B != 0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = materialize_base_model(cfg.model, Path(tmp), args.seed)
        tokenizer = load_tokenizer(path)
        model = add_lora(load_base_model(path, cfg.model, device), cfg.lora, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * B_STD)
    model.eval()  # every variant without dropout, as the engine takes gradients
    engine = LoRAGradientEngine(model)
    pad_id = int(tokenizer.pad_token_id)
    print(
        f"model {args.model}: d = {engine.dim:,} LoRA parameters, loaded in "
        f"{time.perf_counter() - t0:.1f} s; device {device}, {torch.get_num_threads()} threads"
    )

    # ---- realistic samples of mixed lengths: stratified over the corpus's length quantiles
    samples, _ = load_samples(DataConfig(source="demo"), tokenizer, args.seed)
    lengths_all = np.array([len(s) for s in samples])
    chosen = stratified_by_length(lengths_all, args.batch, args.seed)
    pairs = [samples[i].pair for i in chosen]
    lengths = [len(ids) for ids, _ in pairs]
    n_tokens = sum(lengths)
    # the same length-sorted micro-batches that compute_bucketed forms
    order = sorted(range(len(pairs)), key=lambda i: lengths[i])
    groups = [order[s : s + micro] for s in range(0, len(order), micro)]
    print(
        f"{len(pairs)} samples from {len(samples)} (demo corpus), {n_tokens} real tokens, "
        f"lengths {min(lengths)}-{max(lengths)} (median {int(np.median(lengths))}); "
        f"micro-batch {micro}"
    )

    variants = {
        "a_engine": (
            f"(a) engine, compute_bucketed (mb={micro})",
            lambda: compute_bucketed(engine, pairs, pad_id, micro),
        ),
        "b_loop": (
            "(b) loop of batch-1 backwards",
            lambda: loop_gradients(model, pairs, pad_id),
        ),
        "c_train_step": (
            "(c) train step, same micro-batches",
            lambda: train_step(model, pairs, groups, pad_id, device),
        ),
        "c1_train_step_one_batch": (
            f"(c') train step, one padded batch of {len(pairs)}",
            lambda: train_step(model, pairs, [order], pad_id, device),
        ),
    }

    # ---- warm-up run of each variant, which is also the correctness check
    G = variants["a_engine"][1]()
    R = variants["b_loop"][1]()
    rel = (G - R).norm(dim=1) / R.norm(dim=1).clamp(min=1e-30)
    max_rel_err = float(rel.max())
    # the training step's accumulated .grad must be the mean of the per-sample rows
    variants["c_train_step"][1]()
    flat = torch.cat([p.grad.reshape(-1) for _, p in lora_parameters(model)]).float().cpu()
    mean_row = G.mean(0)
    train_err = float((flat - mean_row).norm() / mean_row.norm())
    variants["c1_train_step_one_batch"][1]()
    model.zero_grad(set_to_none=True)
    print(
        f"correctness: max relative error (a) vs (b) rows = {max_rel_err:.2e}; "
        f"(c) .grad vs mean of (a) rows = {train_err:.2e}"
    )

    # ---- timed runs, interleaved so that background load hits every variant alike
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for key, (_, fn) in variants.items():
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t)
        model.zero_grad(set_to_none=True)

    results = {}
    waste = {
        "a_engine": padded_waste(lengths, groups),
        "b_loop": 0.0,
        "c_train_step": padded_waste(lengths, groups),
        "c1_train_step_one_batch": padded_waste(lengths, [order]),
    }
    print()
    print(
        f"{'variant':44s} {'seconds':>8s} {'samples/s':>10s} {'tokens/s':>10s} {'pad waste':>10s}"
        f" {'best s':>8s}"
    )
    for key, (label, _) in variants.items():
        sec = statistics.median(times[key])
        results[key] = {
            "label": label,
            "seconds": sec,
            "seconds_best": min(times[key]),
            "seconds_all": times[key],
            "samples_per_s": len(pairs) / sec,
            "tokens_per_s": n_tokens / sec,
            "pad_waste": waste[key],
        }
        r = results[key]
        print(
            f"{label:44s} {sec:8.3g} {r['samples_per_s']:10.3g} {r['tokens_per_s']:10.4g} "
            f"{100 * waste[key]:9.1f}% {r['seconds_best']:8.3g}"
        )
    a = results["a_engine"]["seconds"]
    speedup_vs_loop = results["b_loop"]["seconds"] / a
    ratio_vs_train_step = results["c_train_step"]["seconds"] / a
    ratio_vs_one_batch = results["c1_train_step_one_batch"]["seconds"] / a
    # best-of-N ratios: a robust second opinion when other processes load the CPU
    best = {k: v["seconds_best"] for k, v in results.items()}
    speedup_vs_loop_best = best["b_loop"] / best["a_engine"]
    ratio_vs_train_step_best = best["c_train_step"] / best["a_engine"]
    met_loop = speedup_vs_loop >= TARGET_VS_LOOP
    met_train = ratio_vs_train_step >= TARGET_VS_TRAIN_STEP
    print()
    print(
        f"speedup_vs_loop      a/b  = {speedup_vs_loop:5.2f}  (target >= {TARGET_VS_LOOP}: "
        f"{'met' if met_loop else 'NOT met'})"
    )
    print(
        f"ratio_vs_train_step  a/c  = {ratio_vs_train_step:5.2f}  (target >= "
        f"{TARGET_VS_TRAIN_STEP}: {'met' if met_train else 'NOT met'})"
    )
    print(f"ratio_vs_one_batch   a/c' = {ratio_vs_one_batch:5.2f}  (for information)")
    print(
        f"best of {args.repeats}: a/b = {speedup_vs_loop_best:.2f}, "
        f"a/c = {ratio_vs_train_step_best:.2f}"
    )
    print(f"max_rel_err_vs_loop       = {max_rel_err:.2e}")

    out = {
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "dim": engine.dim,
        "batch_size": len(pairs),
        "micro_batch": micro,
        "repeats": args.repeats,
        "seed": args.seed,
        "sampling": "stratified: one sample per equal-count length quantile bin of the demo corpus",
        "n_real_tokens": n_tokens,
        "lengths": lengths,
        "pad_waste_a": waste["a_engine"],
        "pad_waste_c1": waste["c1_train_step_one_batch"],
        "speedup_vs_loop": speedup_vs_loop,
        "ratio_vs_train_step": ratio_vs_train_step,
        "ratio_vs_one_batch": ratio_vs_one_batch,
        "speedup_vs_loop_best": speedup_vs_loop_best,
        "ratio_vs_train_step_best": ratio_vs_train_step_best,
        "targets": {
            "speedup_vs_loop": TARGET_VS_LOOP,
            "ratio_vs_train_step": TARGET_VS_TRAIN_STEP,
            "speedup_vs_loop_met": met_loop,
            "ratio_vs_train_step_met": met_train,
        },
        "max_rel_err_vs_loop": max_rel_err,
        "rel_err_train_grad_vs_mean_row": train_err,
        "variants": results,
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else list(argv),
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
