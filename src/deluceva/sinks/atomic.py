"""Write-then-rename: output appears at its final path only when writing finished successfully."""

from __future__ import annotations

import os
import uuid
import weakref
from pathlib import Path
from types import TracebackType
from typing import Self

from deluceva.errors import OutputError


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class AtomicPath:
    """A hidden temporary path beside `target` ('.<name>.<random>.part<suffix>'), created empty at once.

    `commit()` renames it onto the target (atomic on one filesystem); `abort()` removes it. If neither
    happens (the object is garbage collected, the interpreter exits), the temporary file is removed. A
    killed process leaves only the hidden '.part' file, never a target that looks complete.
    Raises OutputError at construction when the target's directory is missing or not writable, or the
    target is a directory.
    """

    def __init__(self, target: str | os.PathLike[str]) -> None:
        self.target = Path(target)
        parent = self.target.parent
        if self.target.is_dir():
            raise OutputError(f"output path is a directory: {self.target}")
        if not parent.is_dir():
            raise OutputError(f"output directory does not exist: {parent}")
        name = f".{self.target.stem}.{uuid.uuid4().hex[:8]}.part{self.target.suffix}"
        self.temp = parent / name
        try:
            with open(self.temp, "xb"):
                pass
        except OSError as e:
            raise OutputError(f"cannot write to {parent}: {e.strerror or e}") from None
        self._finalizer = weakref.finalize(self, _remove, str(self.temp))
        self.done = False

    def commit(self) -> Path:
        """Move the finished temporary file onto the target; returns the target."""
        if self.done:
            return self.target
        try:
            os.replace(self.temp, self.target)
        except OSError as e:
            self.abort()
            raise OutputError(f"cannot write {self.target}: {e.strerror or e}") from None
        self.done = True
        self._finalizer.detach()
        return self.target

    def abort(self) -> None:
        """Remove the temporary file (idempotent)."""
        self.done = True
        self._finalizer()


class CommitOnExit:
    """Context-manager mixin for writers with close() (commit) and abort() (discard): a `with` block that ends with
    an exception leaves no file at the target path."""

    def close(self):  # pragma: no cover - implemented by the writer
        raise NotImplementedError

    def abort(self) -> None:  # pragma: no cover - implemented by the writer
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
