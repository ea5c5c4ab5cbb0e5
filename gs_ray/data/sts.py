"""Sentence pairs with a human similarity score (the STS benchmark), for the paper's Fig. 4:
does input-embedding similarity predict gradient similarity?

The STS benchmark's files (``sts-{train,dev,test}.csv``) are tab-separated with no header:
genre, file, year, id, score (0-5), sentence 1, sentence 2 (some rows carry two more source
columns, ignored). They are read without quoting: the sentences contain quote marks.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gs_ray.errors import DataError

N_FIELDS = 7  # genre, file, year, id, score, s1, s2
SCORE_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class SentencePair:
    first: str
    second: str
    score: float  # human similarity, 0 (unrelated) to 5 (same meaning)
    line: int  # 1-based line in the file


def read_sts(path: str | Path) -> list[SentencePair]:
    """Every pair of an STS benchmark file; a bad line raises a ``DataError`` naming the file,
    the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such STS file (eval.sts)")
    pairs = []
    with path.open(encoding="utf-8", newline="") as f:
        for line, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if not row or not "".join(row).strip():
                continue
            if len(row) < N_FIELDS:
                raise DataError(
                    f"{path}:{line}: {len(row)} tab-separated fields, expected at "
                    f"least {N_FIELDS} (genre, file, year, id, score, s1, s2)"
                )
            try:
                score = float(row[4])
            except ValueError:
                raise DataError(
                    f"{path}:{line}: field 5 (score) is {row[4]!r}, not a number"
                ) from None
            if not SCORE_RANGE[0] <= score <= SCORE_RANGE[1]:
                raise DataError(f"{path}:{line}: field 5 (score) {score} is outside {SCORE_RANGE}")
            first, second = row[5].strip(), row[6].strip()
            if not first or not second:
                raise DataError(f"{path}:{line}: field {6 if not first else 7} (sentence) is empty")
            pairs.append(SentencePair(first, second, score, line))
    if not pairs:
        raise DataError(f"{path}: no sentence pairs")
    return pairs


def sample_pairs(pairs: list[SentencePair], n: int, seed: int) -> list[SentencePair]:
    """``n`` pairs drawn at random without replacement (all of them when there are fewer), in
    file order."""
    if n >= len(pairs):
        return list(pairs)
    keep = np.sort(np.random.default_rng(seed).choice(len(pairs), size=n, replace=False))
    return [pairs[i] for i in keep]
