"""Small file writers and readers every module may use: atomic text, JSON and JSONL."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
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


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write via a temporary file and rename; ``mode``: the file's permissions from the moment
    it exists (0o600: never readable by others, not even briefly), None: the umask's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if mode is None:
        tmp.write_bytes(data)
    else:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # os.open's mode is masked by the umask
            f.write(data)
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


def publish_folder(
    target: Path, write: Callable[[Path], None], complete: Callable[[Path], bool]
) -> Path:
    """Publish a folder atomically: ``write`` fills a fresh temporary folder beside ``target``
    (same file system), its files are flushed to disk, then it is renamed to ``target``. A
    failure or a crash part-way leaves no folder under ``target``'s name (a failure removes
    its temporary folder). A ``target`` that is there but not ``complete`` (half-written by
    an older gs-ray, or by hand) is moved aside and replaced; one that another process
    published first is kept. Returns ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        _flush(tmp)
        if target.exists() and not complete(target):
            stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.stale-", dir=target.parent))
            with contextlib.suppress(FileNotFoundError):  # another process moved it first
                os.replace(target, stale / target.name)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process published first: keep its folder if complete
            if not complete(target):
                raise
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    return target


def _flush(folder: Path) -> None:
    """fsync every file and folder under ``folder`` (a rename is durable only after its data)."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync(Path(root))


def _fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
