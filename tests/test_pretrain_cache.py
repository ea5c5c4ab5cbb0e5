"""The cached pretrained tiny base model is published atomically (issue 24, low item): a write
that fails part-way leaves nothing under the cache's name (and no litter), a leftover of a
crashed writer never blocks the next one, and a half-written folder already under that name
is replaced, never returned. No pretraining here: the model, the tokenizer and the training
are stand-ins that write a few files."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from gs_ray.config import load_config
from gs_ray.io import publish_folder
from gs_ray.training import pretrain

TEXTS = ["a b c", "d e f"]


class _Files:
    """A stand-in for a model or a tokenizer: save_pretrained writes its files."""

    pad_token_id, eos_token_id = 0, 1

    def __init__(self, files: dict[str, str]):
        self.files = files

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [2, 3, 4]}

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name, text in self.files.items():
            (Path(folder) / name).write_text(text)


def _train(cfg, init, output, pairs, seed, pad_id, on_ray):
    _Files({"config.json": "{}", "model.safetensors": "weights" * 100}).save_pretrained(output)
    return [2.0, 1.0], "stand-in"


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.setattr(
        pretrain,
        "build_tiny_llama",
        lambda *a: (_Files({"config.json": "{}"}), _Files({"tokenizer.json": "{}"})),
    )
    monkeypatch.setattr(pretrain, "pretraining_corpus", lambda cfg, seed: TEXTS)
    monkeypatch.setattr(pretrain, "_train", _train)
    return load_config(None, ["--model.cache_dir", str(tmp_path / "cache")])


def _target(cfg) -> Path:
    key = pretrain.cache_key(cfg, 0, TEXTS, on_ray=False)
    return Path(cfg.model.cache_dir) / "models" / f"tiny-llama-pretrained-{key}"


def test_a_write_that_fails_part_way_leaves_no_cache_folder(cfg, monkeypatch):
    target = _target(cfg)
    real_copytree = shutil.copytree

    def disk_full(src, dst, **kw):  # the weights half copied, then the disk is full
        Path(dst).mkdir(parents=True, exist_ok=True)
        (Path(dst) / "config.json").write_text("{}")
        (Path(dst) / "model.safetensors").write_text("wei")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pretrain.shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        pretrain.pretrained_tiny(cfg, 0, on_ray=False)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no temporary folder left behind either
    monkeypatch.setattr(pretrain.shutil, "copytree", real_copytree)
    assert pretrain.pretrained_tiny(cfg, 0, on_ray=False) == target
    record = json.loads((target / pretrain.PRETRAIN_STAMP).read_text())
    assert record["engine"] == "stand-in"
    assert (target / "model.safetensors").read_text() == "weights" * 100
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_leftovers_of_a_crashed_writer_never_block_or_load(cfg):
    target = _target(cfg)
    target.parent.mkdir(parents=True)
    # A writer killed part-way (older gs-ray: a folder named after its pid; a pid comes back
    # after a container restart) ...
    stale_tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    stale_tmp.mkdir()
    (stale_tmp / "config.json").write_text("{}")
    # ... and one that wrote straight under the cache's name: config, half the weights, no
    # record. It is not complete, so it is trained again and replaced.
    target.mkdir()
    (target / "config.json").write_text("{}")
    (target / "model.safetensors").write_text("wei")
    assert pretrain.pretrained_tiny(cfg, 0, on_ray=False) == target
    assert (target / pretrain.PRETRAIN_STAMP).is_file()
    assert (target / "model.safetensors").read_text() == "weights" * 100
    hidden = [p.name for p in target.parent.iterdir() if p.name.startswith(".")]
    assert hidden == []  # the half-written folder went, nothing of this writer is left


def test_publish_folder_keeps_a_complete_folder_another_process_published(tmp_path):
    target = tmp_path / "m"

    def write(text):
        return lambda folder: (Path(folder) / "done").write_text(text)

    def complete(folder):
        return (Path(folder) / "done").exists()

    publish_folder(target, write("first"), complete)
    publish_folder(target, write("second"), complete)  # lost the race: kept
    assert (target / "done").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_the_run_directorys_base_model_copy_is_published_whole(tmp_path, monkeypatch):
    """materialize_base_model copies the pretrained folder into RUN/base_model: a copy that
    fails part-way leaves nothing there, and a half-written copy (no stamp) is replaced."""
    from gs_ray.core import models

    source = tmp_path / "pretrained"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "model.safetensors").write_text("weights")
    cfg = load_config(None, []).model
    run_dir = tmp_path / "run"
    target = models.tiny_base_dir(run_dir)
    real_copytree = shutil.copytree

    def disk_full(src, dst, **kw):
        (Path(dst) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.shutil, "copytree", disk_full)
    with pytest.raises(OSError, match="No space left"):
        models.materialize_base_model(cfg, run_dir, 0, source=source)
    assert not target.exists() and list(run_dir.iterdir()) == []
    monkeypatch.setattr(models.shutil, "copytree", real_copytree)
    target.mkdir()
    (target / "config.json").write_text("{}")  # an older gs-ray's crash: config, no weights
    assert models.materialize_base_model(cfg, run_dir, 0, source=source) == str(target)
    assert (target / "model.safetensors").read_text() == "weights"
    assert (target / "gs_ray_tiny.json").is_file()
    assert [p.name for p in run_dir.iterdir()] == ["base_model"]
