"""Profile files: the machine/library fingerprint a profile is valid for, where profiles live, JSON round-trip.

A profile is keyed by (model, input size HxW, threads) and stamped with the machine fingerprint (CPU model from
/proc/cpuinfo, versions of torch, numpy, numba, deluceva). A profile whose fingerprint differs from the running
machine's is *stale*: its timings do not describe this machine and must not drive a plan.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deluceva.errors import DelucevaError

FORMAT = 1


def write_json(path: Path, obj: Any) -> Path:
    """Write `obj` as JSON atomically (temp file + rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    tmp.replace(path)
    return path


def read_json(path: Path, parse: Any, what: str) -> Any:
    """`parse(json of path)`; a missing or malformed file -> DelucevaError naming `what` ("profile", "plan file")."""
    try:
        return parse(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise DelucevaError(f"{what} not found: {path}") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DelucevaError(f"not a deluceva {what}: {path} ({e})") from None


def cpu_model() -> str:
    """The CPU's model name (first `model name` line of /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# Bump when a change to the delta units or kernels makes earlier profiles' timings wrong: profiles stamped with
# another revision are stale (re-profiled or reported). 2: contiguous state rows and the fused activation step.
# 3: NumPy-backed deltas and one-call kernels for few pixels (lower fixed cost per unit).
# 4: the filter's direct path, the conv units' dense form on non-zero rows only (dense_ms of thin convs halved).
# 5: separable max-pool re-pooling (SPP pools 2-5x cheaper), channels-last output mirrors.
# 6: lazy seeding (re-seeds ~2x cheaper: the profiles' seed times). 7: profiles add the filtered regime at
# FILTERED_MIN % (profiler.PCTS).
KERNELS_REVISION = 7


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose speed a profile measures (numba: 'none' when not installed), and the
    revision of deluceva's kernels (`KERNELS_REVISION`)."""
    import numpy
    import torch

    import deluceva

    try:
        import numba

        nb = str(numba.__version__)
    except ImportError:  # pragma: no cover - numba is normally installed
        nb = "none"
    return {"torch": str(torch.__version__), "numpy": str(numpy.__version__), "numba": nb,
            "deluceva": str(deluceva.__version__), "deluceva-kernels": str(KERNELS_REVISION)}


def fingerprint() -> dict[str, Any]:
    """This machine's fingerprint: {'cpu': str, 'versions': {lib: version}}."""
    return {"cpu": cpu_model(), "versions": library_versions()}


def stale_reasons(stamp: dict[str, Any], current: dict[str, Any] | None = None) -> list[str]:
    """Why a profile stamped `stamp` does not describe this machine ([] = valid): CPU or library version changes."""
    cur = current or fingerprint()
    reasons = []
    if stamp.get("cpu") != cur["cpu"]:
        reasons.append(f"CPU {stamp.get('cpu')!r} != this machine's {cur['cpu']!r}")
    old = stamp.get("versions", {})
    for lib, v in cur["versions"].items():
        if old.get(lib) != v:
            reasons.append(f"{lib} {old.get(lib)} != installed {v}")
    return reasons


@dataclass
class ProfileKey:
    """What a profile is for: model name, input size (h, w), torch threads."""

    model: str
    hw: tuple[int, int]
    threads: int

    def filename(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.model)
        return f"{safe}_{self.hw[1]}x{self.hw[0]}_t{self.threads}.json"


def profile_dir() -> Path:
    """Default profile folder: $DELUCEVA_CACHE/profiles or ~/.cache/deluceva/profiles."""
    base = os.environ.get("DELUCEVA_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "deluceva") / "profiles"


def default_profile_path(key: ProfileKey) -> Path:
    return profile_dir() / key.filename()


@dataclass
class Profile:
    """Measured per-unit costs of one network on one machine.

    units: per unit (execution order) a dict {name, kind, shape (output shape), inputs (producer unit names or
    'input'), dense_macs, points: [{pct, active_in, work, delta_ms, dense_ms}]}: at filtering percentage `pct`, the
    mean incoming active fraction, the fraction of input positions the unit actually processed (after its filter),
    and its mean time per delta frame in each mode. seed_ms: the unit's time in a dense (seeding) frame.
    boundary: per output shape 'NxCxHxW' the cost in ms of dense->pixels and pixels->dense conversion at fractions.
    frame_ms: measured whole-network ms per delta frame, per mode and pct ({mode: {pct: ms}}).
    """

    key: ProfileKey
    stamp: dict[str, Any]
    pcts: list[float]
    units: list[dict[str, Any]]
    boundary: dict[str, Any] = field(default_factory=dict)
    frame_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def unit_names(self) -> list[str]:
        return [u["name"] for u in self.units]

    def stale_reasons(self, current: dict[str, Any] | None = None) -> list[str]:
        return stale_reasons(self.stamp, current)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = FORMAT
        d["key"]["hw"] = list(self.key.hw)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Profile:
        if d.get("format") != FORMAT:
            raise DelucevaError(f"unsupported profile format {d.get('format')!r} (expected {FORMAT})")
        k = d["key"]
        key = ProfileKey(str(k["model"]), (int(k["hw"][0]), int(k["hw"][1])), int(k["threads"]))
        return cls(key, d["stamp"], [float(p) for p in d["pcts"]], d["units"], d.get("boundary", {}),
                   d.get("frame_ms", {}), d.get("meta", {}))

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> Profile:
        return read_json(path, cls.from_json, "profile")
