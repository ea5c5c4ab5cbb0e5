"""The embedded default's base model is pretrained once, on text no instruction sample is in,
and cached: it learns (held-out response loss far below chance), and later runs reuse it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from gs_ray.config import load_config
from gs_ray.training import pretrain

TINY = [
    "--model.tiny_hidden_size",
    "32",
    "--model.tiny_num_layers",
    "1",
    "--model.tiny_num_heads",
    "2",
    "--model.tiny_pretrain_records",
    "600",
    "--model.tiny_pretrain_steps",
    "60",
    "--model.tiny_pretrain_batch_size",
    "8",
    "--model.tiny_pretrain_max_length",
    "96",
    "--data.demo_size",
    "300",
]


def _cfg(tmp_path, *more):
    return load_config(overrides=[*TINY, "--model.cache_dir", str(tmp_path / "cache"), *more])


def test_pretraining_texts_never_hold_an_instruction_sample():
    from gs_ray.data.demo import build_demo_corpus, pretraining_texts

    corpus = build_demo_corpus(600, seed=0)
    texts = pretraining_texts(1000, 0, corpus)
    assert 700 < len(texts) <= 1000
    for r in corpus:
        # neither the response nor the prompt of any instruction sample appears in any text
        assert not any(r["output"] in t for t in texts)
    assert texts == pretraining_texts(1000, 0, corpus)  # deterministic
    assert texts != pretraining_texts(1000, 1, corpus)
    # the same texts for every demo size up to PRETRAIN_EXCLUDE_SIZE: one pretrained base model
    assert texts == pretraining_texts(1000, 0, build_demo_corpus(40, seed=0))
    assert texts == pretraining_texts(1000, 0, [])
    # an instruction corpus beyond that size is left out as well
    from gs_ray.data.demo.corpus import PRETRAIN_SEED_OFFSET

    drawn = build_demo_corpus(1000, PRETRAIN_SEED_OFFSET)  # seed 0's pretraining draws
    kept = next(r for r in drawn if r["output"] in texts[0] and r["instruction"] in texts[0])
    without = pretraining_texts(1000, 0, [{**kept, "instruction": "another prompt"}])
    assert texts[0] not in without and len(without) == len(texts) - 1


def _heldout_loss(folder, cfg) -> float:
    """Mean response loss on the run's own instruction samples (templated, response only)."""
    from gs_ray.core.gradients import collate, per_sample_loss
    from gs_ray.core.models import load_base_model, load_tokenizer
    from gs_ray.data import load_samples

    tok = load_tokenizer(str(folder))
    model = load_base_model(str(folder), cfg.model, torch.device("cpu")).eval()
    samples, _ = load_samples(cfg.data, tok, 0)
    with torch.no_grad():
        return float(
            per_sample_loss(model, collate([s.pair for s in samples[:64]], tok.pad_token_id)).mean()
        )


def test_local_pretraining_learns_and_is_cached(tmp_path, monkeypatch):
    from gs_ray.core.models import build_tiny_llama

    cfg = _cfg(tmp_path)
    folder = pretrain.pretrained_tiny(cfg, seed=0, on_ray=False)
    record = __import__("json").loads((folder / pretrain.PRETRAIN_STAMP).read_text())
    assert record["steps"] == 60 and record["engine"].startswith("this process")
    assert record["last_loss"] < record["first_loss"] - 2

    random_init = tmp_path / "random"
    model, tok = build_tiny_llama(cfg.model, 0)
    model.save_pretrained(random_init)
    tok.save_pretrained(random_init)
    chance = math.log(cfg.model.tiny_vocab_size)
    assert _heldout_loss(random_init, cfg) > chance - 0.5
    assert _heldout_loss(folder, cfg) < _heldout_loss(random_init, cfg) - 1.5  # 8.32 -> 6.32

    # The same settings again: the cached folder, no training, not even a model built.
    monkeypatch.setattr(pretrain, "_train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(pretrain, "build_tiny_llama", lambda *a, **k: pytest.fail("built"))
    assert pretrain.pretrained_tiny(cfg, seed=0, on_ray=False) == folder
    # Any tiny_* setting, the seed or the texts change the key.
    assert pretrain.cache_key(
        _cfg(tmp_path, "--model.tiny_pretrain_lr", "0.01"), 0, ["a"]
    ) != pretrain.cache_key(cfg, 0, ["a"])
    assert pretrain.cache_key(cfg, 1, ["a"]) != pretrain.cache_key(cfg, 0, ["a"])
    assert pretrain.cache_key(cfg, 0, ["a", "b"]) != pretrain.cache_key(cfg, 0, ["a b"])
    # So does the engine (this process's loop and Ray Train's DeepSpeed differ in their weights).
    assert pretrain.cache_key(cfg, 0, ["a"], on_ray=False) != pretrain.cache_key(cfg, 0, ["a"])
    assert folder.name.endswith(
        pretrain.cache_key(cfg, 0, pretrain.pretraining_corpus(cfg, 0), False)
    )


def test_prepare_copies_the_pretrained_model_into_the_run(tmp_path):
    from gs_ray.core.models import load_base_model
    from gs_ray.prepare import prepare
    from gs_ray.training.pretrain import base_model_for

    cfg = _cfg(tmp_path, "--run.output_dir", str(tmp_path / "runs"))
    p = prepare(cfg, base_model=base_model_for)
    cached = pretrain.pretrained_tiny(cfg, seed=0)
    a = load_base_model(p.base_path, cfg.model, torch.device("cpu")).state_dict()
    b = load_base_model(str(cached), cfg.model, torch.device("cpu")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)
    # Random weights where asked for (tiny_pretrain_steps 0): a different model.
    q = prepare(
        _cfg(
            tmp_path, "--run.output_dir", str(tmp_path / "runs"), "--model.tiny_pretrain_steps", "0"
        ),
        base_model=base_model_for,
    )
    c = load_base_model(q.base_path, cfg.model, torch.device("cpu")).state_dict()
    assert not all(torch.equal(c[k], b[k]) for k in b)


@pytest.mark.ray
def test_pretraining_runs_on_ray_train_with_deepspeed(ray_session, tmp_path):
    from gs_ray.core.models import load_base_model

    cfg = _cfg(tmp_path, "--model.tiny_pretrain_steps", "20")
    folder = pretrain.pretrained_tiny(cfg, seed=0, on_ray=True)
    record = __import__("json").loads((folder / pretrain.PRETRAIN_STAMP).read_text())
    assert record["engine"] == "Ray Train (DeepSpeedEngine)" and record["steps"] == 20
    assert record["last_loss"] < record["first_loss"] - 1
    model = load_base_model(str(folder), cfg.model, torch.device("cpu"))
    assert np.isfinite([p.sum().item() for p in model.parameters()]).all()
