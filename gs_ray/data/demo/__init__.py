"""The built-in demo corpus: generators (``corpus``) and their word tables (``words``)."""

from gs_ray.data.demo.corpus import (
    BASE_DOMAINS,
    CROSS_DOMAINS,
    DOMAINS,
    build_demo_corpus,
    pretraining_texts,
)

__all__ = [
    "BASE_DOMAINS",
    "CROSS_DOMAINS",
    "DOMAINS",
    "build_demo_corpus",
    "pretraining_texts",
]
