"""Physical planner: per unit dense or delta, minimising the cost model's predicted time; plans for bands of
filtering percentage; `apply_plan` switches a running DeltaNetwork between them (modes only: no state is lost).

Search: start from each unit's cheaper mode, then flip single units while that lowers the predicted total
(boundary costs couple neighbours; without them the objective is separable and the start is optimal); a few sweeps
converge on networks of ~100 units.

Per frame: every unit with a dense form runs "auto", dense when the fraction of its input it processes in that frame
exceeds its break-even measured on this machine (`CostModel.break_even`), so that frames busier than the profile's
typical one (codec key frames, exposure steps) do not pay a delta form's worst case; `modes` is the choice at the
band's typical work (what the table prints and the predictions use).

Band kinds: "units" runs the delta network with the plan's unit modes; "ort" runs whole frames on the fastest dense
engine (ONNX Runtime), chosen where the best unit plan is predicted slower than that engine's measured time (a
profile without that timing gives "units" bands only). Leaving an "ort" band re-seeds the delta network.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from deluceva.errors import DelucevaError
from deluceva.plan.cost import CostModel
from deluceva.plan.store import Profile, ProfileKey, read_json, write_json

PLAN_FORMAT = 3
KINDS = ("units", "ort")
ORT_MARGIN = 1.0  # a band runs on the dense engine when its best unit plan is predicted above this x its time


@dataclass
class Plan:
    """Unit modes chosen for filtering percentage `pct`, with the predicted ms per frame.

    kind: "units" (the delta network with these unit modes) or "ort" (whole frames on the dense engine; modes are
    the best unit plan, kept for reference). predicted_ms: mean ms per frame of what runs (the dense engine's for
    "ort"; for "units" a profile-like cycle of one re-seed and delta frames, `cycle_ms`).
    delta_ms: the unit plan's predicted ms per delta frame; swing_ms: the same on the profile's exposure-swing frame,
    whose input activity is swing_activity; activity: the profile clip's mean input activity at pct
    (guard.activity); seed_ms: a re-seeding frame;
    dense_ms: the dense engine's ms (None: not profiled). break_even: per unit with a dense form, the work fraction
    above which it runs dense in a frame (empty: the plan's modes are fixed, as in plans of format < 3).
    """

    pct: float
    modes: dict[str, str]
    predicted_ms: float
    kind: str = "units"
    delta_ms: float | None = None
    swing_ms: float | None = None
    activity: float = 0.0
    seed_ms: float | None = None
    dense_ms: float | None = None
    swing_activity: float = 1.0
    break_even: dict[str, float] = field(default_factory=dict)

    @cached_property
    def run_modes(self) -> dict[str, str]:
        """The unit modes pushed to the network: "auto" for units with a break-even, else the plan's mode."""
        return {n: ("auto" if n in self.break_even else m) for n, m in self.modes.items()}

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DelucevaError(f"plan kind must be one of {KINDS}, got {self.kind!r}")
        if self.delta_ms is None and self.kind == "units":
            self.delta_ms = self.predicted_ms

    def to_json(self) -> dict[str, Any]:
        return {"pct": self.pct, "kind": self.kind, "predicted_ms": self.predicted_ms, "delta_ms": self.delta_ms,
                "swing_ms": self.swing_ms, "activity": self.activity, "swing_activity": self.swing_activity,
                "seed_ms": self.seed_ms, "dense_ms": self.dense_ms, "modes": self.modes, "break_even": self.break_even}

    @classmethod
    def from_json(cls, b: dict[str, Any]) -> Plan:
        opt = {k: (None if b.get(k) is None else float(b[k])) for k in ("delta_ms", "swing_ms", "seed_ms",
                                                                         "dense_ms")}
        return cls(float(b["pct"]), dict(b["modes"]), float(b["predicted_ms"]), str(b.get("kind", "units")),
                   activity=float(b.get("activity", 0.0)), swing_activity=float(b.get("swing_activity", 1.0)),
                   break_even={n: float(v) for n, v in b.get("break_even", {}).items()}, **opt)


@dataclass
class PlanSet:
    """Plans for bands of filtering percentage: bands[i] = (lo, plan) covers lo <= pct < next band's lo."""

    key: ProfileKey
    stamp: dict[str, Any]
    bands: list[tuple[float, Plan]]

    def for_pct(self, pct: float) -> Plan:
        i = max(0, bisect_right([lo for lo, _ in self.bands], pct) - 1)
        return self.bands[i][1]

    def summary(self) -> list[tuple[float, float, str, int]]:
        """Groups of neighbouring bands with the same kind and modes: (lo, hi, kind, number of dense units)."""
        out: list[tuple[float, float, str, int]] = []
        for i, (lo, p) in enumerate(self.bands):
            hi = self.bands[i + 1][0] if i + 1 < len(self.bands) else 100.0
            if out and out[-1][2] == p.kind and (p.kind == "ort" or self.bands[i - 1][1].modes == p.modes):
                out[-1] = (out[-1][0], hi, p.kind, out[-1][3])
                continue
            out.append((lo, hi, p.kind, sum(1 for m in p.modes.values() if m == "dense")))
        return out

    @property
    def uses_dense_engine(self) -> bool:
        """Whether any band runs frames on the dense engine (the engine then prepares it) or can guard to it."""
        return any(p.kind == "ort" or p.dense_ms is not None for _, p in self.bands)

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "kind": "deluceva-plan",
                "key": {"model": self.key.model, "hw": list(self.key.hw), "threads": self.key.threads},
                "stamp": self.stamp, "bands": [{"lo": lo, **p.to_json()} for lo, p in self.bands]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanSet:
        if d.get("kind") != "deluceva-plan" or d.get("format") not in (1, 2, PLAN_FORMAT):
            raise DelucevaError("not a deluceva plan file (kind/format mismatch)")
        k = d["key"]
        key = ProfileKey(str(k["model"]), (int(k["hw"][0]), int(k["hw"][1])), int(k["threads"]))
        return cls(key, d["stamp"], [(float(b["lo"]), Plan.from_json(b)) for b in d["bands"]])

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> PlanSet:
        return read_json(path, cls.from_json, "plan file")


def _margin(model: CostModel, name: str, pct: float) -> float:
    """Smallest predicted saving that justifies a mode change: 0.02 ms or 5% of the unit's delta time."""
    return max(0.02, 0.05 * model.unit_ms(name, "delta", pct))


def break_evens(model: CostModel) -> dict[str, float]:
    """Per unit with a dense form and profile points, its measured break-even (CostModel.break_even)."""
    out = {n: model.break_even(n) for n in model.order}
    return {n: v for n, v in out.items() if v is not None}


def make_plan(model: CostModel, pct: float, max_sweeps: int = 8, break_even: dict[str, float] | None = None
              ) -> Plan:
    """The mode assignment with the lowest predicted time at `pct` (greedy start + single-unit flips); per frame the
    units switch at `break_even` (default: `break_evens(model)`)."""
    free = [n for n in model.order if model.units[n].get("has_dense", True)]
    modes = dict.fromkeys(model.order, "delta")  # units without a dense form always run delta
    for n in free:  # dense only when clearly cheaper: near-ties are timing noise
        if model.unit_ms(n, "dense", pct) < model.unit_ms(n, "delta", pct) - _margin(model, n, pct):
            modes[n] = "dense"
    best = model.predict(modes, pct)
    for _ in range(max_sweeps if model.boundaries else 0):
        improved = False
        for n in free:
            modes[n] = "dense" if modes[n] == "delta" else "delta"
            t = model.predict(modes, pct)
            if t < best - _margin(model, n, pct):
                best, improved = t, True
            else:
                modes[n] = "dense" if modes[n] == "delta" else "delta"
        if not improved:
            break
    ort = model.dense_engine_ms()
    swing = model.predict(modes, pct, 1.0) if model.has_swing else None
    seed = model.seed_ms(pct)
    cycle = cycle_ms(best, seed, int(model.profile.meta.get("frames", 0)))
    kind = "ort" if ort is not None and cycle > ORT_MARGIN * ort else "units"
    return Plan(float(pct), modes, ort if kind == "ort" else cycle, kind, delta_ms=best,  # type: ignore[arg-type]
                swing_ms=swing, activity=model.activity(pct), seed_ms=seed, dense_ms=ort,
                swing_activity=model.activity(pct, swing=True),
                break_even=break_evens(model) if break_even is None else break_even)


def cycle_ms(delta_ms: float, seed_ms: float, frames: int) -> float:
    """Mean ms per frame of a cycle like the profile's: one seeding frame, then frames - 1 delta frames (delta
    frames grow costlier with time since the seed at filtering > 0, so runs re-seed; see plan.guard)."""
    return (seed_ms + (frames - 1) * delta_ms) / frames if frames >= 2 else delta_ms


def plan_grid(pcts: list[float], steps: int = 4) -> list[float]:
    """The profiled percentages plus `steps - 1` evenly spaced points between neighbours (finer band edges; the
    cost model interpolates over the percentage)."""
    pts = sorted({float(p) for p in pcts})
    grid = set(pts)
    for a, b in zip(pts, pts[1:], strict=False):
        grid.update(a + (b - a) * i / steps for i in range(1, steps))
    return sorted(grid)


def make_planset(profile: Profile, pcts: list[float] | None = None, boundaries: bool = False) -> PlanSet:
    """One plan per percentage (default: `plan_grid` of the profiled ones), band edges halfway between them. Each
    band keeps its own predictions (the guard uses them at the running percentage); neighbours with equal modes share
    one modes dict, so switching between them pushes nothing to the network. `PlanSet.summary()` groups them."""
    model = CostModel(profile, boundaries)
    pts = sorted(pcts if pcts is not None else plan_grid(profile.pcts))
    bands: list[tuple[float, Plan]] = []
    be = break_evens(model)  # per unit, the same in every band
    for i, p in enumerate(pts):
        plan = make_plan(model, p, break_even=be)
        if bands and bands[-1][1].modes == plan.modes:
            plan.modes = bands[-1][1].modes
        bands.append((0.0 if i == 0 else (pts[i - 1] + p) / 2, plan))
    return PlanSet(profile.key, profile.stamp, bands)


_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_plan(net: Any, plan: PlanSet | Plan | str | None, filter_pct: float) -> Plan | None:
    """Set `net`'s filtering percentage and the unit modes of the plan for it; call before each frame.

    plan: a PlanSet (the band containing filter_pct), a Plan, 'delta' | 'dense' | 'auto' (every unit), or None
    (leave modes as they are). Modes are only pushed to the network when they change; state is kept.
    Returns the Plan applied (None for the uniform/None cases); for a band of kind "ort" nothing is pushed and the
    caller runs the frame on the dense engine.
    """
    if net.filter_pct != filter_pct:  # (an nn.Module attribute set: ~20 us of isinstance checks per frame)
        net.filter_pct = filter_pct
    if plan is None:
        return None
    if isinstance(plan, str):
        if plan not in ("delta", "dense", "auto"):
            raise DelucevaError(f"plan must be auto, dense, delta or a plan file, got {plan!r}")
        if _applied.get(net) != plan:
            net.set_unit_modes(dict.fromkeys(net.unit_names, plan))
            _applied[net] = plan
        return None
    chosen = plan.for_pct(filter_pct) if isinstance(plan, PlanSet) else plan
    if chosen.kind == "ort":  # whole frames on the dense engine: the caller runs it; unit modes stay as they are
        return chosen
    run = chosen.run_modes
    if _applied.get(net) is not run and _applied.get(net) != run:
        unknown = set(chosen.modes) - set(net.unit_names)
        if unknown:
            raise DelucevaError(f"plan does not fit this network: unknown units {sorted(unknown)[:3]}")
        net.set_unit_modes(run)
        net.set_break_evens(chosen.break_even)
        _applied[net] = run
    return chosen
