"""Every seed derived from ``run.seed``, named: one place for the offsets that keep the random
streams of a run apart (changing one changes the run's numbers, so each is pinned by the
embedded default's results).

The run's own stream (``run.seed``) draws the splits, the warm-up's LoRA and batch order, and
the generalist's. The others:
"""

from __future__ import annotations

EVAL_SEED_STRIDE = 1000  # gs-ray eval's seed i is run.seed + 1000 i (seed 0 is the run itself)
GSNR_MEMBER_BASE = 1000  # G-SNR member m: run.seed + 1000 + m
ONLINE_ORDER_STRIDE = 101  # Stage II's online epoch e visits batches in order seed + 101 (e + 1)
FINAL_ORDER_OFFSET = 7  # ... and its final pass in order seed + 7
TUNE_SAMPLE_OFFSET = 3  # Ray Tune's gradient sample: run.seed + 3


def eval_seed(run_seed: int, seed_index: int) -> int:
    """The base seed of ``gs-ray eval``'s seed ``seed_index`` (its partitions, its adapters)."""
    return run_seed + EVAL_SEED_STRIDE * seed_index


def eval_router_seed(run_seed: int, seed_index: int) -> int:
    """The routers ``gs-ray eval`` fits for its seed ``seed_index`` (seed 0: the run's own)."""
    return run_seed + seed_index


def expert_seed(base_seed: int, cluster: int) -> int:
    """The LoRA initialisation and batch order of the expert of ``cluster`` (the run's experts
    from ``run.seed``, an eval seed's from ``eval_seed``)."""
    return base_seed + 1 + cluster


def gsnr_member_seed(run_seed: int, member: int) -> int:
    """G-SNR ensemble member ``member``: its data order and LoRA initialisation."""
    return run_seed + GSNR_MEMBER_BASE + member


def online_order_seed(run_seed: int, epoch: int) -> int:
    """The batch order of Stage II's online epoch ``epoch`` (0-based)."""
    return run_seed + ONLINE_ORDER_STRIDE * (epoch + 1)


def final_order_seed(run_seed: int) -> int:
    """The batch order of Stage II's final pass."""
    return run_seed + FINAL_ORDER_OFFSET


def tune_sample_seed(run_seed: int) -> int:
    """Which samples Ray Tune's K search takes gradients of."""
    return run_seed + TUNE_SAMPLE_OFFSET


def tune_expert_seed(run_seed: int, cluster: int) -> int:
    """The torch seed (LoRA dropout) of a Ray Tune trial's expert of ``cluster``."""
    return run_seed + cluster
