"""Loading instruction data, templating and tokenising it, and the deterministic splits.

Sources (``data.source``):

* ``demo`` - the built-in corpus (``gs_ray.data.demo``), generated from the run seed.
* a ``.jsonl`` / ``.json`` file - read with the standard library, line by line, so that a
  malformed line is reported with its file and line number;
* a ``.parquet`` file or a Hugging Face dataset name - read with ``datasets``.

Record formats (``data.format``; ``auto`` picks by the fields present):

* ``alpaca`` - instruction / input (optional) / output;
* ``prompt_response`` - prompt / response;
* ``messages`` - chat turns ``[{"role": ..., "content": ...}, ...]``; the last assistant turn is the
  response, the turns before it form the prompt.

Field names are configurable. The prompt is rendered with ``data.template`` and the loss covers
the response tokens only (prompt tokens get label -100).

Rules for bad input, all counted in ``DataReport`` (kept in the run manifest):
* a missing required field or a wrong type is an error naming the field and the row;
* a sample whose prompt or response is empty after stripping whitespace is dropped (``empty``);
* a sample longer than ``data.max_length`` tokens has its response truncated at the end
  (``truncated``; ``overflow: drop`` drops it instead), unless the prompt alone leaves fewer than
  ``MIN_RESPONSE_TOKENS`` response tokens, in which case it is dropped (``prompt_too_long``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gs_ray.config import DataConfig

log = logging.getLogger(__name__)

MIN_RESPONSE_TOKENS = 4


class DataError(ValueError):
    """Bad input data; the message names the file, line/row and field."""


@dataclass
class Example:
    """One instruction sample before tokenisation."""

    id: str
    prompt: str
    response: str
    domain: str | None = None


@dataclass
class Sample:
    """One tokenised sample: ids and labels (-100 on the prompt)."""

    id: str
    input_ids: list[int]
    labels: list[int]
    domain: str | None = None
    prompt: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def pair(self) -> tuple[list[int], list[int]]:
        return self.input_ids, self.labels


@dataclass
class DataReport:
    """Counts of rows read, used and dropped (by reason); nothing is silently lost."""

    source: str = ""
    rows_read: int = 0
    used: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        return (
            f"{self.source}: read {self.rows_read}, used {self.used}, "
            f"truncated {self.truncated}, dropped: {drops}"
        )


# --------------------------------------------------------------------------- reading rows


def read_rows(cfg: DataConfig, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Raw rows (dicts) and a description of the source."""
    src = cfg.source
    if src == "demo":
        from gs_ray.data.demo import build_demo_corpus

        return build_demo_corpus(n_samples=cfg.demo_size, seed=seed), f"demo(seed={seed})"
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".parquet") and not path.exists():
        raise DataError(f"data file not found: {path}")
    if suffix == ".jsonl":
        return _read_jsonl(path, cfg.max_samples), str(path)
    if suffix == ".json":
        return _read_json(path, cfg.max_samples), str(path)
    if suffix == ".parquet":
        import datasets

        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
        return _take(ds, cfg.max_samples), str(path)
    if path.exists():
        raise DataError(f"{path}: unsupported file type (use .jsonl, .json or .parquet)")
    import datasets

    try:
        ds = datasets.load_dataset(src, split=cfg.hf_split)
    except Exception as e:  # hub errors come in many types
        raise DataError(f"could not load Hugging Face dataset '{src}' ({cfg.hf_split}): {e}") from e
    return _take(ds, cfg.max_samples), f"hf:{src}[{cfg.hf_split}]"


def _take(ds, limit: int | None) -> list[dict[str, Any]]:
    n = len(ds) if limit is None else min(limit, len(ds))
    return [ds[i] for i in range(n)]


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: malformed JSON ({e.msg}, column {e.colno})"
                ) from e
            if not isinstance(row, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}"
                )
            row.setdefault("__line__", lineno)
            rows.append(row)
    return rows


def _read_json(path: Path, limit: int | None) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from e
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or {{'data': [...]}})")
    for i, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i}: expected an object, got {type(row).__name__}")
    return data[:limit] if limit is not None else data


# --------------------------------------------------------------------------- records -> examples


def detect_format(row: dict[str, Any], cfg: DataConfig) -> str:
    """The record format from the fields present (data.format = auto)."""
    if cfg.messages_field in row:
        return "messages"
    if cfg.prompt_field in row and cfg.response_field in row:
        return "prompt_response"
    if cfg.instruction_field in row or cfg.output_field in row:
        return "alpaca"
    raise DataError(
        f"cannot tell the record format from its fields {sorted(k for k in row if k != '__line__')}: "
        f"set data.format (alpaca | prompt_response | messages) and the data.*_field names"
    )


def _where(row: dict[str, Any], index: int, source: str) -> str:
    line = row.get("__line__")
    return f"{source}:{line}" if line is not None else f"{source}: row {index}"


def _field(row: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    if name not in row or row[name] is None:
        if required:
            raise DataError(f"{where}: missing field '{name}'")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{name}' must be a string, got {type(value).__name__}")
    return value


def to_example(row: dict[str, Any], index: int, cfg: DataConfig, source: str) -> Example:
    """Map one raw row to an Example (prompt, response) according to its format."""
    where = _where(row, index, source)
    fmt = cfg.format if cfg.format != "auto" else detect_format(row, cfg)
    if fmt == "alpaca":
        instruction = _field(row, cfg.instruction_field, where)
        extra = _field(row, cfg.input_field, where, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        response = _field(row, cfg.output_field, where)
    elif fmt == "prompt_response":
        prompt = _field(row, cfg.prompt_field, where)
        response = _field(row, cfg.response_field, where)
    elif fmt == "messages":
        prompt, response = _from_messages(row, cfg.messages_field, where)
    else:
        raise DataError(
            f"data.format: unknown format '{fmt}' (alpaca | prompt_response | messages)"
        )
    rid = row.get("id", f"{index:07d}")
    domain = row.get(cfg.domain_field)
    return Example(str(rid), prompt, response, None if domain is None else str(domain))


def _from_messages(row: dict[str, Any], name: str, where: str) -> tuple[str, str]:
    turns = row.get(name)
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{name}' must be a non-empty list of turns")
    for j, t in enumerate(turns):
        if not isinstance(t, dict) or "role" not in t or "content" not in t:
            raise DataError(f"{where}: {name}[{j}] needs 'role' and 'content'")
    last = max((j for j, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: field '{name}' has no assistant turn to learn")
    prompt = "\n".join(f"{t['role']}: {t['content']}" for t in turns[:last])
    return prompt, str(turns[last]["content"])


# --------------------------------------------------------------------------- tokenisation


def tokenize(ex: Example, tokenizer, cfg: DataConfig, report: DataReport) -> Sample | None:
    """Template + tokenise one example, applying the empty / over-long rules."""
    if not ex.prompt.strip() or not ex.response.strip():
        report.drop("empty")
        return None
    prompt_text = cfg.template.format(prompt=ex.prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    total = len(prompt_ids) + len(response_ids)
    if total > cfg.max_length:
        if cfg.overflow == "drop":
            report.drop("too_long")
            return None
        room = cfg.max_length - len(prompt_ids)
        if room < MIN_RESPONSE_TOKENS:
            report.drop("prompt_too_long")
            return None
        response_ids = response_ids[:room]
        report.truncated += 1
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return Sample(ex.id, ids, labels, ex.domain, ex.prompt)


def load_samples(cfg: DataConfig, tokenizer, seed: int = 0) -> tuple[list[Sample], DataReport]:
    """Read, map, template and tokenise the configured data; returns samples and counts."""
    if cfg.overflow not in ("truncate", "drop"):
        raise DataError(f"data.overflow: expected truncate | drop, got {cfg.overflow!r}")
    rows, source = read_rows(cfg, seed)
    report = DataReport(source=source, rows_read=len(rows))
    samples: list[Sample] = []
    seen: Counter[str] = Counter()
    for i, row in enumerate(rows):
        ex = to_example(row, i, cfg, source)
        seen[ex.id] += 1
        if seen[ex.id] > 1:  # ids must be unique: they key the assignments
            ex.id = f"{ex.id}#{seen[ex.id] - 1}"
        sample = tokenize(ex, tokenizer, cfg, report)
        if sample is not None:
            samples.append(sample)
    report.used = len(samples)
    log.info("data %s", report.summary())
    if not samples:
        raise DataError(f"{source}: no usable samples ({report.summary()})")
    return samples, report


# --------------------------------------------------------------------------- splits


@dataclass
class Splits:
    """Index arrays into the sample list. train = warmup + val + rest; test is held out."""

    test: np.ndarray
    train: np.ndarray
    warmup: np.ndarray
    val: np.ndarray
    rest: np.ndarray

    def counts(self) -> dict[str, int]:
        return {k: len(getattr(self, k)) for k in ("train", "test", "warmup", "val", "rest")}


def make_splits(n: int, cfg: DataConfig, seed: int) -> Splits:
    """Deterministic splits by seed: test (held out), then warm-up (5%), validation (n_val), rest."""
    if n < 4:
        raise DataError(f"need at least 4 samples to split, got {n}")
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(cfg.test_fraction * n))
    test, train = np.sort(perm[:n_test]), perm[n_test:]
    n_warm = max(1, int(round(cfg.warmup_fraction * len(train))))
    n_val = max(0, min(cfg.n_val, len(train) - n_warm))
    warmup = np.sort(train[:n_warm])
    val = np.sort(train[n_warm : n_warm + n_val])
    rest = np.sort(train[n_warm + n_val :])
    return Splits(test=test, train=np.sort(train), warmup=warmup, val=val, rest=rest)


def length_bucketed_batches(
    lengths: np.ndarray, indices: np.ndarray, batch_size: int, window: int, seed: int
) -> list[np.ndarray]:
    """Shuffle, then sort by length inside windows of ``window`` batches, then cut into batches.

    Padding waste stays low while the batch order stays random and depends only on the seed.
    """
    rng = np.random.default_rng(seed)
    order = indices[rng.permutation(len(indices))]
    span = max(1, window) * batch_size
    batches = []
    for start in range(0, len(order), span):
        chunk = order[start : start + span]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]
