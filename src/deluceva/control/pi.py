"""PI controller on the target filtering percentage.

It acts on s = ln(100 - P), the log of the share of deltas kept (so that 90 -> 95 % and 50 -> 75 % are steps of
the same size), with the error normalised by the target, r = (error - target) / target, clipped to [-1, 4]: an error
over the target cuts the percentage fast (one probe at 5x the target keeps ~4x more deltas), one under it raises
it slowly (the kept share x0.74 per clean probe, through the integral), as additive-increase /
multiplicative-decrease schemes do:

    I <- I + r                      (anti-windup: at a limit, I is set back to the value that reaches it)
    s  = s0 + kp * r + ki * I       (s0: ln(100 - P0), the starting percentage)
    P  = 100 - exp(s), clipped to [pct_min, pct_max]

An error above the target raises s (more deltas kept, a lower percentage); errors under it lower s step by step. The
error of detection outputs jumps once held-back deltas delay objects (on busy scenes a fixed 75 % is already as bad
as 90 %), so the proportional gain is small: the percentage walks towards the largest safe value over a few
probes rather than oscillating between the extremes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from deluceva.errors import DelucevaError

R_MIN, R_MAX = -1.0, 4.0


@dataclass
class PIController:
    """`update(error) -> percentage` after each probe; `pct` is the current percentage."""

    target: float
    start_pct: float = 0.0
    kp: float = 0.05
    ki: float = 0.3
    pct_min: float = 0.0
    pct_max: float = 95.0  # above, a filter's backlog delays changes by P / (100 - P) >= 19 frames (docs)
    pct: float = field(init=False)
    integral: float = field(init=False, default=0.0)

    def __post_init__(self) -> None:
        if not 0.0 < self.target < 1.0:
            raise DelucevaError(f"--error-target must be in (0, 1) (1 - AP@0.5 against dense), got {self.target}")
        if not 0.0 <= self.pct_min <= self.pct_max < 100.0:
            raise DelucevaError(f"percentage limits must satisfy 0 <= min <= max < 100, got {self.pct_min}, "
                                f"{self.pct_max}")
        self.pct = min(self.pct_max, max(self.pct_min, float(self.start_pct)))
        self._s0 = math.log(100.0 - self.pct)

    def update(self, error: float) -> float:
        """The percentage after a probe measured `error` (1 - AP@0.5 against dense, in [0, 1])."""
        r = min(R_MAX, max(R_MIN, (float(error) - self.target) / self.target))
        lo, hi = math.log(100.0 - self.pct_max), math.log(100.0 - self.pct_min)
        self.integral += r
        s = self._s0 + self.kp * r + self.ki * self.integral
        if s > hi or s < lo:  # anti-windup (back-calculation): the integral only as far as the limit
            s = min(hi, max(lo, s))
            self.integral = (s - self._s0 - self.kp * r) / self.ki
        self.pct = min(self.pct_max, max(self.pct_min, 100.0 - math.exp(s)))
        return self.pct
