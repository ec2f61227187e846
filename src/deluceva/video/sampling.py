"""Frame sampling by presentation timestamps (never by frame counts), in exact rational arithmetic."""

from __future__ import annotations

import math
from fractions import Fraction

from deluceva.errors import DelucevaError


def exact(value: float | int | Fraction) -> Fraction:
    """A float option as the decimal the user wrote: 0.1 -> 1/10 (not the binary 0.1000000000000000055...)."""
    if isinstance(value, Fraction):
        return value
    return Fraction(repr(float(value)))


class TimestampSampler:
    """Decides per frame timestamp whether a frame is kept.

    Rule: frames before `start` are dropped. Without `fps`, every frame at or after `start` is kept.
    With `fps=F`, the kept frames are, for each multiple k of 1/F (k = 0, 1, ...), the first frame with
    t >= start + k/F; a frame that is first for several multiples (a gap in a variable-frame-rate stream)
    is kept once. Only timestamps are used, so variable frame rates need no special case.
    """

    def __init__(self, fps: float | None = None, start: float = 0.0) -> None:
        if fps is not None and not (fps > 0 and math.isfinite(fps)):
            raise DelucevaError(f"--fps must be a positive number, got {fps}")
        if not (start >= 0 and math.isfinite(start)):
            raise DelucevaError(f"--start must be >= 0 seconds, got {start}")
        self.start = exact(start)
        self.period = None if fps is None else 1 / exact(fps)
        self._next = self.start

    def keep(self, t: Fraction) -> bool:
        """True if the frame at time `t` (seconds, exact) is kept; call once per frame, in output order."""
        if t < self._next:
            return False
        if self.period is not None:
            k = math.floor((t - self.start) / self.period) + 1
            self._next = self.start + k * self.period
        return True

    def expected_count(self, duration: Fraction) -> int | None:
        """How many frames a stream whose frames span [0, duration) yields (exact for constant frame rate)."""
        if duration <= self.start:
            return 0
        if self.period is None:
            return None
        return math.ceil((duration - self.start) / self.period)
