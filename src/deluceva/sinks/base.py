"""ResultSink: per-frame records out, with commit-on-success semantics."""

from __future__ import annotations

import os
from pathlib import Path

from deluceva.sinks.atomic import AtomicPath, CommitOnExit


class ResultSink(CommitOnExit):
    """Writes one record (dict) per processed frame to a temporary file; `close()` publishes it.

    Use as a context manager: a normal exit publishes the output at its path, an exception (including
    KeyboardInterrupt) discards it. `abort()` discards explicitly.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._atomic = AtomicPath(path)
        self.count = 0

    @property
    def path(self) -> Path:
        return self._atomic.target

    def write(self, record: dict) -> None:
        """Append one record."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Flush and close the temporary file."""
        raise NotImplementedError

    def _discard(self) -> None:
        """Close the temporary file without finishing it."""
        self._finish()

    def close(self) -> Path:
        """Finish writing and move the file into place; returns the final path. Idempotent."""
        if not self._atomic.done:
            try:
                self._finish()
            except BaseException:
                self._atomic.abort()
                raise
            self._atomic.commit()
        return self.path

    def abort(self) -> None:
        """Discard everything written; no file appears at the path."""
        if not self._atomic.done:
            try:
                self._discard()
            finally:
                self._atomic.abort()

