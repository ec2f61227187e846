"""Cost model: predicted time of a whole physical plan (a mode per unit) at a filtering percentage.

frame time = the network's own per-frame overhead (interpolated over P) + per unit f_mode(work fraction),
piecewise linear through the profile's (work, ms) points of that mode; the work
fraction at percentage P is interpolated from the profile over P. Boundary cost: where a dense-mode unit feeds a
delta-mode unit (or the reverse), the tensor crosses between a full dense delta and a sparse PixelDelta; its cost is
interpolated from the profile's conversion benchmark for that shape at the edge's active fraction. Off by default:
DeltaNetwork's dense forms take and emit PixelDeltas themselves, so the conversions are inside their measured time
(turn it on for an engine that passes dense tensors between dense units). 'auto' units cost the cheaper of the two
modes (the engine picks per frame) and never pay boundaries.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from deluceva.plan.store import Profile

UNIT_MODES = ("delta", "dense", "auto")


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    """Piecewise-linear y(x) through points (sorted by x, duplicates averaged), clamped at the ends."""
    order = np.argsort(xs, kind="stable")
    xa, ya = np.asarray(xs, dtype=float)[order], np.asarray(ys, dtype=float)[order]
    ux, inv = np.unique(xa, return_inverse=True)
    uy = np.bincount(inv, weights=ya) / np.bincount(inv)
    return float(np.interp(x, ux, uy))


class CostModel:
    """Per-unit, per-mode time model of one profile. `boundaries`: include conversion costs at mode boundaries."""

    def __init__(self, profile: Profile, boundaries: bool = False) -> None:
        self.profile = profile
        self.boundaries = boundaries
        self.units = {u["name"]: u for u in profile.units}
        self.order = [u["name"] for u in profile.units]
        self.edges = [(src, u["name"]) for u in profile.units for src in u["inputs"] if src in self.units]

    def work(self, name: str, pct: float) -> float:
        """Fraction of its input the unit processes at filtering percentage `pct`."""
        pts = self.units[name]["points"]
        return _interp(pct, [p["pct"] for p in pts], [p["work"] for p in pts])

    def active_in(self, name: str, pct: float) -> float:
        pts = self.units[name]["points"]
        return _interp(pct, [p["pct"] for p in pts], [p["active_in"] for p in pts])

    def unit_ms(self, name: str, mode: str, pct: float) -> float:
        """Predicted ms per delta frame of unit `name` in `mode` at `pct`."""
        if mode == "auto":
            return min(self.unit_ms(name, "delta", pct), self.unit_ms(name, "dense", pct))
        if mode not in ("delta", "dense"):
            raise ValueError(f"unit mode must be one of {UNIT_MODES}, got {mode!r}")
        pts = self.units[name]["points"]
        return _interp(self.work(name, pct), [p["work"] for p in pts], [p[f"{mode}_ms"] for p in pts])

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

    def overhead_ms(self, pct: float) -> float:
        """The network's per-frame work outside its units (input delta, output updates), measured in delta mode."""
        table = self.profile.meta.get("overhead_ms", {}).get("delta", {})
        if not table:
            return 0.0
        return max(0.0, _interp(pct, [float(k) for k in table], list(table.values())))

    def predict(self, modes: Mapping[str, str], pct: float) -> float:
        """Predicted ms per delta frame of the whole network with unit modes `modes` (missing units: 'auto')."""
        total = self.overhead_ms(pct) + sum(self.unit_ms(n, modes.get(n, "auto"), pct) for n in self.order)
        for src, dst in self.edges:
            total += self.edge_ms(src, dst, modes.get(src, "auto"), modes.get(dst, "auto"), pct)
        return total

    def uniform(self, mode: str) -> dict[str, str]:
        return dict.fromkeys(self.order, mode)
