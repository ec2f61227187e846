"""Darknet .cfg reader: the file as a list of sections with typed, error-checked option access.

Syntax (as darknet's `read_cfg`): `[type]` opens a section, `key=value` lines fill it, blank lines and
lines starting with `#` or `;` are comments, whitespace inside a line is ignored. Every problem raises
ModelError with one line naming the file, the line or section, and the option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deluceva.errors import ModelError


@dataclass
class Section:
    """One `[type]` block. `index` counts layers (the leading [net] is -1), as darknet's route/shortcut do."""

    kind: str
    index: int
    line: int
    path: Path
    options: dict[str, str] = field(default_factory=dict)

    def where(self) -> str:
        layer = "" if self.index < 0 else f" (layer {self.index})"
        return f"{self.path}: line {self.line}: [{self.kind}]{layer}"

    def error(self, message: str) -> ModelError:
        return ModelError(f"{self.where()}: {message}")

    def has(self, key: str) -> bool:
        return key in self.options

    def _raw(self, key: str, default: object) -> str | None:
        if key in self.options:
            return self.options[key]
        if default is None:
            raise self.error(f"missing option '{key}'")
        return None

    def get_int(self, key: str, default: int | None = None) -> int:
        raw = self._raw(key, default)
        if raw is None:
            return default  # type: ignore[return-value]
        try:
            return int(raw)
        except ValueError:
            raise self.error(f"option {key}={raw!r} is not an integer") from None

    def get_float(self, key: str, default: float | None = None) -> float:
        raw = self._raw(key, default)
        if raw is None:
            return default  # type: ignore[return-value]
        try:
            return float(raw)
        except ValueError:
            raise self.error(f"option {key}={raw!r} is not a number") from None

    def get_str(self, key: str, default: str | None = None) -> str:
        raw = self._raw(key, default)
        return default if raw is None else raw  # type: ignore[return-value]

    def get_ints(self, key: str, default: list[int] | None = None) -> list[int]:
        raw = self._raw(key, default)
        if raw is None:
            return list(default)  # type: ignore[arg-type]
        try:
            return [int(v) for v in raw.split(",") if v != ""]
        except ValueError:
            raise self.error(f"option {key}={raw!r} is not a comma-separated list of integers") from None

    def get_floats(self, key: str, default: list[float] | None = None) -> list[float]:
        raw = self._raw(key, default)
        if raw is None:
            return list(default)  # type: ignore[arg-type]
        try:
            return [float(v) for v in raw.split(",") if v != ""]
        except ValueError:
            raise self.error(f"option {key}={raw!r} is not a comma-separated list of numbers") from None


def parse_cfg(path: str | Path) -> list[Section]:
    """Read a darknet cfg: the [net] section first, then one Section per layer (index 0, 1, ...)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"darknet cfg not found: {path}")
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read as a text darknet cfg ({e.__class__.__name__})") from None
    sections: list[Section] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = "".join(raw.split())
        if not line or line[0] in "#;":
            continue
        if line[0] == "[":
            if not line.endswith("]") or len(line) < 3:
                raise ModelError(f"{path}: line {lineno}: malformed section header {raw.strip()!r}")
            sections.append(Section(line[1:-1].lower(), len(sections) - 1, lineno, path))
            continue
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise ModelError(
                f"{path}: line {lineno}: expected 'key=value' or '[section]', got {raw.strip()[:60]!r}"
            )
        if not sections:
            raise ModelError(f"{path}: line {lineno}: option {key!r} appears before the first [section]")
        sections[-1].options[key] = value
    if not sections or sections[0].kind not in ("net", "network"):
        raise ModelError(f"{path}: a darknet cfg must start with a [net] section")
    if len(sections) == 1:
        raise ModelError(f"{path}: no layers after [net]")
    return sections
