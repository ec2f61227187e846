"""Profiler: time every unit of a converted network densely and as a delta unit at several filtering percentages.

For each percentage P and each unit mode m (delta, dense) the network is reset, seeded on the first frame and run
over the remaining frames of a real clip with every unit in mode m; per unit it records the mean incoming active
fraction, the processed ("work") fraction after the unit's filter and the mean time per delta frame. Modes do not
change values (both are exact), so active fractions are the same in both passes and in any mixed plan.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deluceva.delta.pixels import PixelDelta
from deluceva.plan.store import Profile, ProfileKey, fingerprint

PCTS: tuple[float, ...] = (0.0, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5)
MODES: tuple[str, ...] = ("delta", "dense")
Tick = Callable[[str], None]


def supports_modes(net: Any) -> bool:
    """Whether the network has the per-unit mode API (unit_names / set_unit_modes)."""
    return hasattr(net, "set_unit_modes") and hasattr(net, "unit_names")


def unit_names(net: Any) -> list[str]:
    return list(net.unit_names) if hasattr(net, "unit_names") else [u.name for u in net.units]


def set_all_modes(net: Any, mode: str) -> None:
    if supports_modes(net):
        net.set_unit_modes(dict.fromkeys(unit_names(net), mode))


def _out_node(step: Any) -> Any:
    chain = list(getattr(step.unit, "fused", []))
    return chain[-1] if chain else step.node


def unit_graph(net: Any) -> list[dict[str, Any]]:
    """Per varying unit: name, kind, output shape (list, [] if unknown), producer unit names of its inputs."""
    producer: dict[Any, str] = {net.input_node: "input"}
    for s in net.steps:
        producer[_out_node(s)] = s.unit.name
    rows = []
    for s in net.delta_steps:
        meta = _out_node(s).meta.get("tensor_meta")
        shape = list(meta.shape) if meta is not None and hasattr(meta, "shape") else []
        rows.append({"name": s.unit.name, "kind": s.unit.kind, "shape": shape,
                     "inputs": [producer.get(n, "?") for n in s.unit.var_nodes],
                     "dense_macs": int(getattr(s.unit, "dense_macs", 0)),
                     "has_dense": bool(getattr(s.unit, "has_dense", False))})
    return rows


def _work_fractions(net: Any, stats: list[dict[str, Any]]) -> list[float]:
    """Fraction of its input granules each unit processed this frame (after its filter; else the incoming one)."""
    out = []
    for s, row in zip(net.delta_steps, stats, strict=True):
        filt = next((f for f in s.filters if f is not None), None)
        gran = getattr(filt, "granules", 0) if filt is not None else 0
        if gran:
            out.append(float(getattr(filt, "forwarded", 0)) / gran)
        else:
            out.append(float(row["active_in"]))
    return out


def run_pass(net: Any, frames: Sequence[torch.Tensor], pct: float, mode: str, tick: Tick | None = None
             ) -> tuple[list[dict[str, float]], float, list[float]]:
    """Seed on frames[0], run frames[1:] at `pct` with every unit in `mode`.

    Returns per unit {active_in, work (means), ms (median: robust to other processes' interference)} over the
    delta frames, the median whole-network ms per delta frame (units plus the network's own per-frame work: input
    delta, outputs), and the per-unit ms of the seeding (dense) frame.
    """
    net.reset()
    net.filter_pct = pct
    set_all_modes(net, mode)
    net(frames[0])
    seed_ms = [float(r["ms"]) for r in net.last_stats]
    rows: list[list[tuple[float, float, float]]] = [[] for _ in seed_ms]
    totals = []
    for x in frames[1:]:
        t0 = time.perf_counter()
        net(x)
        totals.append((time.perf_counter() - t0) * 1e3)
        stats = net.last_stats
        for r, row, w in zip(rows, stats, _work_fractions(net, stats), strict=True):
            r.append((float(row["active_in"]), w, float(row["ms"])))
        if tick:
            tick(f"{mode} @ {pct:g}%")
    out = [{"active_in": statistics.fmean(a for a, _, _ in r), "work": statistics.fmean(w for _, w, _ in r),
            "ms": statistics.median(t for _, _, t in r)} for r in rows]
    return out, statistics.median(totals), seed_ms


def boundary_costs(shapes: Sequence[Sequence[int]], fractions: Sequence[float] = (0.01, 0.1, 0.5, 1.0),
                   repeats: int = 3) -> dict[str, dict[str, list[float]]]:
    """Per 4-D shape 'NxCxHxW': ms of dense tensor -> PixelDelta ('to_pixels') and PixelDelta -> dense
    ('to_dense') at the given active fractions (clustered: a band of rows), median of `repeats`."""
    out: dict[str, dict[str, list[float]]] = {}
    for shape in {tuple(int(v) for v in s) for s in shapes if len(s) == 4}:
        n, c, h, w = shape
        to_pix, to_den = [], []
        for f in fractions:
            t = torch.zeros(shape)
            rows = max(1, round(h * f))
            t[:, :, :rows] = torch.randn(n, c, rows, w)
            to_pix.append(_median_ms(lambda t=t: PixelDelta.from_dense(t), repeats))
            d = PixelDelta.from_dense(t)
            to_den.append(_median_ms(lambda d=d: d.to_dense(), repeats))
        out["x".join(map(str, shape))] = {"fractions": list(fractions), "to_pixels": to_pix, "to_dense": to_den}
    return out


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return sorted(ts)[len(ts) // 2]


def profile_network(net: Any, frames: Sequence[torch.Tensor], key: ProfileKey,
                    pcts: Sequence[float] = PCTS, tick: Tick | None = None) -> Profile:
    """Profile a converted network on real frames (>= 2; the first seeds). Dense mode is profiled only when the
    network supports per-unit modes; otherwise each unit's dense cost is its seeding time (noted in meta)."""
    if len(frames) < 2:
        raise ValueError("profiling needs at least 2 frames")
    graph = unit_graph(net)
    modes = MODES if supports_modes(net) else ("delta",)
    per: dict[str, dict[float, list[dict[str, float]]]] = {m: {} for m in modes}
    frame_ms: dict[str, dict[str, float]] = {m: {} for m in modes}
    seed_ms: list[float] = []
    with torch.inference_mode():
        for p in pcts:
            for m in modes:
                rows, ms, seed = run_pass(net, frames, float(p), m, tick)
                per[m][float(p)] = rows
                frame_ms[m][f"{float(p):g}"] = ms
                seed_ms = seed_ms or seed
    set_all_modes(net, "auto")
    units = []
    for i, g in enumerate(graph):
        points = []
        for p in pcts:
            d = per["delta"][float(p)][i]
            dense_ms = per["dense"][float(p)][i]["ms"] if "dense" in per else seed_ms[i]
            points.append({"pct": float(p), "active_in": d["active_in"], "work": d["work"],
                           "delta_ms": d["ms"], "dense_ms": dense_ms})
        units.append({**g, "seed_ms": seed_ms[i], "points": points})
    overhead = {m: {f"{float(p):g}": frame_ms[m][f"{float(p):g}"] - sum(r["ms"] for r in per[m][float(p)])
                    for p in pcts} for m in modes}
    meta = {"frames": len(frames), "dense_mode": "measured" if "dense" in per else "seed frame (no mode API)",
            "overhead_ms": overhead}
    bnd = boundary_costs([g["shape"] for g in graph])
    return Profile(key, fingerprint(), [float(p) for p in pcts], units, bnd, frame_ms, meta)
