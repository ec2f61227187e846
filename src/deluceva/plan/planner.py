"""Physical planner: per unit dense or delta, minimising the cost model's predicted time; plans for bands of
filtering percentage; `apply_plan` switches a running DeltaNetwork between them (modes only: no state is lost).

Search: start from each unit's cheaper mode, then flip single units while that lowers the predicted total
(boundary costs couple neighbours); a few sweeps converge on networks of ~100 units.
"""

from __future__ import annotations

import weakref
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deluceva.errors import DelucevaError
from deluceva.plan.cost import CostModel
from deluceva.plan.store import Profile, ProfileKey, read_json, write_json

PLAN_FORMAT = 1


@dataclass
class Plan:
    """Unit modes chosen for filtering percentage `pct`, with the predicted ms per delta frame."""

    pct: float
    modes: dict[str, str]
    predicted_ms: float


@dataclass
class PlanSet:
    """Plans for bands of filtering percentage: bands[i] = (lo, plan) covers lo <= pct < next band's lo."""

    key: ProfileKey
    stamp: dict[str, Any]
    bands: list[tuple[float, Plan]]

    def for_pct(self, pct: float) -> Plan:
        i = max(0, bisect_right([lo for lo, _ in self.bands], pct) - 1)
        return self.bands[i][1]

    def to_json(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "kind": "deluceva-plan",
                "key": {"model": self.key.model, "hw": list(self.key.hw), "threads": self.key.threads},
                "stamp": self.stamp,
                "bands": [{"lo": lo, "pct": p.pct, "predicted_ms": p.predicted_ms, "modes": p.modes}
                          for lo, p in self.bands]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PlanSet:
        if d.get("kind") != "deluceva-plan" or d.get("format") != PLAN_FORMAT:
            raise DelucevaError("not a deluceva plan file (kind/format mismatch)")
        k = d["key"]
        key = ProfileKey(str(k["model"]), (int(k["hw"][0]), int(k["hw"][1])), int(k["threads"]))
        bands = [(float(b["lo"]), Plan(float(b["pct"]), dict(b["modes"]), float(b["predicted_ms"])))
                 for b in d["bands"]]
        return cls(key, d["stamp"], bands)

    def save(self, path: Path) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> PlanSet:
        return read_json(path, cls.from_json, "plan file")


def _margin(model: CostModel, name: str, pct: float) -> float:
    """Smallest predicted saving that justifies a mode change: 0.02 ms or 5% of the unit's delta time."""
    return max(0.02, 0.05 * model.unit_ms(name, "delta", pct))


def make_plan(model: CostModel, pct: float, max_sweeps: int = 8) -> Plan:
    """The mode assignment with the lowest predicted time at `pct` (greedy start + single-unit flips)."""
    free = [n for n in model.order if model.units[n].get("has_dense", True)]
    modes = dict.fromkeys(model.order, "delta")  # units without a dense form always run delta
    for n in free:  # dense only when clearly cheaper: near-ties are timing noise
        if model.unit_ms(n, "dense", pct) < model.unit_ms(n, "delta", pct) - _margin(model, n, pct):
            modes[n] = "dense"
    best = model.predict(modes, pct)
    for _ in range(max_sweeps):
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
    return Plan(float(pct), modes, best)


def make_planset(profile: Profile, pcts: list[float] | None = None, boundaries: bool = False) -> PlanSet:
    """One plan per percentage (default: the profiled ones); band edges halfway between them; equal neighbours
    merged."""
    model = CostModel(profile, boundaries)
    pts = sorted(pcts if pcts is not None else profile.pcts)
    plans = [make_plan(model, p) for p in pts]
    bands: list[tuple[float, Plan]] = []
    for i, plan in enumerate(plans):
        lo = 0.0 if i == 0 else (pts[i - 1] + pts[i]) / 2
        if bands and bands[-1][1].modes == plan.modes:
            continue
        bands.append((lo, plan))
    return PlanSet(profile.key, profile.stamp, bands)


_applied: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def apply_plan(net: Any, plan: PlanSet | Plan | str | None, filter_pct: float) -> Plan | None:
    """Set `net`'s filtering percentage and the unit modes of the plan for it; call before each frame.

    plan: a PlanSet (the band containing filter_pct), a Plan, 'delta' | 'dense' | 'auto' (every unit), or None
    (leave modes as they are). Modes are only pushed to the network when they change; state is kept.
    Returns the Plan applied (None for the uniform/None cases).
    """
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
    if _applied.get(net) is not chosen.modes:
        unknown = set(chosen.modes) - set(net.unit_names)
        if unknown:
            raise DelucevaError(f"plan does not fit this network: unknown units {sorted(unknown)[:3]}")
        net.set_unit_modes(chosen.modes)
        _applied[net] = chosen.modes
    return chosen
