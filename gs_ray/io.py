"""Small file writers and readers every module may use: atomic text, JSON and JSONL."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def jsonable(o: Any) -> Any:
    """``json.dumps`` default: numpy scalars and arrays become plain numbers and lists."""
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=jsonable) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Atomic JSONL write, one object a line."""
    atomic_write_text(path, "".join(json.dumps(r, default=jsonable) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines ignored)."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]
