"""A data mix (data.source: mix): several sources and formats, domain labels, seeded draws, and
errors that name the entry, the file, the line and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gs_ray.config import ConfigError, load_config
from gs_ray.data import DataError, read_examples

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def _mix(tmp_path: Path, entries: list[dict], **data) -> list:
    cfg = load_config(
        overrides=["--data.source", "mix", "--data.mix", json.dumps(entries)]
        + [x for k, v in data.items() for x in (f"--data.{k}", str(v))]
    )
    return cfg


@pytest.fixture
def sources(tmp_path):
    qa = _write(
        tmp_path,
        "qa.jsonl",
        "".join(
            json.dumps({"question": f"q{i}?", "answer": f"#### {i}"}) + "\n" for i in range(10)
        ),
    )
    alpaca = _write(
        tmp_path,
        "alp.json",
        json.dumps(
            [{"instruction": f"do {i}", "input": "", "output": f"done {i}"} for i in range(6)]
        ),
    )
    stories = _write(
        tmp_path,
        "s.txt",
        "Once there was a cat. It sat.\nThe end.\n<|endoftext|>\n"
        "A dog ran! Then it slept.\n<|endoftext|>\n",
    )
    lines = _write(
        tmp_path,
        "f.txt",
        "Profit rose @ 5 % .@positive\nSales fell .@negative\n",
        encoding="iso-8859-1",
    )
    return {
        "qa": {
            "domain": "math",
            "source": qa,
            "prompt": "{question}",
            "response": "{answer}",
            "max_samples": 4,
        },
        "alpaca": {"domain": "code", "source": alpaca, "format": "alpaca"},
        "stories": {
            "domain": "stories",
            "source": stories,
            "format": "text",
            "separator": "<|endoftext|>",
            "prompt": "Continue: {head}",
            "response": "{tail}",
        },
        "lines": {
            "domain": "finance",
            "source": lines,
            "format": "lines",
            "separator": "@",
            "columns": ["sentence", "label"],
            "encoding": "iso-8859-1",
            "prompt": "Sentiment? {sentence}",
            "response": "{label}",
        },
    }


def test_mix_reads_every_format_with_domains_and_prefixed_ids(tmp_path, sources):
    cfg = _mix(tmp_path, list(sources.values()))
    examples, report = read_examples(cfg.data, seed=0)
    by_domain = {}
    for ex in examples:
        by_domain.setdefault(ex.domain, []).append(ex)
    assert {d: len(v) for d, v in by_domain.items()} == {
        "math": 4,
        "code": 6,
        "stories": 2,
        "finance": 2,
    }
    assert all(ex.id.startswith(f"{ex.domain}-") for ex in examples)
    assert len({ex.id for ex in examples}) == len(examples)
    assert report.rows_read == 14 and report.used == 14
    assert "math:4/10" in report.source and "code:6/6" in report.source
    cat, dog = by_domain["stories"]
    assert (cat.prompt, cat.response) == ("Continue: Once there was a cat.", "It sat.\nThe end.")
    assert (dog.prompt, dog.response) == ("Continue: A dog ran!", "Then it slept.")
    assert cat.where.endswith("s.txt:1") and dog.where.endswith("s.txt:4")
    # The column separator also occurs inside the sentence: columns are split from the right.
    assert [(e.prompt, e.response) for e in by_domain["finance"]] == [
        ("Sentiment? Profit rose @ 5 % .", "positive"),
        ("Sentiment? Sales fell .", "negative"),
    ]
    assert by_domain["code"][0].prompt == "do 0" and by_domain["code"][0].response == "done 0"
    for ex in by_domain["math"]:
        n = ex.prompt.removeprefix("q").removesuffix("?")
        assert ex.response == f"#### {n}" and ex.where.endswith(f"qa.jsonl:{int(n) + 1}")


def test_draws_are_seeded_and_independent_of_other_sources(tmp_path, sources):
    def drawn(entries, seed):
        examples, _ = read_examples(_mix(tmp_path, entries).data, seed=seed)
        return [e.id for e in examples if e.domain == "math"]

    alone = drawn([sources["qa"]], 0)
    assert alone == drawn([sources["qa"]], 0)
    assert alone == drawn([sources["alpaca"], sources["qa"]], 0)  # another source: same draw
    assert len(alone) == 4 and alone != drawn([sources["qa"]], 1)


def test_bad_mix_config_names_the_key(tmp_path, sources):
    with pytest.raises(ConfigError, match="lists no source"):
        load_config(overrides=["--data.source", "mix"])
    with pytest.raises(ConfigError, match="set data.source: mix"):
        load_config(overrides=["--data.mix", json.dumps([sources["qa"]])])
    with pytest.raises(ConfigError, match=r"data.mix\[1\].domain: 'math' is used"):
        _mix(tmp_path, [sources["qa"], sources["qa"]])
    with pytest.raises(ConfigError, match=r"data.mix\[0\]: set both prompt and response"):
        _mix(tmp_path, [{**sources["qa"], "response": None}])
    with pytest.raises(ConfigError, match=r"data.mix\[0\]: format 'text' needs prompt"):
        _mix(tmp_path, [{"domain": "s", "source": "x.txt", "format": "text"}])
    with pytest.raises(ConfigError, match=r"data.mix\[0\].format: 'csv' is not one of"):
        _mix(tmp_path, [{**sources["qa"], "format": "csv"}])
    with pytest.raises(ConfigError, match=r"unknown config key 'data.mix\[0\].fields'"):
        _mix(tmp_path, [{**sources["qa"], "fields": 1}])
    with pytest.raises(ConfigError, match=r"data.mix\[0\].max_samples: 0 is out of range"):
        _mix(tmp_path, [{**sources["qa"], "max_samples": 0}])


def test_bad_mix_data_names_file_line_and_field(tmp_path, sources):
    has = r"\(the record has \['answer', 'question'\]\)"
    with pytest.raises(DataError, match=r"qa.jsonl:[0-9]+: missing field 'query' " + has):
        read_examples(_mix(tmp_path, [{**sources["qa"], "prompt": "{query}"}]).data)
    broken = _write(tmp_path, "g.txt", "fine@positive\nno separator here\n")
    with pytest.raises(DataError, match=r"g.txt:2: expected 2 columns \['sentence', 'label'\]"):
        read_examples(_mix(tmp_path, [{**sources["lines"], "source": broken}]).data)
    latin = {**sources["lines"], "encoding": "utf-8"}  # the file holds no é, but ...
    _write(tmp_path, "f.txt", "Caf\u00e9 sales rose .@positive\n", encoding="iso-8859-1")
    with pytest.raises(DataError, match=r"f.txt:1: not utf-8 text .* data.mix\[0\].encoding"):
        read_examples(_mix(tmp_path, [latin]).data)
    with pytest.raises(DataError, match=r"data.mix\[0\]: data file not found: .*nope.txt"):
        read_examples(_mix(tmp_path, [{**sources["stories"], "source": "nope.txt"}]).data)
    with pytest.raises(DataError, match="data file not found: .*nope.jsonl"):
        read_examples(_mix(tmp_path, [{**sources["qa"], "source": "nope.jsonl"}]).data)


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"the shared real data is not at {SHARED}")
def test_the_data_mix_example_reads_the_shared_data():
    """docs/examples/data-mix.yaml: every domain present, balanced, paths resolved from the
    repository root (as its comment says)."""
    import os

    root = Path(__file__).resolve().parents[1]
    cwd = os.getcwd()
    os.chdir(root)
    try:
        cfg = load_config(root / "docs" / "examples" / "data-mix.yaml")
        examples, report = read_examples(cfg.data, seed=cfg.run.seed)
    finally:
        os.chdir(cwd)
    counts = {}
    for ex in examples:
        counts[ex.domain] = counts.get(ex.domain, 0) + 1
    assert counts == {m.domain: m.max_samples for m in cfg.data.mix}
    assert report.used == len(examples) and not report.dropped
