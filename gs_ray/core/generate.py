"""Greedy generation from a weighted mixture of adapters (one adapter is the special case).

At each step every adapter with a non-zero weight for a sequence gives its next-token
distribution; the sequence takes the argmax of ``sum_a w_a p_a``. One-hot weights are routing
(each sequence runs through its own adapter only), soft weights an ensemble (ELREA, or the
router's probabilities). Both keep a KV cache: routing through ``generate``, a mixture with one
cache per adapter, each fed the token the mixture chose. ``cached=False`` re-reads the whole
sequence under every adapter at every step (the simple reference the tests hold them to).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

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

    ``weights``: (n_prompts, len(names)), each row non-negative and summing to 1. With
    ``cached``, a routed batch (every row one-hot) goes through ``generate`` with a KV cache,
    and a mixture keeps one KV cache per adapter; without, every step recomputes the prefix
    under each adapter with weight."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(prompts), len(names)):
        raise ValueError(f"weights {weights.shape} != ({len(prompts)}, {len(names)})")
    device = next(model.parameters()).device
    if (
        cached and (weights.max(1) == 1.0).all()
    ):  # every prompt routed to one adapter: KV-cached generate
        return _greedy_routed(
            model,
            names,
            weights.argmax(1),
            prompts,
            max_new_tokens,
            eos_id,
            pad_id,
            batch_size,
            device,
        )
    one_batch = _greedy_mixture_cached if cached else _greedy_mixture_uncached
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        out += one_batch(
            model,
            names,
            weights[start : start + batch_size],
            prompts[start : start + batch_size],
            max_new_tokens,
            eos_id,
            pad_id,
            device,
        )
    return out


def _greedy_mixture_uncached(
    model, names, weights, prompts, max_new_tokens, eos_id, pad_id, device
) -> list[list[int]]:
    """One batch of the mixture, the reference: every step re-reads each unfinished sequence
    under every adapter that has weight for it."""
    seqs = [list(p) for p in prompts]
    w = torch.as_tensor(weights)
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
                logits = model(
                    input_ids=ids[rows],
                    attention_mask=mask[rows],
                    position_ids=position_ids(mask[rows]),
                ).logits[:, -1]
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
    return gen


def _greedy_mixture_cached(
    model, names, weights, prompts, max_new_tokens, eos_id, pad_id, device
) -> list[list[int]]:
    """One batch of the mixture with a KV cache per adapter (``mixture_steps``). Rows that
    reached EOS keep stepping (their tokens are dropped), so that the caches stay one batch."""
    gen: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for chosen in mixture_steps(model, names, weights, prompts, max_new_tokens, pad_id, device):
        for j, token in enumerate(chosen):
            if done[j]:
                continue
            if eos_id is not None and token == eos_id:
                done[j] = True
            else:
                gen[j].append(token)
        if all(done):
            break
    return gen


@torch.no_grad()
def mixture_steps(
    model,
    names: Sequence[str | None],
    weights,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    pad_id: int,
    device,
) -> Iterator[list[int]]:
    """The mixture's greedy token of every row, one step at a time (``max_new_tokens`` steps
    unless the consumer stops early; EOS is the consumer's to notice). Each adapter with weight
    for some row reads the prompts once, then keeps a KV cache that is fed only the token the
    mixture chose: one forward of one token per adapter per step."""
    w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
    ids, mask = _left_pad([list(p) for p in prompts], pad_id)
    ids, mask = ids.to(device), mask.to(device)
    rows = {a: torch.nonzero(w[:, a] > 0).flatten() for a in range(len(names))}
    rows = {a: r for a, r in rows.items() if len(r)}
    caches: dict[int, Any] = {}
    nxt = None
    for _ in range(max_new_tokens):
        mixed = None
        for a, r in rows.items():
            with using(model, names[a]):
                if nxt is None:  # the prompt
                    res = model(
                        input_ids=ids[r],
                        attention_mask=mask[r],
                        position_ids=position_ids(mask[r]),
                        use_cache=True,
                    )
                else:  # one new token per row, at the next position
                    res = model(
                        input_ids=nxt[r, None],
                        attention_mask=mask[r],
                        position_ids=mask[r].sum(1, keepdim=True) - 1,
                        past_key_values=caches[a],
                        use_cache=True,
                    )
            caches[a] = res.past_key_values
            probs = torch.softmax(res.logits[:, -1].double().cpu(), dim=-1)
            if mixed is None:
                mixed = torch.zeros(len(prompts), probs.shape[-1], dtype=torch.float64)
            mixed[r] += w[r, a, None] * probs
        chosen = mixed.argmax(-1)
        yield chosen.tolist()
        nxt = chosen.to(device)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)


def _greedy_routed(
    model, names, chosen, prompts, max_new_tokens, eos_id, pad_id, batch_size, device
) -> list[list[int]]:
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
                gen = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    eos_token_id=eos_id,
                    pad_token_id=pad_id,
                    top_p=None,
                    top_k=None,
                    temperature=None,
                )
            for j, i in enumerate(chunk):
                tokens = gen[j, ids.shape[1] :].tolist()
                if eos_id is not None and eos_id in tokens:
                    tokens = tokens[: tokens.index(eos_id)]
                out[i] = tokens
    return out
