"""Layer-wise gradient spectra (arXiv 2504.10766): per sample and per attention projection of every
layer, the nuclear norm and the effective rank of the sample's gradient of the BASE weight.

A linear layer y = x W^T (W: out x in) gets, from one sample of T tokens, the gradient
G = sum_t delta_t x_t^T = D^T X, with D (T x out) the gradients at the layer's output and X (T x in)
its inputs (padding rows zero). G has rank at most T, and its nonzero singular values are those of
a T x T matrix: with the thin QR factorisations D^T = Q_D R_D and X^T = Q_X R_X (Q with
orthonormal columns), G = Q_D (R_D R_X^T) Q_X^T, so ``svdvals(G) = svdvals(R_D R_X^T)``. The
out x in gradient is never formed; QR keeps the condition number of D and X (a Gram matrix
D D^T would square it). The factorisations run in float64 whatever the model's dtype.

The metrics of one gradient with singular values s (``nuclear_norm``, ``effective_rank``):

* nuclear norm ``sum_i s_i``;
* effective rank ``exp(-sum_i p_i ln p_i)`` with ``p_i = s_i / sum_j s_j`` (1 for a rank-one
  matrix, r for r equal singular values; 0 for the zero matrix by convention).

``SpectraEngine`` captures x and delta with forward hooks (and a tensor hook on each output) on a
padded batch, with one ordinary backward of the summed per-sample losses, as
``core.gradients.LoRAGradientEngine`` does for LoRA weights. Pure torch: no Ray.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from gs_ray.core.gradients import Batch, per_sample_loss

#: The attention projections the paper measures (Llama-family names).
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER = re.compile(r"\.(\d+)\.")


def nuclear_norm(s: torch.Tensor) -> torch.Tensor:
    """Sum of the singular values (last axis)."""
    return s.sum(-1)


def effective_rank(s: torch.Tensor) -> torch.Tensor:
    """exp of the entropy of the normalised singular values (last axis); 0 for an all-zero row."""
    total = s.sum(-1, keepdim=True)
    p = s / total.clamp_min(torch.finfo(s.dtype).tiny)
    entropy = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), 0)).sum(-1)
    return torch.where(total.squeeze(-1) > 0, entropy.exp(), 0)


def factored_singular_values(D: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Singular values of ``D^T X`` (batched: D (..., T, out), X (..., T, in)) without forming it.

    Returns (..., k) in descending order, k = min(T, out, in); float64.
    """
    D, X = D.double(), X.double()
    _, r_d = torch.linalg.qr(D.transpose(-1, -2))  # (..., min(out, T), T)
    _, r_x = torch.linalg.qr(X.transpose(-1, -2))  # (..., min(in, T), T)
    return torch.linalg.svdvals(r_d @ r_x.transpose(-1, -2))


@dataclass
class Projection:
    """One measured linear layer: its module name, layer index and kind (q_proj, ...)."""

    name: str
    layer: int
    kind: str
    module: nn.Linear


def attention_projections(model: nn.Module, kinds: Sequence[str]) -> list[Projection]:
    """The ``nn.Linear`` modules whose name ends in one of ``kinds`` and that sit in a numbered
    layer, in (layer, kind) order. LoRA-wrapped layers are measured at their base weight."""
    found = []
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind not in kinds:
            continue
        base = getattr(module, "base_layer", module)  # peft's LoRA Linear wraps the base one
        match = _LAYER.search(name)
        if isinstance(base, nn.Linear) and match:
            found.append(Projection(name, int(match.group(1)), kind, base))
    if not found:
        raise ValueError(f"the model has no Linear layers named {list(kinds)} inside numbered layers")
    order = {k: i for i, k in enumerate(kinds)}
    return sorted(found, key=lambda p: (p.layer, order[p.kind]))


@dataclass
class Spectra:
    """A batch's metrics: (batch, n_layers, n_kinds) arrays, with the layers and kinds they index,
    and each sample's loss and number of real tokens."""

    nuclear_norm: np.ndarray
    effective_rank: np.ndarray
    layers: list[int]
    kinds: list[str]
    loss: np.ndarray
    n_tokens: np.ndarray


class SpectraEngine:
    """Per-sample spectra of the base weights' gradients by hooks; the model is not changed.

    Example::

        engine = SpectraEngine(model)                 # a plain causal LM (or a peft one)
        out = engine.compute(collate(pairs, pad_id))  # Spectra: (batch, layers, kinds) arrays
    """

    def __init__(self, model: nn.Module, kinds: Sequence[str] = ATTENTION_PROJECTIONS):
        self.model = model
        self.kinds = list(kinds)
        self.projections = attention_projections(model, self.kinds)
        self.layers = sorted({p.layer for p in self.projections})
        self._embeddings = model.get_input_embeddings()

    @contextlib.contextmanager
    def _hooks(self, store: dict[str, list], embedded: list[torch.Tensor]):
        def make_hook(name: str):
            def hook(module, inputs, output):
                entry = [inputs[0].detach(), None]
                store[name].append(entry)

                def keep_grad(grad):
                    entry[1] = grad.detach()

                output.register_hook(keep_grad)

            return hook

        def embed_hook(module, inputs, output):
            # The base weights are frozen: make the graph start at the embeddings so that the
            # gradient reaches every layer's output without any weight requiring grad.
            out = output.detach().requires_grad_(True)
            embedded.append(out)
            return out

        handles = [self._embeddings.register_forward_hook(embed_hook)]
        for p in self.projections:
            store[p.name] = []
            handles.append(p.module.register_forward_hook(make_hook(p.name)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def compute(self, batch: Batch) -> Spectra:
        """The spectra of every sample of a padded batch (dropout off meanwhile)."""
        device = next(self.model.parameters()).device
        batch = batch.to(device)
        was_training = self.model.training
        self.model.eval()
        store: dict[str, list] = {}
        embedded: list[torch.Tensor] = []
        try:
            with torch.enable_grad(), self._hooks(store, embedded):
                losses = per_sample_loss(self.model, batch)
                torch.autograd.grad(losses.sum(), embedded)
        finally:
            self.model.train(was_training)
        mask = batch.attention_mask.bool()[..., None]
        b = batch.input_ids.shape[0]
        nuc = np.zeros((b, len(self.layers), len(self.kinds)))
        erank = np.zeros_like(nuc)
        for p in self.projections:
            calls = store[p.name]
            if len(calls) != 1:
                raise RuntimeError(f"{p.name} ran {len(calls)} times in one forward")
            x, g = calls[0]
            if g is None:  # no loss reaches this layer (no response token): zero gradient
                g = torch.zeros(*x.shape[:-1], p.module.out_features, device=device)
            # Padding rows add nothing to G = D^T X; zero them so stray values cannot leak.
            s = factored_singular_values(torch.where(mask, g, 0), torch.where(mask, x, 0))
            li, ki = self.layers.index(p.layer), self.kinds.index(p.kind)
            nuc[:, li, ki] = nuclear_norm(s).cpu().numpy()
            erank[:, li, ki] = effective_rank(s).cpu().numpy()
        return Spectra(
            nuc, erank, list(self.layers), list(self.kinds), losses.detach().float().cpu().numpy(),
            batch.attention_mask.sum(-1).cpu().numpy(),
        )  # fmt: skip


def compute_spectra(
    engine: SpectraEngine,
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    micro_batch: int,
) -> Spectra:
    """Spectra of any number of (input_ids, labels) pairs, in their order, in length-sorted
    micro-batches (little compute on padding)."""
    from gs_ray.core.gradients import collate

    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    parts: list[tuple[list[int], Spectra]] = []
    for start in range(0, len(order), micro_batch):
        chunk = order[start : start + micro_batch]
        parts.append((chunk, engine.compute(collate([samples[i] for i in chunk], pad_id))))
    n = len(samples)
    shape = (n, len(engine.layers), len(engine.kinds))
    out = Spectra(np.zeros(shape), np.zeros(shape), list(engine.layers), list(engine.kinds),
                  np.zeros(n), np.zeros(n, dtype=np.int64))  # fmt: skip
    for chunk, s in parts:
        out.nuclear_norm[chunk] = s.nuclear_norm
        out.effective_rank[chunk] = s.effective_rank
        out.loss[chunk] = s.loss
        out.n_tokens[chunk] = s.n_tokens
    return out
