"""Loading instruction data, templating and tokenising it, and the deterministic splits.

Sources (``data.source``):

* ``demo`` - the built-in corpus (``gs_ray.data.demo``), generated from the run seed.
* a ``.jsonl`` / ``.json`` file - read with the standard library, line by line, so that a
  malformed line (bad JSON, bytes that are not UTF-8) is reported with its file and line number;
* a ``.parquet`` file or a Hugging Face dataset name - read with ``datasets``;
* ``mix`` - several sources, each with its own format and domain label (``data.mix``; see
  ``gs_ray.data.mix``).

Record formats (``data.format``): one source holds one format. ``auto`` takes the format of the
first record whose fields tell it, and every record is then read in that format, so a record that
lacks a field is reported as such ("line 7: missing field 'response'"):

* ``alpaca`` - instruction / input (optional) / output;
* ``prompt_response`` - prompt / response;
* ``messages`` - chat turns ``[{"role": ..., "content": ...}, ...]``; the last assistant turn is the
  response, the turns before it form the prompt.

Field names are configurable. The prompt is rendered with ``data.template`` and the loss covers
the response tokens only (prompt tokens get label -100).

Rules for bad input, all counted in ``DataReport`` (kept in the run manifest):

* a file that cannot be read, a malformed line, a missing required field or a wrong type is a
  ``DataError`` naming the file, the line (or row) and the field;
* a sample whose prompt or response is empty after stripping whitespace is skipped and counted
  (``dropped["empty"]``, with the first few lines in ``examples``): an empty answer teaches
  nothing, and one stray row should not stop a run over a large file;
* ids (a record's ``id``, else its row number) must be unique: a repeated id becomes
  ``<id>#<n>`` with the smallest n that no record uses, and each renaming is counted
  (``renamed_ids``, with examples);
* a sample longer than ``data.max_length`` tokens has its response truncated at the end
  (``truncated``; ``overflow: drop`` drops it instead), unless the prompt alone leaves fewer than
  ``MIN_RESPONSE_TOKENS`` response tokens, in which case it is dropped (``prompt_too_long``).

``check_source`` applies every rule that needs no tokenizer, so that a run can refuse bad data
before it starts Ray or creates its run directory.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from gs_ray.config import Config, DataConfig, validate
from gs_ray.data.mix import read_mix
from gs_ray.data.records import Example, detect_format, guess_format, read_rows, to_example
from gs_ray.errors import DataError

__all__ = [
    "DataError",
    "DataReport",
    "Sample",
    "Splits",
    "check_inputs",
    "check_source",
    "length_bucketed_batches",
    "load_samples",
    "make_splits",
    "read_examples",
]

log = logging.getLogger(__name__)

MIN_RESPONSE_TOKENS = 4
MIN_SAMPLES = 4  # make_splits needs a test, a warm-up and a validation sample at least
MAX_EXAMPLES = 5  # locations kept per kind of drop or renaming


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
    """Counts of rows read, used, dropped (by reason) and renamed; nothing is silently lost."""

    source: str = ""
    format: str = ""
    rows_read: int = 0
    used: int = 0
    truncated: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    renamed_ids: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, where: str = "") -> None:
        """Count a dropped sample (and remember where, for the first few)."""
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        if where:
            self.note(reason, where)

    def note(self, kind: str, text: str) -> None:
        """Keep one of the first MAX_EXAMPLES examples of a kind of drop or renaming."""
        kept = self.examples.setdefault(kind, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        drops = ", ".join(f"{k}={v}" for k, v in sorted(self.dropped.items())) or "none"
        text = (
            f"{self.source}: read {self.rows_read}, used {self.used}, "
            f"truncated {self.truncated}, dropped: {drops}"
        )
        if self.renamed_ids:
            text += f", renamed {self.renamed_ids} duplicate ids"
        return text


def unique_ids(examples: list[Example], report: DataReport) -> None:
    """Make every id unique, in place: a repeated id becomes ``<id>#<n>`` with the smallest n
    that neither an original id nor an earlier renaming uses (so a renaming can never clash with
    a record further down); each renaming is counted in ``report``."""
    taken = {ex.id for ex in examples}
    seen: set[str] = set()
    for ex in examples:
        if ex.id in seen:
            n = 1
            while f"{ex.id}#{n}" in taken:
                n += 1
            new = f"{ex.id}#{n}"
            report.renamed_ids += 1
            report.note("renamed_id", f"{ex.where}: {ex.id} -> {new}")
            ex.id = new
            taken.add(new)
        seen.add(ex.id)


def _read_single(cfg: DataConfig, seed: int) -> tuple[list[Example], DataReport]:
    """The examples of one source in one format (``data.source`` other than 'mix')."""
    rows, source = read_rows(cfg, seed)
    report = DataReport(source=source, rows_read=len(rows))
    if not rows:
        raise DataError(f"{source}: no records")
    fmt, decided = detect_format(rows, cfg, source)
    report.format = fmt
    examples = []
    for i, row in enumerate(rows):
        try:
            examples.append(to_example(row, i, cfg, source, fmt))
        except DataError as e:
            own = guess_format(row, cfg)
            if own is None or own == fmt:
                raise
            raise DataError(
                f"{e} (this record looks like {own}, but the source's format is {fmt}, "
                f"decided by {decided}; one source holds one format)"
            ) from None
    return examples, report


def read_examples(cfg: DataConfig, seed: int = 0) -> tuple[list[Example], DataReport]:
    """Read the source and map every record in the source's format; skip (and count) empty
    samples; make the ids unique. Raises DataError naming file, line and field."""
    if cfg.source == "mix":
        examples, source, n_read = read_mix(cfg, seed)
        report = DataReport(source=source, rows_read=n_read, format="mix")
    else:
        examples, report = _read_single(cfg, seed)
        source = report.source
    unique_ids(examples, report)
    if report.renamed_ids:
        log.warning(
            "%s: renamed %d duplicate ids, e.g. %s",
            source,
            report.renamed_ids,
            "; ".join(report.examples["renamed_id"]),
        )
    kept = []
    for ex in examples:
        if ex.prompt.strip() and ex.response.strip():
            kept.append(ex)
        else:
            report.drop("empty", ex.where)
    if report.dropped.get("empty"):
        log.warning(
            "%s: skipped %d samples with an empty prompt or response, e.g. %s",
            source,
            report.dropped["empty"],
            ", ".join(report.examples["empty"]),
        )
    report.used = len(kept)
    return kept, report


def rows_by_id(cfg: DataConfig, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Each source record as read, keyed by the id its sample gets (``gs-ray select`` writes the
    chosen records back in the input's own format). A mix has no single input format: its
    records are given as ``{id, prompt, response, domain}``."""
    if cfg.source == "mix":
        examples, _ = read_examples(cfg, seed)
        return {
            ex.id: {"id": ex.id, "prompt": ex.prompt, "response": ex.response, "domain": ex.domain}
            for ex in examples
        }
    rows, source = read_rows(cfg, seed)
    fmt, _ = detect_format(rows, cfg, source)
    examples = [to_example(row, i, cfg, source, fmt) for i, row in enumerate(rows)]
    unique_ids(examples, DataReport(source=source, rows_read=len(rows)))  # as read_examples does
    return {ex.id: row for ex, row in zip(examples, rows)}


def check_source(cfg: DataConfig, seed: int = 0) -> DataReport:
    """Read and check every record of the configured source without a tokenizer (run this
    before starting Ray or creating a run directory). Returns the counts; raises DataError,
    naming the file, line and field, for anything that would stop the run later."""
    _, report = read_examples(cfg, seed)
    if report.used < MIN_SAMPLES:
        raise DataError(
            f"{report.source}: {report.used} usable samples, at least {MIN_SAMPLES} needed "
            f"({report.summary()})"
        )
    return report


def check_inputs(cfg: Config) -> DataReport:
    """Everything a run can check before it starts Ray or creates a directory: every config
    value (as loading does, for a Config built in Python) and every data record. Raises
    ConfigError or DataError; returns the data counts."""
    validate(cfg)
    report = check_source(cfg.data, cfg.run.seed)
    if cfg.stage2.consumers:  # the selectors riding Stage II read a target set
        read_examples(target_data_config(cfg), cfg.run.seed)
    return report


def target_data_config(cfg: Config) -> DataConfig:
    """The data settings that read ``selection.target``: the pool's, with the target as the
    source and no sample cap."""
    return replace(cfg.data, source=cfg.selection.target, max_samples=None)


# --------------------------------------------------------------------------- tokenisation


def tokenize(ex: Example, tokenizer, cfg: DataConfig, report: DataReport) -> Sample | None:
    """Template + tokenise one example, applying the empty / over-long rules."""
    if not ex.prompt.strip() or not ex.response.strip():
        report.drop("empty", ex.where)
        return None
    prompt_text = cfg.template.format(prompt=ex.prompt)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(ex.response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    total = len(prompt_ids) + len(response_ids)
    if total > cfg.max_length:
        if cfg.overflow == "drop":
            report.drop("too_long", ex.where)
            return None
        room = cfg.max_length - len(prompt_ids)
        if room < MIN_RESPONSE_TOKENS:
            report.drop("prompt_too_long", ex.where)
            return None
        response_ids = response_ids[:room]
        report.truncated += 1
    ids = prompt_ids + response_ids
    labels = [-100] * len(prompt_ids) + response_ids
    return Sample(ex.id, ids, labels, ex.domain, ex.prompt)


def load_samples(cfg: DataConfig, tokenizer, seed: int = 0) -> tuple[list[Sample], DataReport]:
    """Read, map, template and tokenise the configured data; returns samples and counts."""
    examples, report = read_examples(cfg, seed)
    samples: list[Sample] = []
    for ex in examples:
        sample = tokenize(ex, tokenizer, cfg, report)
        if sample is not None:
            samples.append(sample)
    report.used = len(samples)
    log.info("data %s", report.summary())
    if not samples:
        raise DataError(f"{report.source}: no usable samples ({report.summary()})")
    return samples, report


# --------------------------------------------------------------------------- splits


def prompt_pair(pair: tuple[list[int], list[int]]) -> tuple[list[int], list[int]]:
    """The prompt alone as a language-modelling sample (what a query has at inference)."""
    ids, labels = pair
    n = next((i for i, lab in enumerate(labels) if lab != -100), len(ids))
    return list(ids[:n]), list(ids[:n])


def n_response_tokens(pair: tuple[list[int], list[int]]) -> int:
    """How many tokens of a sample its loss is taken on (labels other than -100)."""
    return sum(1 for lab in pair[1] if lab != -100)


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
    """Deterministic splits by seed: test (held out), then warm-up (5%), validation (n_val),
    rest."""
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
