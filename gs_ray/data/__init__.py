"""Instruction data: loading, templating, tokenising and splitting (``loading``), and the
built-in demo corpus (``demo``)."""

from gs_ray.data.loading import (
    DataError,
    DataReport,
    Example,
    Sample,
    Splits,
    length_bucketed_batches,
    load_samples,
    make_splits,
)

__all__ = [
    "DataError", "DataReport", "Example", "Sample", "Splits", "length_bucketed_batches",
    "load_samples", "make_splits",
]  # fmt: skip
