"""Reading records: the raw rows of one source (a ``.jsonl`` / ``.json`` / ``.parquet`` file or a
Hugging Face dataset), its record format, and one ``Example`` per row. A malformed line, a
missing field or a wrong type is a ``DataError`` that names the file, the line (or row) and the
field. ``loading`` builds on this (templates, tokenising, splits), and so does ``mix`` (several
sources, each with its own format and domain)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gs_ray.config import DataConfig
from gs_ray.errors import DataError

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass
class Example:
    """One instruction sample before tokenisation; ``where`` is its file and line (or row)."""

    id: str
    prompt: str
    response: str
    domain: str | None = None
    where: str = ""


# --------------------------------------------------------------------------- reading rows


def read_rows(cfg: DataConfig, seed: int = 0) -> tuple[list[dict[str, Any]], str]:
    """Raw rows (dicts) and a description of the source; a source that cannot be read is a
    DataError naming the file (and line)."""
    src = cfg.source
    if src == "demo":
        from gs_ray.data.demo import build_demo_corpus

        return build_demo_corpus(n_samples=cfg.demo_size, seed=seed), f"demo(seed={seed})"
    path = Path(src).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise DataError(
            f"{path}: is a directory; data.source must be a {' / '.join(FILE_SUFFIXES)} file, "
            "'demo' or a Hugging Face dataset name"
        )
    if suffix in FILE_SUFFIXES and not path.exists():
        raise DataError(f"data file not found: {path}")
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, cfg.max_samples), str(path)
        if suffix == ".json":
            return _read_json(path, cfg.max_samples), str(path)
        if suffix == ".parquet":
            return _read_parquet(path, cfg.max_samples), str(path)
    except OSError as e:  # permissions, a file that vanished, an I/O error
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from e
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


def _read_parquet(path: Path, limit: int | None) -> list[dict[str, Any]]:
    import datasets

    try:
        ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    except Exception as e:  # pyarrow reports a corrupt file in several types
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    return _take(ds, limit)


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    """One line of a file as UTF-8 text; other bytes are an error naming the file and line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} "
            "of the line); save the file as UTF-8"
        ) from None
    return text.removeprefix("\ufeff") if lineno == 1 else text  # a byte-order mark


def _read_jsonl(path: Path, limit: int | None) -> list[dict[str, Any]]:
    rows = []
    with path.open("rb") as f:  # bytes: a decoding error then knows its line
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            line = _decode(raw, path, lineno)
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
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        data = json.loads(text)
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


def guess_format(row: dict[str, Any], cfg: DataConfig) -> str | None:
    """The format a record's fields point to, or None."""
    if cfg.messages_field in row:
        return "messages"
    if cfg.prompt_field in row and cfg.response_field in row:
        return "prompt_response"
    if cfg.instruction_field in row or cfg.output_field in row:
        return "alpaca"
    if cfg.prompt_field in row or cfg.response_field in row:
        return "prompt_response"
    return None


def detect_format(rows: list[dict[str, Any]], cfg: DataConfig, source: str) -> tuple[str, str]:
    """The source's record format and what decided it: ``data.format``, or (auto) the first
    record whose fields tell it."""
    if cfg.format != "auto":
        return cfg.format, "data.format"
    for i, row in enumerate(rows):
        fmt = guess_format(row, cfg)
        if fmt is not None:
            line = row.get("__line__")
            return fmt, f"line {line}" if line is not None else f"row {i}"
    fields = sorted(k for k in (rows[0] if rows else {}) if k != "__line__")
    raise DataError(
        f"{source}: cannot tell the record format from the fields {fields}: set data.format "
        "(alpaca | prompt_response | messages) and the data.*_field names"
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


def to_example(row: dict[str, Any], index: int, cfg: DataConfig, source: str, fmt: str) -> Example:
    """Map one raw row to an Example (prompt, response) in the source's format ``fmt``."""
    where = _where(row, index, source)
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
    rid = row.get("id")
    rid = f"{index:07d}" if rid is None or rid == "" else str(rid)
    domain = row.get(cfg.domain_field)
    return Example(rid, prompt, response, None if domain is None else str(domain), where)


def _from_messages(row: dict[str, Any], name: str, where: str) -> tuple[str, str]:
    turns = row.get(name)
    if name not in row:
        raise DataError(f"{where}: missing field '{name}'")
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
