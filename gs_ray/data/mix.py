"""A data mix: several sources, each in its own format, read into one list of examples.

``data.source: mix`` reads every entry of ``data.mix`` (a ``MixSource``): a JSONL / JSON / parquet
file or a Hugging Face dataset in one of the instruction formats, a plain-text file cut into
documents (``text``), or a file with one record per line split into columns (``lines``). Records
become (prompt, response) either through the format (field names as in ``data.*_field``) or
through the entry's ``prompt`` / ``response`` templates over the record's fields, e.g.
``prompt: "{question}"``, ``response: "{answer}"``. Every example is labelled with its entry's
``domain`` and gets the id ``<domain>-<id>``; ``max_samples`` draws that many records at random
(seeded by the run seed and the domain, so adding a source does not change another's draw).

Errors name the file, the line (or record) and the field, as for a single source.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from pathlib import Path
from typing import Any

from gs_ray.config import DataConfig, MixSource
from gs_ray.data.records import Example, detect_format, read_rows, to_example
from gs_ray.errors import DataError

TEXT_SUFFIXES = (".txt", ".csv", ".tsv")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+")


def source_path(entry: MixSource) -> Path:
    """The entry's source with ``~`` and environment variables expanded."""
    import os

    return Path(os.path.expandvars(os.path.expanduser(entry.source)))


def _read_text(path: Path, entry: MixSource, where: str) -> list[dict[str, Any]]:
    """Records of a text file: documents (``text``) or split lines (``lines``)."""
    if not path.is_file():
        raise DataError(f"{where}: data file not found: {path}")
    raw = path.read_bytes()
    try:
        text = raw.decode(entry.encoding).removeprefix("\ufeff")
    except LookupError:
        raise DataError(f"{where}.encoding: unknown encoding {entry.encoding!r}") from None
    except UnicodeDecodeError as e:
        lineno = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{lineno}: not {entry.encoding} text (byte 0x{raw[e.start]:02x}); set "
            f"{where}.encoding (e.g. iso-8859-1)"
        ) from None
    rows: list[dict[str, Any]] = []
    if entry.format == "text":
        offset = 0
        for doc in text.split(entry.separator):
            lineno = text.count("\n", 0, offset) + 1 + (len(doc) - len(doc.lstrip("\n")))
            offset += len(doc) + len(entry.separator)
            doc = doc.strip()
            if not doc:
                continue
            parts = _SENTENCE_END.split(doc, maxsplit=1)
            head, tail = (parts[0], parts[1]) if len(parts) == 2 else (doc, "")
            rows.append(
                {"text": doc, "head": head.strip(), "tail": tail.strip(), "__line__": lineno}
            )
        return rows
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        cells = line.rsplit(entry.separator, len(entry.columns) - 1)
        if len(cells) != len(entry.columns):
            raise DataError(
                f"{path}:{lineno}: expected {len(entry.columns)} columns {entry.columns} "
                f"separated by {entry.separator!r}, found {len(cells)}"
            )
        rows.append({**dict(zip(entry.columns, (c.strip() for c in cells))), "__line__": lineno})
    return rows


def _template_fields(template: str, where: str) -> list[str]:
    try:
        return [n for _, n, _, _ in string.Formatter().parse(template) if n]
    except ValueError as e:
        raise DataError(f"{where}: bad template {template!r}: {e}") from None


def _render(template: str, row: dict[str, Any], where: str) -> str:
    """A prompt or response template filled from the record's fields."""
    values = {}
    for name in _template_fields(template, where):
        if name not in row or row[name] is None:
            fields = sorted(k for k in row if k != "__line__")
            raise DataError(f"{where}: missing field '{name}' (the record has {fields})")
        values[name] = row[name] if isinstance(row[name], str) else str(row[name])
    return template.format(**values)


def read_mix(cfg: DataConfig, seed: int) -> tuple[list, str, int]:
    """Every mix entry's examples (each labelled with its domain, ids prefixed by it), a
    description of the mix (records taken / records in the source, per domain) and the number
    of records taken."""
    examples: list[Example] = []
    described, total = [], 0
    for i, entry in enumerate(cfg.mix):
        where = f"data.mix[{i}]"
        path = source_path(entry)
        if entry.format in ("text", "lines"):
            rows = _read_text(path, entry, where)
        else:
            sub = dataclasses.replace(
                cfg,
                source=str(path) if path.exists() else entry.source,
                mix=[],
                format="auto" if entry.prompt else entry.format,
                hf_split=entry.hf_split,
                max_samples=None,
            )
            rows, _ = read_rows(sub, seed)
        if not rows:
            raise DataError(f"{where} ({path}): no records")
        chosen = range(len(rows))
        if entry.max_samples is not None and entry.max_samples < len(rows):
            rng = random.Random(f"gs_ray-mix:{seed}:{entry.domain}")
            chosen = sorted(rng.sample(range(len(rows)), entry.max_samples))
        if entry.prompt is None:
            fmt, _ = detect_format(rows, sub, str(path))
        for j in chosen:
            row = rows[j]
            line = row.get("__line__")
            loc = f"{path}:{line}" if line is not None else f"{path}: record {j}"
            if entry.prompt is not None:
                ex = Example(
                    str(row.get("id", f"{j:07d}")),
                    _render(entry.prompt, row, loc),
                    _render(entry.response, row, loc),
                    where=loc,
                )
            else:
                ex = to_example(row, j, sub, str(path), fmt)
            ex.id = f"{entry.domain}-{ex.id}"
            ex.domain = entry.domain
            examples.append(ex)
        described.append(f"{entry.domain}:{len(chosen)}/{len(rows)}")
        total += len(chosen)
    return examples, f"mix({', '.join(described)})", total
