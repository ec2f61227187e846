"""Cost model: predicted time of a whole physical plan (a mode per unit) at a filtering percentage.

frame time = the network's own per-frame overhead (interpolated over P) + per unit f_mode(work fraction),
piecewise linear through the profile's (work, ms) points of that mode; the work
fraction at percentage P is interpolated from the profile over P. Boundary cost: where a dense-mode unit feeds a
delta-mode unit (or the reverse), the tensor crosses between a full dense delta and a sparse PixelDelta; its cost is
interpolated from the profile's conversion benchmark for that shape at the edge's active fraction. Off by default:
DeltaNetwork's dense forms take and emit PixelDeltas themselves, so the conversions are inside their measured time
(turn it on for an engine that passes dense tensors between dense units). 'auto' units cost the cheaper of the two
modes (the engine picks per frame) and never pay boundaries.

Swing level s in [0, 1]: s = 0 is the profile clip's typical frame, s = 1 a frame that changes everywhere (the
profile's full-frame brightness change); unit and overhead costs are interpolated linearly between the two. The
fastest dense engine's ms (`dense_engine_ms`) and the seeding frame's ms (`seed_ms`) come from the same profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from deluceva.plan import timemodel
from deluceva.plan.store import Profile

UNIT_MODES = ("delta", "dense", "auto")


def _curve(xs: list[float], ys: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Points sorted by x with duplicate x averaged (the form np.interp needs)."""
    order = np.argsort(xs, kind="stable")
    xa, ya = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
    ux, inv = np.unique(xa, return_inverse=True)
    return ux, np.bincount(inv, weights=ya) / np.bincount(inv)


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through points (sorted by x, duplicates averaged), clamped at the ends."""
    ux, uy = _curve(xs, ys)
    return float(np.interp(x, ux, uy))


class CostModel:
    """Per-unit, per-mode time model of one profile. `boundaries`: include conversion costs at mode boundaries."""

    def __init__(self, profile: Profile, boundaries: bool = False) -> None:
        self.profile = profile
        self.boundaries = boundaries
        self.units = {u["name"]: u for u in profile.units}
        self.order = [u["name"] for u in profile.units]
        self._index = {n: i for i, n in enumerate(self.order)}
        self.edges = [(src, u["name"]) for u in profile.units for src in u["inputs"] if src in self.units]
        self._curves: dict[tuple[str, str, str], tuple[np.ndarray, np.ndarray]] = {}

    def _unit_interp(self, name: str, x: float, xkey: str, ykey: str) -> float:
        """y(x) through the unit's profile points (xkey, ykey); curves are built once per unit and key pair."""
        c = self._curves.get((name, xkey, ykey))
        if c is None:
            pts = self.units[name]["points"]
            c = self._curves[(name, xkey, ykey)] = _curve([p[xkey] for p in pts], [p[ykey] for p in pts])
        return float(np.interp(x, c[0], c[1]))

    def work(self, name: str, pct: float) -> float:
        """Fraction of its input the unit processes at filtering percentage `pct`."""
        return self._unit_interp(name, pct, "pct", "work")

    def active_in(self, name: str, pct: float) -> float:
        return self._unit_interp(name, pct, "pct", "active_in")

    def unit_ms(self, name: str, mode: str, pct: float, swing: float = 0.0) -> float:
        """Predicted ms per delta frame of unit `name` in `mode` at `pct` and swing level `swing` (module docs)."""
        if mode == "auto":
            return min(self.unit_ms(name, "delta", pct, swing), self.unit_ms(name, "dense", pct, swing))
        if mode not in ("delta", "dense"):
            raise ValueError(f"unit mode must be one of {UNIT_MODES}, got {mode!r}")
        calm = self.unit_ms_at_work(name, mode, self.work(name, pct))
        if swing <= 0.0 or f"swing_{mode}_ms" not in self.units[name]["points"][0]:
            return calm
        hot = self._unit_interp(name, pct, "pct", f"swing_{mode}_ms")
        return calm + min(1.0, swing) * (hot - calm)

    def break_even(self, name: str) -> float | None:
        """Work fraction above which unit `name` is predicted faster in its dense form, from the profile's filtered
        passes (pct > 0; the exact pass runs another state dtype): the dense form's time when it runs (the largest of
        the per-percentage medians: at high percentages deep units skip most frames and their medians drop to ~0)
        against the delta form's work curve, the exposure-swing frame included. Linear between the curve's points;
        beyond its last point extrapolated through the origin (capped at 1). None for units without a dense form or
        profile points."""
        u = self.units[name]
        pts = [p for p in u["points"] if p["pct"] > 0]
        if not u.get("has_dense", True) or not pts:
            return None
        dense = max(p["dense_ms"] for p in pts)
        curve = [(p["work"], p["delta_ms"]) for p in pts]
        curve += [(p["swing_work"], p["swing_delta_ms"]) for p in pts if "swing_work" in p]
        ws, ts = _curve([w for w, _ in curve], [t for _, t in curve])
        if ts[0] >= dense:
            return float(ws[0])
        for i in range(1, len(ws)):
            if ts[i] >= dense:  # crosses between points i-1 and i
                return float(ws[i - 1] + (ws[i] - ws[i - 1]) * (dense - ts[i - 1]) / (ts[i] - ts[i - 1]))
        return float(min(1.0, ws[-1] * dense / ts[-1])) if ts[-1] > 0 else 1.0

    def unit_ms_at_work(self, name: str, mode: str, work: float) -> float:
        """Predicted ms of unit `name` in `mode` ('delta' | 'dense') processing the fraction `work` of its input."""
        return self._unit_interp(name, work, "work", f"{mode}_ms")

    def unit_ms_in_frame(self, name: str, mode: str, work: float, counts: Sequence[float] | None) -> float:
        """Predicted ms of unit `name` in one frame where it ran in `mode`, processed the fraction `work` of its
        input and did `counts` (timemodel.FEATURES): the profile's per-frame time model when it has one and counts
        are given, else its work curve."""
        model = self.time_model(mode)
        if model is None or counts is None:  # an old profile, or no counts: the work curve
            return self.unit_ms_at_work(name, mode, work)
        return timemodel.unit_ms(model, self._index[name], timemodel.kind_key(self.units[name]["kind"]), counts)

    def predict_frame(self, ran: Mapping[str, tuple[str, float, Sequence[float] | None]], pct: float) -> float:
        """Predicted ms of one delta frame from what each unit did in it: `ran` maps unit name -> (mode that ran,
        work fraction, counts or None), as DeltaNetwork.last_stats, profiler.work_fractions and
        timemodel.unit_counts (with profiler.unit_sizes) report them. Content-aware, unlike `predict`, which takes
        the profile clip's typical work at `pct`."""
        counts = [c for _, _, c in ran.values()]
        model = self.time_model("delta")
        if model is None or pct <= 0.0 or any(c is None for c in counts):  # the curves (exact runs: float64 state)
            return self.overhead_ms(pct) + sum(self.unit_ms_at_work(n, m, w) for n, (m, w, _) in ran.items())
        units = sum(self.unit_ms_in_frame(n, *ran[n]) for n in self.order if n in ran)
        return timemodel.overhead_ms(model, counts) + units  # type: ignore[arg-type]

    def time_model(self, mode: str) -> dict | None:
        """The profile's per-frame time model of `mode` (timemodel; fitted on filtered frames), or None."""
        return self.profile.meta.get("time_model", {}).get(mode)

    @property
    def has_swing(self) -> bool:
        """Whether the profile measured full-frame changes (swing costs)."""
        return bool(self.profile.units) and "swing_delta_ms" in self.profile.units[0]["points"][0]

    def _frame_table(self, key: str, pct: float) -> float | None:
        table = self.profile.frame_ms.get(key, {})
        return _interp(pct, [float(k) for k in table], list(table.values())) if table else None

    def dense_engine_ms(self) -> float | None:
        """The fastest dense engine's ms per frame on the profile's frames (median over the percentages' runs), or
        None when the profile has no such timing."""
        table = self.profile.frame_ms.get(self.profile.meta.get("dense_engine") or "onnxruntime", {})
        return float(np.median(list(table.values()))) if table else None

    def seed_ms(self, pct: float) -> float:
        """Whole-network ms of a seeding (dense re-seed) frame at `pct` (falls back to the units' seed times)."""
        v = self._frame_table("seed", pct)
        return v if v is not None else sum(float(u.get("seed_ms", 0.0)) for u in self.profile.units)

    def activity(self, pct: float, swing: bool = False) -> float:
        """The profile clip's mean input activity at `pct` (guard.activity; 0 when not measured), or with swing=True
        that of its synthetic swing frame (1 when not measured)."""
        table = self.profile.meta.get("swing_activity" if swing else "activity", {})
        if not table:
            return 1.0 if swing else 0.0
        return _interp(pct, [float(k) for k in table], list(table.values()))

    def edge_ms(self, src: str, dst: str, src_mode: str, dst_mode: str, pct: float) -> float:
        """Conversion cost on edge src -> dst when their modes differ (0 otherwise or when unknown)."""
        if not self.boundaries or src_mode == dst_mode or "auto" in (src_mode, dst_mode):
            return 0.0
        shape = self.units[src]["shape"]
        table = self.profile.boundary.get("x".join(map(str, shape)))
        if table is None:
            return 0.0
        kind = "to_pixels" if src_mode == "dense" else "to_dense"
        return _interp(self.active_in(dst, pct), table["fractions"], table[kind])

    def overhead_ms(self, pct: float, swing: float = 0.0) -> float:
        """The network's per-frame work outside its units (input delta, output updates), measured in delta mode."""
        tables = self.profile.meta.get("overhead_ms", {})
        calm = self._table(tables.get("delta", {}), pct)
        hot = tables.get("swing_delta")
        if swing <= 0.0 or not hot:
            return calm
        return calm + min(1.0, swing) * (self._table(hot, pct) - calm)

    @staticmethod
    def _table(table: Mapping[str, float], pct: float) -> float:
        if not table:
            return 0.0
        return max(0.0, _interp(pct, [float(k) for k in table], list(table.values())))

    def predict(self, modes: Mapping[str, str], pct: float, swing: float = 0.0) -> float:
        """Predicted ms per delta frame of the whole network with unit modes `modes` (missing units: 'auto') at
        swing level `swing` (0: a typical frame of the profile clip; 1: a frame that changes everywhere)."""
        total = self.overhead_ms(pct, swing) + sum(self.unit_ms(n, modes.get(n, "auto"), pct, swing)
                                                   for n in self.order)
        for src, dst in self.edges:
            total += self.edge_ms(src, dst, modes.get(src, "auto"), modes.get(dst, "auto"), pct)
        return total

    def uniform(self, mode: str) -> dict[str, str]:
        return dict.fromkeys(self.order, mode)
