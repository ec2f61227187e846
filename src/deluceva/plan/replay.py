"""Replay of recorded per-frame times through the frame guard, and the best any policy could have done in hindsight:
offline evaluation of guard rules on real traces, in milliseconds, without running a network.

A `deluceva bench plan` row records per frame the time every engine took on it, run side by side (`ort`, `all-delta`:
the delta network never re-seeded) and the input activity the mixed engine measured. Replaying feeds a FrameGuard
each frame's activity and then the time of what it chose: `ort` for the dense engine, `seed_ratio` x that for a
re-seed, and for a delta frame the all-delta time scaled by a fresh state's discount: k frames after a re-seed a delta
frame costs min(1, FRESH_BASE + FRESH_SLOPE x k) x the never-re-seeded network's (the filters' residual backlog
builds up; fitted on the mixed engine's delta frames of the YOLOv5n whole-video runs, 0.01% + R 0.2: 0.72 right
after a re-seed, ~0.9 after 15 frames, 1.0-1.2 after 30).

`hindsight_best` is the same cost model's optimum over all per-frame choices (dynamic programming over "on the dense
engine" and "k frames into a delta cycle"): an upper bound no online rule reaches, to say how much is left.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.plan.guard import FrameGuard

FRESH_BASE = 0.72
FRESH_SLOPE = 0.01
SEED_RATIO = 2.0  # a re-seeding frame's ms over the dense engine's (YOLOv5n, ONNX Runtime seeder: 1.9-2.2)


def fresh_factor(k: int) -> float:
    """Delta-frame time k frames after a re-seed over the never-re-seeded network's (see module docs)."""
    return min(1.0, FRESH_BASE + FRESH_SLOPE * k)


@dataclass
class Replay:
    """mean_ms: per frame after the first; speedup: the dense engine's mean over it; decisions: per frame."""

    mean_ms: float
    speedup: float
    decisions: list[str]


def _traces(per_frame: Mapping[str, Sequence]) -> tuple[np.ndarray, np.ndarray]:
    ort = np.asarray(per_frame["ort"], dtype=float)
    delta = np.asarray(per_frame["all-delta"], dtype=float)
    if ort.shape != delta.shape or ort.size < 2:
        raise ValueError("per_frame needs 'ort' and 'all-delta' times of the same frames (at least 2)")
    return ort, delta


def replay(per_frame: Mapping[str, Sequence], guard: FrameGuard, seed_ratio: float = SEED_RATIO) -> Replay:
    """Run `guard` over a bench plan row's `per_frame` (see module docs). Frame 0 re-seeds and is not counted, as in
    the bench; a frame without a recorded activity gets the last recorded one."""
    ort, delta = _traces(per_frame)
    acts = per_frame.get("activity") or [None] * ort.size
    decisions, total, k, last_a = ["reseed"], 0.0, 0, 0.0
    guard.observe("reseed", seed_ratio * ort[0])
    for i in range(1, ort.size):
        if acts[i] is not None:
            last_a = float(acts[i])
        d = guard.decide(last_a if guard.needs_activity() else None)
        k = k + 1 if d == "delta" else 0
        ms = {"ort": ort[i], "reseed": seed_ratio * ort[i], "delta": delta[i] * fresh_factor(k)}[d]
        guard.observe(d, float(ms))
        decisions.append(d)
        total += ms
    mean = total / (ort.size - 1)
    return Replay(mean, float(ort[1:].mean()) / mean, decisions)


def hindsight_best(per_frame: Mapping[str, Sequence], seed_ratio: float = SEED_RATIO, horizon: int = 40) -> float:
    """The least mean ms per frame (after the first) of any sequence of choices under the replay's cost model;
    delta cycles longer than `horizon` frames cost as at `horizon` (the fresh factor has reached 1 by then)."""
    ort, delta = _traces(per_frame)
    n_states = horizon + 2  # 0: on the dense engine; s >= 1: s - 1 frames after a re-seed (s = 1: the re-seed)
    cost = np.full(n_states, np.inf)
    cost[1] = 0.0  # frame 0 re-seeds
    factors = np.array([fresh_factor(k) for k in range(1, n_states)])
    for i in range(1, ort.size):
        best = cost.min()
        nxt = np.full(n_states, np.inf)
        nxt[0] = best + ort[i]
        nxt[1] = best + seed_ratio * ort[i]
        cont = cost[1:] + delta[i] * factors  # from s (k = s - 1 frames in) to s + 1, the last state absorbing
        nxt[2:] = cont[:-1]
        nxt[-1] = min(nxt[-1], cont[-1])
        cost = nxt
    return float(cost.min()) / (ort.size - 1)
