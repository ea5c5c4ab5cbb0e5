"""Greedy generation from a weighted mixture of adapters (one adapter is the special case).

At each step every adapter with a non-zero weight for a sequence gives its next-token
distribution; the sequence takes the argmax of ``sum_a w_a p_a``. One-hot weights are routing
(each sequence runs through its own adapter only), soft weights an ensemble (ELREA, or the
router's probabilities). No KV cache: every step re-reads the sequence, which is simple and
exact, and costs little at the lengths the exact-match items need.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from gs_ray.core.gradients import position_ids


@contextlib.contextmanager
def using(model, name: str | None) -> Iterator[None]:
    """The peft model with adapter ``name`` active (None: the base model, adapters off)."""
    if name is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(name)
        yield


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def greedy_mixture(
    model,
    names: Sequence[str | None],
    weights: np.ndarray,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    batch_size: int = 16,
    cached: bool = True,
) -> list[list[int]]:
    """The generated token ids of each prompt (without the prompt, up to and without EOS).

    ``weights``: (n_prompts, len(names)), each row non-negative and summing to 1. When every row
    is one-hot (routing) and ``cached``, each adapter's prompts go through ``generate`` with a KV
    cache; otherwise every step recomputes the prefix under each adapter with weight."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(prompts), len(names)):
        raise ValueError(f"weights {weights.shape} != ({len(prompts)}, {len(names)})")
    device = next(model.parameters()).device
    if (
        cached and (weights.max(1) == 1.0).all()
    ):  # every prompt routed to one adapter: KV-cached generate
        return _greedy_routed(model, names, weights.argmax(1), prompts, max_new_tokens, eos_id,
                              pad_id, batch_size, device)  # fmt: skip
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        seqs = [list(p) for p in prompts[start : start + batch_size]]
        w = torch.as_tensor(weights[start : start + batch_size])
        gen: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        for _ in range(max_new_tokens):
            if not active:
                break
            ids, mask = _left_pad([seqs[j] for j in active], pad_id)
            ids, mask = ids.to(device), mask.to(device)
            mixed = None
            for a, name in enumerate(names):
                wa = w[active, a]
                rows = torch.nonzero(wa > 0).flatten()
                if len(rows) == 0:
                    continue
                with using(model, name):
                    logits = model(input_ids=ids[rows], attention_mask=mask[rows],
                                   position_ids=position_ids(mask[rows])).logits[:, -1]  # fmt: skip
                probs = torch.softmax(logits.double().cpu(), dim=-1)
                if mixed is None:
                    mixed = torch.zeros(len(active), probs.shape[-1], dtype=torch.float64)
                mixed[rows] += wa[rows, None] * probs
            nxt = mixed.argmax(-1).tolist()
            still = []
            for j, token in zip(active, nxt):
                if eos_id is not None and token == eos_id:
                    continue
                gen[j].append(token)
                seqs[j].append(token)
                still.append(j)
            active = still
        out += gen
    return out


def _greedy_routed(model, names, chosen, prompts, max_new_tokens, eos_id, pad_id, batch_size,
                   device) -> list[list[int]]:  # fmt: skip
    """Greedy generation where each prompt uses one adapter: transformers' ``generate`` with its
    KV cache, prompts grouped by adapter (the same tokens as the step-by-step mixture, which
    recomputes the whole prefix at every step)."""
    out: list[list[int]] = [[] for _ in prompts]
    for a, name in enumerate(names):
        rows = np.flatnonzero(chosen == a)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            ids, mask = _left_pad([list(prompts[i]) for i in chunk], pad_id)
            with using(model, name):
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eos_id, pad_token_id=pad_id, top_p=None,
                                     top_k=None, temperature=None)  # fmt: skip
            for j, i in enumerate(chunk):
                tokens = gen[j, ids.shape[1] :].tolist()
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                out[i] = tokens
    return out
