"""Layer-wise gradient spectra (arXiv 2504.10766): per sample and per attention projection of every
layer, the nuclear norm and the effective rank of the sample's gradient of the BASE weight.

A linear layer y = x W^T (W: out x in) gets, from one sample of T tokens, the gradient
G = sum_t delta_t x_t^T = D^T X, with D (T x out) the gradients at the layer's output and X (T x in)
its inputs (padding rows zero). G has rank at most T, and its nonzero squared singular values are
the eigenvalues of ``(X X^T)^(1/2) (D D^T) (X X^T)^(1/2)``, a T x T matrix built from the token
Gram matrices, so the out x in gradient need not be formed (``factored_singular_values`` forms it
only when it is the smaller matrix). Float64 throughout, whatever the model's dtype.

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

from gs_ray.core.gradients import Batch, input_and_output_grad_hook, per_sample_loss

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
    """Singular values of ``D^T X`` (batched: D (..., T, out), X (..., T, in)), float64, in
    ascending order; k = min(T, out, in) of them.

    The squared singular values are the eigenvalues of a k x k symmetric positive semi-definite
    matrix: ``G G^T`` or ``G^T G`` (G = D^T X formed: cheap when min(out, in) <= T), or else
    ``S^T (D D^T) S`` with ``S = U diag(sqrt(lambda))`` from the eigendecomposition
    ``X X^T = U diag(lambda) U^T`` (T x T Gram matrices; the out x in gradient is never formed).
    In float64 a squared singular value is exact to about 1e-16 s_max^2, so singular values are
    exact to 1e-4 down to about 1e-6 s_max, and smaller ones weigh next to nothing in the nuclear
    norm and the effective rank; squared values under k * eps * s_max^2 are set to 0. (An SVD
    after thin QR factorisations of D^T and X^T is the backward-stable route; it agreed to 1e-15
    and took up to 2x the CPU time, docs/selection.md.)
    """
    D, X = D.double(), X.double()
    T, out, inp = D.shape[-2], D.shape[-1], X.shape[-1]
    if min(out, inp) <= T:
        G = D.transpose(-1, -2) @ X
        C = G @ G.transpose(-1, -2) if out <= inp else G.transpose(-1, -2) @ G
    else:
        lam, U = torch.linalg.eigh(X @ X.transpose(-1, -2))
        S = U * lam.clamp_min(0).sqrt().unsqueeze(-2)
        C = S.transpose(-1, -2) @ (D @ D.transpose(-1, -2)) @ S
    lam = torch.linalg.eigvalsh(C)
    # Below k * eps * lambda_max an eigenvalue is rounding noise (zero padding, rank deficiency):
    # set it to 0 rather than let hundreds of such values add entropy to the effective rank.
    floor = lam[..., -1:] * lam.shape[-1] * torch.finfo(lam.dtype).eps
    return torch.where(lam > floor, lam, 0).sqrt()


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
        raise ValueError(
            f"the model has no Linear layers named {list(kinds)} inside numbered layers"
        )
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
        def embed_hook(module, inputs, output):
            # The base weights are frozen: make the graph start at the embeddings so that the
            # gradient reaches every layer's output without any weight requiring grad.
            out = output.detach().requires_grad_(True)
            embedded.append(out)
            return out

        handles = [self._embeddings.register_forward_hook(embed_hook)]
        for p in self.projections:
            store[p.name] = []
            handles.append(
                p.module.register_forward_hook(input_and_output_grad_hook(store[p.name]))
            )
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
            nuc,
            erank,
            list(self.layers),
            list(self.kinds),
            losses.detach().float().cpu().numpy(),
            batch.attention_mask.sum(-1).cpu().numpy(),
        )


def compute_spectra(
    engine: SpectraEngine,
    samples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    micro_batch: int,
    progress: str | None = None,
) -> Spectra:
    """Spectra of any number of (input_ids, labels) pairs, in their order, in length-sorted
    micro-batches (little compute on padding); ``progress``: the label of progress lines."""
    from gs_ray.core.gradients import collate
    from gs_ray.progress import Progress

    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    bar = Progress(progress, total=len(samples)) if progress else None
    parts: list[tuple[list[int], Spectra]] = []
    for start in range(0, len(order), micro_batch):
        chunk = order[start : start + micro_batch]
        parts.append((chunk, engine.compute(collate([samples[i] for i in chunk], pad_id))))
        if bar:
            bar.update(len(chunk))
    if bar:
        bar.close()
    n = len(samples)
    shape = (n, len(engine.layers), len(engine.kinds))
    out = Spectra(
        np.zeros(shape),
        np.zeros(shape),
        list(engine.layers),
        list(engine.kinds),
        np.zeros(n),
        np.zeros(n, dtype=np.int64),
    )
    for chunk, s in parts:
        out.nuclear_norm[chunk] = s.nuclear_norm
        out.effective_rank[chunk] = s.effective_rank
        out.loss[chunk] = s.loss
        out.n_tokens[chunk] = s.n_tokens
    return out


# =========================================================================== gs-ray spectra


@dataclass
class Subset:
    """One measured subset: its label, samples and spectra, and the seconds they took."""

    label: str
    samples: list
    spectra: Spectra
    seconds: float
    cpu_seconds: float

    @property
    def samples_per_s(self) -> float:
        return len(self.samples) / self.seconds if self.seconds > 0 else float("nan")


def final_answer(response: str) -> str:
    """The text after the last '####' (GSM8K's bare answer); the response itself without one."""
    return response.rsplit("####", 1)[-1].strip() if "####" in response else response


def load_subset(cfg, source: str, tokenizer, bare: bool = False) -> list:
    """The tokenised samples of one file read with ``cfg.data``'s format settings (at most
    ``spectra.max_samples``, the first ones); ``bare``: responses cut to ``final_answer``."""
    from dataclasses import replace

    from gs_ray.data.loading import DataReport, read_examples, tokenize
    from gs_ray.errors import DataError

    data = replace(cfg.data, source=source, mix=[])
    examples, report = read_examples(data, cfg.run.seed)
    examples = examples[: cfg.spectra.max_samples]
    if bare:
        for ex in examples:
            ex.response = final_answer(ex.response)
    report = DataReport(source=report.source)
    samples = [s for ex in examples if (s := tokenize(ex, tokenizer, data, report)) is not None]
    if not samples:
        raise DataError(f"{source}: no usable samples ({report.summary()})")
    return samples


def run_spectra(cfg, data: str, out: str, subset_b: str | None = None) -> dict:
    """``gs-ray spectra``: the spectra of every sample of ``data`` (and ``subset_b``) on
    ``cfg.model``; writes the table, the summary and the plots into ``out`` (``rundir.SpectraDir``)
    and returns the summary."""
    import time

    from gs_ray.core.models import load_base_model, load_tokenizer, resolve_device
    from gs_ray.rundir import SpectraDir
    from gs_ray.training.pretrain import base_model_for

    if cfg.gradients.torch_threads:  # on a busy machine, 1 thread can be 100x faster for LAPACK
        torch.set_num_threads(cfg.gradients.torch_threads)
    folder = SpectraDir(out)
    folder.path.mkdir(parents=True, exist_ok=True)
    # tiny-llama is saved into the output folder (materialize_base_model puts it in base_model/)
    base_path = base_model_for(cfg, folder.path)
    tokenizer = load_tokenizer(base_path)
    device = resolve_device(cfg.model.device)
    model = load_base_model(base_path, cfg.model, device)
    engine = SpectraEngine(model, cfg.spectra.modules)
    wanted = [(cfg.spectra.label_a, data, False)]
    if subset_b is not None:
        wanted.append((cfg.spectra.label_b, subset_b, cfg.spectra.b_response == "final_answer"))
    subsets = []
    for label, path, bare in wanted:
        samples = load_subset(cfg, path, tokenizer, bare)
        start, cpu = time.perf_counter(), time.process_time()
        spectra = compute_spectra(
            engine,
            [s.pair for s in samples],
            int(tokenizer.pad_token_id),
            cfg.spectra.batch_size,
            progress=f"spectra: {label}",
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - start, time.process_time() - cpu)
        subsets.append(Subset(label, samples, spectra, *elapsed))
    summary = summarise(subsets)
    summary.update(
        model=cfg.model.name,
        base_path=base_path,
        device=str(device),
        dtype=cfg.model.dtype,
        batch_size=cfg.spectra.batch_size,
    )
    write_outputs(folder, subsets, summary)
    return summary


def summarise(subsets: Sequence[Subset]) -> dict:
    """Per subset: counts, throughput and, per projection and layer, mean and std of both
    metrics; with two subsets, the B - A gaps of the layer means (the paper's comparison)."""
    out: dict = {"subsets": {}}
    for sub in subsets:
        s = sub.spectra
        entry = {
            "n": len(sub.samples),
            "seconds": sub.seconds,
            "samples_per_s": sub.samples_per_s,
            "cpu_seconds": sub.cpu_seconds,
            "mean_tokens": float(s.n_tokens.mean()),
            "layers": s.layers,
        }
        for metric in ("nuclear_norm", "effective_rank"):
            values = getattr(s, metric)
            entry[metric] = {
                kind: {
                    "mean": values[:, :, k].mean(0).tolist(),
                    "std": values[:, :, k].std(0).tolist(),
                }
                for k, kind in enumerate(s.kinds)
            }
        out["subsets"][sub.label] = entry
    if len(subsets) == 2:
        a, b = (out["subsets"][s.label] for s in subsets)
        out["gap_b_minus_a"] = {
            metric: {
                kind: (np.array(b[metric][kind]["mean"]) - a[metric][kind]["mean"]).tolist()
                for kind in subsets[0].spectra.kinds
            }
            for metric in ("nuclear_norm", "effective_rank")
        }
    return out


def write_outputs(folder, subsets: Sequence[Subset], summary: dict) -> None:
    """The per-sample table (JSONL and long CSV), the summary and the two figures."""
    import csv
    import io

    from gs_ray.io import atomic_write_text, write_json, write_jsonl

    rows, lines = [], io.StringIO()
    table = csv.writer(lines)
    table.writerow(
        ["id", "subset", "n_tokens", "loss", "layer", "module", "nuclear_norm", "effective_rank"]
    )
    for sub in subsets:
        s = sub.spectra
        for i, sample in enumerate(sub.samples):
            per_kind = {
                metric: {k: getattr(s, metric)[i, :, j].tolist() for j, k in enumerate(s.kinds)}
                for metric in ("nuclear_norm", "effective_rank")
            }
            rows.append(
                {
                    "id": sample.id,
                    "subset": sub.label,
                    "n_tokens": int(s.n_tokens[i]),
                    "loss": float(s.loss[i]),
                    "layers": s.layers,
                    **per_kind,
                }
            )
            for li, layer in enumerate(s.layers):
                for j, kind in enumerate(s.kinds):
                    table.writerow(
                        [
                            sample.id,
                            sub.label,
                            int(s.n_tokens[i]),
                            f"{s.loss[i]:.6g}",
                            layer,
                            kind,
                            f"{s.nuclear_norm[i, li, j]:.8g}",
                            f"{s.effective_rank[i, li, j]:.8g}",
                        ]
                    )
    write_jsonl(folder.jsonl, rows)
    atomic_write_text(folder.csv, lines.getvalue())
    write_json(folder.summary, summary)
    plot_layer_curves(subsets, folder.layer_curves)
    plot_distributions(subsets, folder.distributions)


_METRICS = (("nuclear_norm", "nuclear norm"), ("effective_rank", "effective rank"))


def plot_layer_curves(subsets: Sequence[Subset], path) -> None:
    """One panel per (metric, projection): the mean over samples per layer, one line per subset
    with a band of one standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    kinds = subsets[0].spectra.kinds
    fig, axes = plt.subplots(2, len(kinds), figsize=(3.2 * len(kinds), 5.6), squeeze=False)
    for r, (metric, title) in enumerate(_METRICS):
        for k, kind in enumerate(kinds):
            ax = axes[r][k]
            for sub in subsets:
                v = getattr(sub.spectra, metric)[:, :, k]
                mean, se = v.mean(0), v.std(0) / max(1, len(v)) ** 0.5
                ax.plot(sub.spectra.layers, mean, marker="o", ms=3, label=sub.label)
                ax.fill_between(sub.spectra.layers, mean - se, mean + se, alpha=0.2)
            ax.set_title(f"{kind}: {title}", fontsize=9)
            ax.set_xlabel("layer", fontsize=8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_distributions(subsets: Sequence[Subset], path) -> None:
    """Per metric, the histogram of each sample's value averaged over layers and projections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, (metric, title) in zip(axes, _METRICS):
        values = [getattr(sub.spectra, metric).mean(axis=(1, 2)) for sub in subsets]
        bins = np.histogram_bin_edges(np.concatenate(values), bins=30)
        for sub, v in zip(subsets, values):
            ax.hist(v, bins=bins, alpha=0.55, label=f"{sub.label} (n={len(v)})")
        ax.set_title(f"{title}, mean over layers and projections", fontsize=9)
        ax.tick_params(labelsize=7)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
