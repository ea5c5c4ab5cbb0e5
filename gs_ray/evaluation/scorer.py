"""``gs-ray eval``'s scorer: one base model with every adapter a plan uses, in one Ray actor.

It gives per-token test losses of the base model or an adapter, greedy generations for a plan
(adapter names and weights per query) and the milliseconds of one forward of a query; ``score``
asks it for one adapter or plan at a time, so that the driver can show progress.
"""

from __future__ import annotations

import time

import numpy as np

from gs_ray.data.loading import prompt_pair
from gs_ray.prepare import Prepared
from gs_ray.ray_utils import task_resources, use_assigned_cpus


class Scorer:
    """One base model with every adapter (merged ones built here) in one process: per-token test
    losses of the base model (name None) or an adapter, greedy generations for a plan (adapter
    names, weights), and the milliseconds of one forward of a query."""

    def __init__(
        self, base_path, model_cfg, adapters: dict[str, str], merges: dict[str, list[str]]
    ):
        from gs_ray.training.loop import load_adapters

        use_assigned_cpus()
        self.first = next(iter(adapters))  # the adapter the latency is timed with
        self.model = load_adapters(base_path, model_cfg, adapters)
        for name, parts in merges.items():
            # combination "cat" stacks the adapters' A and B: its update sum_k w_k B_k A_k is
            # exactly the weighted mean of the experts' updates when w_k = 1/K ("linear" averages
            # A and B separately, which is not the mean of the products).
            self.model.add_weighted_adapter(
                parts, [1.0 / len(parts)] * len(parts), name, combination_type="cat"
            )
        self.model.eval()

    def losses(self, name: str | None, pairs, pad_id: int) -> list[np.ndarray]:
        from gs_ray.core.generate import using
        from gs_ray.training.loop import token_losses

        with using(self.model, name):
            return token_losses(self.model, pairs, pad_id)

    def generate(self, names, weights, prompts, max_new_tokens: int, eos_id, pad_id: int):
        from gs_ray.core.generate import greedy_mixture

        return greedy_mixture(self.model, names, weights, prompts, max_new_tokens, eos_id, pad_id)

    def forward_ms(self, pairs, n_timed: int) -> float:
        import torch

        timed = [prompt_pair(pair)[0] for pair in pairs[:n_timed]]
        self.model.set_adapter(self.first)
        with torch.no_grad():
            for ids in timed[:2]:  # untimed warm-up calls
                self.model(input_ids=torch.tensor([ids]))
            start = time.perf_counter()
            for ids in timed:
                self.model(input_ids=torch.tensor([ids]))
        return 1000 * (time.perf_counter() - start) / max(1, len(timed))


def score(
    p: Prepared,
    adapters: dict[str, str],
    merges: dict[str, list[str]],
    test: np.ndarray,
    gen_plans: dict,
    gen_prompts: list,
) -> tuple[dict, dict, float]:
    """Every adapter's per-token test losses (key None: the base model), every plan's
    generations and one forward's milliseconds, from one ``Scorer`` actor, with a progress
    line per part."""
    import ray

    from gs_ray.progress import Progress

    cfg = p.cfg
    ec = cfg.eval
    scorer = (
        ray.remote(Scorer)
        .options(**task_resources())
        .remote(p.base_path, cfg.model, adapters, merges)
    )
    try:
        pairs = ray.put(p.pairs(test))
        token_nll = {}
        bar = Progress("eval: test losses", total=1 + len(adapters) + len(merges), unit="adapters")
        for name in [None, *adapters, *merges]:
            token_nll[name] = ray.get(scorer.losses.remote(name, pairs, p.pad_id))
            bar.update(1)
        bar.close()
        generated = {}
        if gen_plans:
            bar = Progress("eval: generations", total=len(gen_plans), unit="plans")
            for key, (names, weights) in gen_plans.items():
                generated[key] = ray.get(
                    scorer.generate.remote(
                        names,
                        weights,
                        gen_prompts,
                        ec.max_new_tokens,
                        p.tokenizer.eos_token_id,
                        p.pad_id,
                    )
                )
                bar.update(1)
            bar.close()
        forward_ms = ray.get(scorer.forward_ms.remote(pairs, ec.latency_samples))
    finally:
        ray.kill(scorer)
    return token_nll, generated, forward_ms
