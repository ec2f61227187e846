"""Error probes: every `every`-th delta frame also runs dense; the error is 1 - AP@0.5 of the delta detections
against the dense ones (DESIGN.md's weighted measure) over the last `window` probes (one frame's AP swings on a
single box; a few frames' pooled AP does not)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from deluceva.errors import DelucevaError
from deluceva.eval.metrics import weighted_ap50
from deluceva.zoo.base import Detections


@dataclass
class ErrorProbe:
    """`due()` before a delta frame; `observe(dense, delta) -> error` after a probed one."""

    every: int = 10
    window: int = 2
    dense_patience: int = 5
    since: int = field(init=False, default=0)
    dense_run: int = field(init=False, default=0)
    errors: list[float] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if self.every < 2:
            raise DelucevaError(f"--probe-every must be >= 2 (1 would run every frame dense), got {self.every}")
        if self.window < 1:
            raise DelucevaError(f"probe window must be >= 1, got {self.window}")
        self._pairs: deque[tuple[Detections, Detections]] = deque(maxlen=self.window)

    def due(self) -> bool:
        """Whether the coming delta frame is probed (`every` frames after the last probe or seed)."""
        return self.since + 1 >= self.every

    def tick(self, ran: str) -> bool:
        """Count a frame that was not probed: `ran` is the engine's mode, delta | refresh (a seed: restarts the
        count) | dense (the dense engine ran it: exact). True after every (every x dense_patience)-th dense-engine
        frame in a row: the controller then counts one clean probe, so that a plan band run on the dense engine is
        left now and then to test the scene again; not at every probe interval, or a percentage just cut for its
        errors would come straight back (on the pets video that cycle kept the mean probe error at 0.57)."""
        if ran == "dense":
            self.since = 0
            self.dense_run += 1
            return self.dense_run % (self.every * self.dense_patience) == 0
        self.dense_run = 0
        self.since = 0 if ran == "refresh" else self.since + 1
        return False

    def observe(self, dense: Detections, delta: Detections) -> float:
        """Error over the last probes, this one included (the dense detections are the reference)."""
        self._pairs.append((dense, delta))
        self.since = 0
        error = 1.0 - weighted_ap50([p[0] for p in self._pairs], [p[1] for p in self._pairs])
        self.errors.append(error)
        return error
