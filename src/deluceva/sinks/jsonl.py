"""JSON Lines results: one JSON object per processed frame, flushed line by line."""

from __future__ import annotations

import json
import os
from typing import Any

from deluceva.sinks.base import ResultSink


def _plain(obj: Any) -> Any:
    """json fallback for numpy scalars and arrays."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def dumps(record: dict) -> str:
    """One record as a compact JSON line (no newline)."""
    return json.dumps(record, separators=(",", ":"), default=_plain)


class JsonlSink(ResultSink):
    """`.jsonl`: each `write` appends one line and flushes it (the temp file is readable while running)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(path)
        self._fh = open(self._atomic.temp, "w", encoding="utf-8")  # noqa: SIM115 - closed in _finish

    def write(self, record: dict) -> None:
        self._fh.write(dumps(record) + "\n")
        self._fh.flush()
        self.count += 1

    def _finish(self) -> None:
        self._fh.close()


def read_jsonl(path: str | os.PathLike[str]) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
