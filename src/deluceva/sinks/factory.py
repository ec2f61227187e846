"""open_sink / read_results: pick the results format by file suffix."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from deluceva.errors import DelucevaError, OutputError
from deluceva.sinks.base import ResultSink
from deluceva.sinks.jsonl import JsonlSink, read_jsonl
from deluceva.sinks.parquet import ParquetSink, read_parquet

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def open_sink(path: str | os.PathLike[str], **options: int) -> ResultSink:
    """A results sink for `path` by suffix: .jsonl/.ndjson -> JsonlSink, .parquet -> ParquetSink(**options).

    Raises OutputError now (before any processing) for an unknown suffix, a missing or unwritable
    directory, or a path that is a directory.
    """
    suffix = Path(path).suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return JsonlSink(path)
    if suffix in PARQUET_SUFFIXES:
        return ParquetSink(path, **options)
    what = suffix or "(no suffix)"
    raise OutputError(f"unknown results format {what!r} for {path}: use .jsonl or .parquet")


def read_results(path: str | os.PathLike[str]) -> list[dict]:
    """All records of a .jsonl or .parquet results file, in order, as dicts."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in JSONL_SUFFIXES + PARQUET_SUFFIXES:
        raise DelucevaError(f"unknown results format {suffix!r} for {path}: use .jsonl or .parquet")
    if not p.is_file():
        raise DelucevaError(f"results file not found: {path}")
    try:
        return read_jsonl(p) if suffix in JSONL_SUFFIXES else read_parquet(p)
    except (ValueError, OSError, pa.ArrowException) as e:
        raise DelucevaError(f"cannot read results {path}: {e}") from None
