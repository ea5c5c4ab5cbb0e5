"""Instruction data: loading, templating, tokenising and splitting (``loading``), and the
built-in demo corpus (``demo``)."""

from gs_ray.data.loading import (
    DataError,
    DataReport,
    Sample,
    Splits,
    check_inputs,
    check_source,
    length_bucketed_batches,
    load_samples,
    make_splits,
    read_examples,
    rows_by_id,
    target_data_config,
    unique_ids,
)
from gs_ray.data.records import Example

__all__ = [
    "DataError",
    "DataReport",
    "Example",
    "Sample",
    "Splits",
    "check_inputs",
    "check_source",
    "length_bucketed_batches",
    "load_samples",
    "make_splits",
    "read_examples",
    "rows_by_id",
    "target_data_config",
    "unique_ids",
]
