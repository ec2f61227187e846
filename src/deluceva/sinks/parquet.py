"""Parquet results (pyarrow): one row per processed frame, detections as a nested list<struct> column.

Readable by DuckDB, e.g. `SELECT frame, unnest(detections, recursive := true) FROM 'results.parquet'`.
Rows are buffered and written as one row group every `row_group_size` records, so memory stays bounded on
long streams. The schema is fixed by the first row group: the DESIGN.md fields get the types below, any
other field's type is inferred from its first values (all-null: float64). Later records may omit fields
(null) but must not add new ones.
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

from deluceva.errors import OutputError
from deluceva.sinks.base import ResultSink

DETECTION = pa.struct(
    [
        ("label", pa.string()),
        ("class_id", pa.int64()),
        ("score", pa.float64()),
        ("box", pa.list_(pa.float64())),
    ]
)
KNOWN_FIELDS: dict[str, pa.DataType] = {
    "frame": pa.int64(),
    "pts": pa.float64(),
    "mode": pa.string(),
    "filter_pct": pa.float64(),
    "ms": pa.float64(),
    "detections": pa.list_(DETECTION),
}


def infer_schema(rows: list[dict]) -> pa.Schema:
    """Schema for `rows`: fields in first-seen order, known fields typed as above, others inferred."""
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    if not names:
        names = dict.fromkeys(KNOWN_FIELDS)
    fields = []
    for name in names:
        if name in KNOWN_FIELDS:
            typ = KNOWN_FIELDS[name]
        else:
            typ = pa.array([r.get(name) for r in rows]).type
            typ = pa.float64() if pa.types.is_null(typ) else typ
        fields.append(pa.field(name, typ))
    return pa.schema(fields)


class ParquetSink(ResultSink):
    """`.parquet`: records buffered and written as row groups of `row_group_size` (zstd-compressed)."""

    def __init__(self, path: str | os.PathLike[str], row_group_size: int = 256) -> None:
        super().__init__(path)
        self.row_group_size = max(1, int(row_group_size))
        self._rows: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self.schema: pa.Schema | None = None

    def write(self, record: dict) -> None:
        self._rows.append(record)
        self.count += 1
        if len(self._rows) >= self.row_group_size:
            self._flush()

    def _flush(self) -> None:
        if self._writer is None:
            self.schema = infer_schema(self._rows)
            self._writer = pq.ParquetWriter(str(self._atomic.temp), self.schema, compression="zstd")
        assert self.schema is not None
        extra = {k for r in self._rows for k in r} - set(self.schema.names)
        if extra:
            raise OutputError(f"{self.path}: records gained fields {sorted(extra)} after the first row group")
        try:
            table = pa.Table.from_pylist(self._rows, schema=self.schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise OutputError(f"{self.path}: a record does not fit the schema {self.schema}: {e}") from None
        self._writer.write_table(table)
        self._rows = []

    def _finish(self) -> None:
        if self._rows or self._writer is None:
            self._flush()
        assert self._writer is not None
        self._writer.close()

    def _discard(self) -> None:
        self._rows = []
        if self._writer is not None:
            self._writer.close()


def read_parquet(path: str | os.PathLike[str]) -> list[dict]:
    return pq.read_table(path).to_pylist()
