"""The per-sample gradient engine: full-dimensional LoRA gradients, one row per sample.

For a padded batch it returns a (batch, d) matrix whose row i is the gradient of sample i's own
mean response-token loss with respect to every LoRA parameter, flattened.

How: one ordinary forward and backward of the summed per-sample losses. Hooks on each LoRA
``Linear`` (peft's ``lora_A`` / ``lora_B``) keep the layer input x (batch, tokens, in) and the
gradient at its output g (batch, tokens, out); since W enters only through y = x W^T, sample i's
gradient is ``sum_t g[i, t]^T x[i, t]`` - one einsum per layer. Samples do not interact in a
causal LM with an attention mask, so each row depends only on its own sample: not on the other
samples in the batch nor on the padding side (position ids follow the attention mask).

Parameter order (fixed, documented, stored in run directories as ``param_names``): the order of
``model.named_parameters()`` restricted to the trainable LoRA weights, each flattened row-major
(``lora_A``: (r, in), ``lora_B``: (out, r)).
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gs_ray.config import ProjectionKind

IGNORE_INDEX = -100


@dataclass
class Batch:
    """A padded batch: token ids, attention mask, labels (-100 outside the response)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)))

    @property
    def n_real_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, side: str = "right"
) -> Batch:
    """Pad (input_ids, labels) pairs into a Batch; labels are -100 on prompt and padding."""
    width = max(len(ids) for ids, _ in samples)
    n = len(samples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, (ids, lab) in enumerate(samples):
        k = len(ids)
        sl = slice(0, k) if side == "right" else slice(width - k, width)
        input_ids[i, sl] = torch.as_tensor(ids, dtype=torch.long)
        labels[i, sl] = torch.as_tensor(lab, dtype=torch.long)
        mask[i, sl] = 1
    return Batch(input_ids, mask, labels)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left and right padding give the same result."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


# Architectures whose logits are exactly lm_head(final hidden state): for them the LM head runs
# on the response positions only (prompt and padding positions carry no loss).
_PLAIN_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3", "phi3"}


def _plain_head(model: nn.Module):
    """(decoder, lm_head) when the fast response-only path applies, else None.

    Training engines (DeepSpeed's, ``TorchEngine``) are unwrapped through ``.module``; with ZeRO
    stages 0-2 the submodules hold their full parameters, so calling them directly is safe.
    """
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "config"):
        return None
    if getattr(base.config, "model_type", None) not in _PLAIN_HEAD_TYPES:
        return None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def response_token_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss of every response token in the batch: ``(loss, row)``, both of shape
    (n_tokens,), ``row[j]`` the sample token j belongs to; tokens in order within a sample."""
    targets = batch.labels[:, 1:]
    keep = targets != IGNORE_INDEX
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=position_ids(batch.attention_mask),
        use_cache=False,
    )
    rows, cols = keep.nonzero(as_tuple=True)
    parts = _plain_head(model)
    if parts is not None:
        decoder, head = parts
        hidden = decoder(**inputs).last_hidden_state[:, :-1]
        logits = head(hidden[rows, cols]).float()
    else:
        logits = model(**inputs).logits[:, :-1].float()[rows, cols]
    return nn.functional.cross_entropy(logits, targets[rows, cols], reduction="none"), rows


def per_sample_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each sample's mean next-token loss over its response tokens, shape (batch,)."""
    token_loss, rows = response_token_loss(model, batch)
    counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
    sums = torch.zeros(len(counts), dtype=token_loss.dtype, device=token_loss.device)
    return sums.index_add(0, rows, token_loss) / counts


def lora_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters in gradient order (see module docstring)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def input_and_output_grad_hook(entries: list):
    """A forward hook that appends ``[input, None]`` to ``entries`` on each call and fills in the
    gradient of the module's output on the backward pass: the two factors of a linear layer's
    per-sample weight gradient (the LoRA engine here, the spectra of ``selection/spectra.py``)."""

    def hook(module, inputs, output):
        entry = [inputs[0].detach(), None]
        entries.append(entry)

        def keep_grad(grad):
            entry[1] = grad.detach()

        output.register_hook(keep_grad)

    return hook


class LoRAGradientEngine:
    """Per-sample LoRA gradients of a peft model by forward/backward hooks.

    Example::

        engine = LoRAGradientEngine(peft_model)
        G = engine.compute(batch)          # (batch, engine.dim) float32 on CPU
    """

    def __init__(self, model: nn.Module):
        self.model = model
        params = lora_parameters(model)
        if not params:
            raise ValueError("the model has no trainable parameters: add a LoRA adapter first")
        by_param = {id(p): name for name, p in params}
        # Every trainable parameter must be the weight of a bias-free Linear that we can hook.
        self._modules: dict[str, nn.Linear] = {}
        for _, module in model.named_modules():
            if isinstance(module, nn.Linear) and id(module.weight) in by_param:
                if module.bias is not None and module.bias.requires_grad:
                    raise ValueError("trainable biases are not supported (use LoRA bias='none')")
                self._modules[by_param[id(module.weight)]] = module
        missing = [n for n, _ in params if n not in self._modules]
        if missing:
            raise ValueError(
                f"trainable parameters outside LoRA Linear layers are not supported: {missing[:3]}"
            )
        self.param_names = [n for n, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        sizes = [p.numel() for _, p in params]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.dim = int(self.offsets[-1])

    @contextlib.contextmanager
    def _hooks(self, store: dict[str, list]):
        handles = []
        for name, module in self._modules.items():
            store[name] = []
            handles.append(module.register_forward_hook(input_and_output_grad_hook(store[name])))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def compute(self, batch: Batch, return_loss: bool = False):
        """Per-sample gradients (batch, dim) as float32 on the CPU; dropout is off meanwhile."""
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        was_training = self.model.training
        self.model.eval()
        store: dict[str, list] = {}
        params = [p for _, p in lora_parameters(self.model)]
        try:
            with torch.enable_grad(), self._hooks(store):
                losses = per_sample_loss(self.model, batch)
                torch.autograd.grad(losses.sum(), params)
        finally:
            self.model.train(was_training)
        mask = batch.attention_mask.bool()[..., None]
        out = torch.empty((batch.input_ids.shape[0], self.dim), dtype=torch.float32, device=device)
        for name, lo, hi in zip(self.param_names, self.offsets[:-1], self.offsets[1:]):
            calls = store[name]
            if len(calls) != 1:
                raise RuntimeError(f"{name} ran {len(calls)} times in one forward (checkpointing?)")
            x, g = calls[0]
            if g is None:
                g = torch.zeros(*x.shape[:-1], self._modules[name].out_features, device=device)
            # Padding positions carry no loss; zero them so that stray values there cannot leak.
            x = torch.where(mask, x, 0).float()
            g = torch.where(mask, g, 0).float()
            out[:, lo:hi] = torch.einsum("bto,bti->boi", g, x).reshape(len(out), -1)
        grads = out.cpu()
        return (grads, losses.detach().cpu()) if return_loss else grads

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unflatten one gradient row (or rows) into named parameter-shaped tensors."""
        lead = flat.shape[:-1]
        return {
            name: flat[..., lo:hi].reshape(*lead, *shape)
            for name, shape, lo, hi in zip(
                self.param_names, self.shapes, self.offsets[:-1], self.offsets[1:]
            )
        }


def compute_bucketed(
    engine: LoRAGradientEngine,
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    micro_batch: int,
) -> torch.Tensor:
    """Per-sample gradients of any number of samples, in their order, computed in micro-batches
    of similar length (sorted by length) so that little compute goes to padding."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    out = torch.empty((len(samples), engine.dim), dtype=torch.float32)
    for start in range(0, len(order), micro_batch):
        chunk = order[start : start + micro_batch]
        out[chunk] = engine.compute(collate([samples[i] for i in chunk], pad_id))
    return out


def loop_gradients(
    model: nn.Module, samples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
):
    """Reference: one batch-1 backward per unpadded sample (what LESS does), rows as above."""
    params = lora_parameters(model)
    was_training = model.training
    model.eval()
    rows = []
    try:
        for sample in samples:
            batch = collate([sample], pad_id).to(next(model.parameters()).device)
            with torch.enable_grad():
                loss = per_sample_loss(model, batch).sum()
                grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                        for g, (_, p) in zip(grads, params)
                    ]
                ).cpu()
            )
    finally:
        model.train(was_training)
    return torch.stack(rows)


class RandomProjection:
    """Seeded random projection R^d -> R^k (the ELREA/LESS baseline; off by default).

    ``rademacher``: a dense +-1 matrix, ``G @ R / sqrt(k)``; the (d, k) matrix is generated in
    row chunks from the seed, so it is never held whole, but every call costs n*d*k.
    ``countsketch``: each coordinate i goes to one seeded bucket h(i) with a seeded sign s(i),
    ``out[:, h(i)] += s(i) * g[:, i]`` (a sparse Johnson-Lindenstrauss map, Charikar et al.
    2002; Weinberger et al. 2009): n*d work, which is what makes ELREA's 8,192-dim projection of
    a 1.8M-dim LoRA gradient take seconds instead of a quarter of an hour on a CPU. Both keep
    inner products in expectation.
    """

    def __init__(
        self,
        dim: int,
        k: int,
        seed: int = 0,
        chunk: int = 65536,
        kind: ProjectionKind = "rademacher",
    ):
        if kind not in typing.get_args(ProjectionKind):
            raise ValueError(
                f"projection kind {kind!r}: expected one of {typing.get_args(ProjectionKind)}"
            )
        self.dim, self.k, self.seed, self.chunk, self.kind = dim, k, seed, chunk, kind

    def _gen(self, start: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + start)

    def _block(self, start: int, stop: int) -> torch.Tensor:
        bits = torch.randint(
            0, 2, (stop - start, self.k), generator=self._gen(start), dtype=torch.int8
        )
        return bits.float().mul_(2).sub_(1)

    def _hash(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket and sign of coordinates [start, stop)."""
        gen = self._gen(start)
        buckets = torch.randint(0, self.k, (stop - start,), generator=gen)
        signs = torch.randint(0, 2, (stop - start,), generator=gen).float().mul_(2).sub_(1)
        return buckets, signs

    def matrix(self) -> torch.Tensor:
        """The whole (d, k) matrix (tests and small d only): ``G @ matrix()`` is the projection."""
        return self(torch.eye(self.dim))

    def __call__(self, grads: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(grads.shape[0], self.k)
        for start in range(0, self.dim, self.chunk):
            stop = min(start + self.chunk, self.dim)
            block = grads[:, start:stop].float()
            if self.kind == "countsketch":
                buckets, signs = self._hash(start, stop)
                out.index_add_(1, buckets, block * signs)
            else:
                out += block @ self._block(start, stop)
        return out if self.kind == "countsketch" else out / self.k**0.5
