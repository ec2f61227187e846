"""Profiler: time every unit of a converted network densely and as a delta unit at several filtering percentages.

For each percentage P and each unit mode m (delta, dense) the network is reset, seeded on the first frame and run
over the remaining frames of a real clip with every unit in mode m; per unit it records the mean incoming active
fraction, the processed ("work") fraction after the unit's filter and the mean time per delta frame. Modes do not
change values (both are exact), so active fractions are the same in both passes and in any mixed plan.
Also per percentage: the whole seeding (dense re-seed) frame, a full-frame brightness change ("swing": every unit's
cost when nearly everything changes), the clip's mean input activity, and the fastest dense engine (ONNX Runtime)
on the same frames, interleaved with the passes so that load changes hit both alike.
Every (frame, unit) of the passes is also a sample of the per-frame time model (plan.timemodel), fitted per mode and
stored in meta["time_model"]: the cost of a frame from what its units did, whatever the video.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from deluceva.delta.pixels import PixelDelta
from deluceva.plan import timemodel
from deluceva.plan.guard import activity
from deluceva.plan.store import Profile, ProfileKey, fingerprint

# 0: the exact regime (float64 state, no floors: what --filter 0 runs); FILTERED_MIN: the filtered regime with
# nothing held back by the percentage (float32 state, the input floor), which any --filter > 0 runs. Interpolating
# small percentages from 0 alone priced their re-seeds ~5x and delta frames 1.3-2x what they cost.
FILTERED_MIN = 0.01
PCTS: tuple[float, ...] = (0.0, FILTERED_MIN, 50.0, 75.0, 90.0, 95.0, 98.0, 99.0, 99.5)
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


def _elements(node: Any) -> int:
    meta = node.meta.get("tensor_meta") if node is not None else None
    shape = getattr(meta, "shape", None)
    return int(math.prod(shape)) if shape is not None else 0


def unit_sizes(net: Any) -> list[tuple[int, int]]:
    """Per varying unit of a DeltaNetwork: (elements of its first varying input, elements of its output)."""
    return [(_elements(s.unit.var_nodes[0] if s.unit.var_nodes else None), _elements(_out_node(s)))
            for s in net.delta_steps]


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


def work_fractions(net: Any, stats: list[dict[str, Any]]) -> list[float]:
    """Fraction of its input granules each unit of `net` processed in the frame of `stats` (net.last_stats): after
    its filter, else the incoming active fraction. The profile's `work` axis."""
    out = []
    for s, row in zip(net.delta_steps, stats, strict=True):
        filt = next((f for f in s.filters if f is not None), None)
        gran = getattr(filt, "granules", 0) if filt is not None else 0
        if gran:
            out.append(float(getattr(filt, "forwarded", 0)) / gran)
        else:
            out.append(float(row["active_in"]))
    return out


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_pass(net: Any, frames: Sequence[torch.Tensor], pct: float, mode: str, tick: Tick | None = None,
             input_floor: float = 0.0, swing: torch.Tensor | None = None,
             seeder: Callable[[torch.Tensor], Any] | None = None) -> dict[str, Any]:
    """Seed on frames[0], run frames[1:] at `pct` with every unit in `mode`, then (if given) the `swing` frame (a
    full-frame brightness change of frames[-1]) and frames[-1] again (the change back).

    input_floor: the network's input noise floor at pct > 0 (as the engine sets it; 0 at pct = 0). seeder: seeds
    the network on a frame as the engine does (deluceva.seeding.OrtSeeder); None: the network seeds itself.
    Returns {units: per unit {active_in, work (means), ms (median: robust to other processes' interference), and
    with a swing: swing_work, swing_ms (means of the two swing frames)}, frame_ms: median whole-network ms per delta
    frame (units plus the network's own per-frame work: input delta, outputs), seed_ms: per unit ms of the seeding
    frame, seed_frame_ms: its whole-network ms (a re-seed: frames[0] is seeded twice, the stream's first seed also
    measures the filters' scales), swing_frame_ms (or None), activity: mean input activity (guard.activity
    against the previous frame) over frames[1:]}.
    """
    net.reset()
    net.filter_pct = pct
    floor = input_floor if pct > 0 else 0.0
    if hasattr(net, "config"):
        net.config.input_floor = floor
    set_all_modes(net, mode)
    (seeder or net)(frames[0])  # the stream's first seed also measures the filters' scales (once per stream) ...
    net.refresh()
    seed_frame_ms = _timed(lambda: (seeder or net)(frames[0]))  # ... the guard pays re-seeds, which keep them
    seed_ms = [float(r["ms"]) for r in net.last_stats]
    rows: list[list[tuple[float, float, float]]] = [[] for _ in seed_ms]
    totals, acts = [], []
    samples: list[tuple[int, str, tuple[float, ...], float]] = []
    frame_samples: list[tuple[float, float]] = []
    sizes = unit_sizes(net) if hasattr(net, "delta_steps") and pct > 0 else None

    def sample(stats: list[dict[str, Any]], total_ms: float) -> None:
        """The frame's (unit, kind, counts, ms) and (elements touched, ms outside the units) for the time model
        (filtered frames only: exact runs keep float64 state, another cost regime)."""
        if sizes is None or getattr(net, "last_skipped", False):
            return
        counts = timemodel.unit_counts(stats, sizes)
        for i, (row, c) in enumerate(zip(stats, counts, strict=True)):
            samples.append((i, timemodel.kind_key(row["kind"]), c, float(row["ms"])))
        frame_samples.append((timemodel.touched(counts), total_ms - sum(float(r["ms"]) for r in stats)))

    for prev, x in zip(frames[:-1], frames[1:], strict=True):
        totals.append(_timed(lambda x=x: net(x)))
        acts.append(activity(x, prev, floor))
        stats = net.last_stats
        sample(stats, totals[-1])
        for r, row, w in zip(rows, stats, work_fractions(net, stats), strict=True):
            r.append((float(row["active_in"]), w, float(row["ms"])))
        if tick:
            tick(f"{mode} @ {pct:g}%")
    units = [{"active_in": statistics.fmean(a for a, _, _ in r), "work": statistics.fmean(w for _, w, _ in r),
              "ms": statistics.median(t for _, _, t in r)} for r in rows]
    swing_frame_ms, swing_activity = None, None
    if swing is not None:
        sw: list[list[tuple[float, float]]] = [[] for _ in seed_ms]
        tot = []
        for x in (swing, frames[-1]):
            tot.append(_timed(lambda x=x: net(x)))
            stats = net.last_stats
            sample(stats, tot[-1])
            for r, row, w in zip(sw, stats, work_fractions(net, stats), strict=True):
                r.append((w, float(row["ms"])))
        swing_frame_ms = statistics.fmean(tot)
        swing_activity = activity(swing, frames[-1], floor)
        for u, r in zip(units, sw, strict=True):
            u["swing_work"] = statistics.fmean(w for w, _ in r)
            u["swing_ms"] = statistics.fmean(t for _, t in r)
    return {"units": units, "frame_ms": statistics.median(totals), "seed_ms": seed_ms,
            "seed_frame_ms": seed_frame_ms, "swing_frame_ms": swing_frame_ms, "activity": statistics.fmean(acts),
            "swing_activity": swing_activity, "samples": samples, "frame_samples": frame_samples}


def time_dense(run: Callable[[torch.Tensor], Any], frames: Sequence[torch.Tensor]) -> float:
    """Median ms per frame of a dense executor (e.g. ONNX Runtime, `deluceva.dense.make_dense`) over `frames`."""
    run(frames[0])  # warm-up
    return statistics.median(_timed(lambda x=x: run(x)) for x in frames)


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
                    pcts: Sequence[float] = PCTS, tick: Tick | None = None, *, input_floor: float = 0.0,
                    swing: torch.Tensor | None = None, dense_run: Callable[[torch.Tensor], Any] | None = None,
                    dense_engine: str = "onnxruntime", seeder: Callable[[torch.Tensor], Any] | None = None
                    ) -> Profile:
    """Profile a converted network on real frames (>= 2; the first seeds). Dense mode is profiled only when the
    network supports per-unit modes; otherwise each unit's dense cost is its seeding time (noted in meta).

    input_floor: the engine's input noise floor (network units) used at pct > 0. swing: a full-frame brightness
    change of frames[-1]; per unit and per frame its cost is recorded (the guard's prediction for exposure swings).
    dense_run: the fastest dense executor (ONNX Runtime), timed on the same frames between the passes of every
    percentage (frame_ms[dense_engine]), so that ratios come from the same run. seeder: how the engine seeds the
    network (`run_pass`); the seeding frame's time is measured through it.
    """
    if len(frames) < 2:
        raise ValueError("profiling needs at least 2 frames")
    graph = unit_graph(net)
    modes = MODES if supports_modes(net) else ("delta",)
    per: dict[str, dict[float, list[dict[str, float]]]] = {m: {} for m in modes}
    frame_ms: dict[str, dict[str, float]] = {m: {} for m in modes}
    extra: dict[str, dict[str, float]] = {"seed": {}, "swing_delta": {}, "swing_dense": {}, "activity": {},
                                          "swing_activity": {}, dense_engine: {}}
    seed_ms: list[float] = []
    samples: dict[str, list[tuple[int, str, tuple[float, ...], float]]] = {m: [] for m in modes}
    frame_samples: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    with torch.inference_mode():
        for p in pcts:
            k = f"{float(p):g}"
            if dense_run is not None:
                extra[dense_engine][k] = time_dense(dense_run, frames)
            for m in modes:
                res = run_pass(net, frames, float(p), m, tick, input_floor, swing, seeder)
                per[m][float(p)] = res["units"]
                samples[m] += res["samples"]
                frame_samples[m] += res["frame_samples"]
                frame_ms[m][k] = res["frame_ms"]
                seed_ms = seed_ms or res["seed_ms"]
                if m == modes[0]:
                    extra["seed"][k] = res["seed_frame_ms"]
                    extra["activity"][k] = res["activity"]
                    if res["swing_activity"] is not None:
                        extra["swing_activity"][k] = res["swing_activity"]
                if res["swing_frame_ms"] is not None:
                    extra[f"swing_{m}"][k] = res["swing_frame_ms"]
    set_all_modes(net, "auto")
    if hasattr(net, "config"):
        net.config.input_floor = 0.0
    units = []
    for i, g in enumerate(graph):
        points = []
        for p in pcts:
            d = per["delta"][float(p)][i]
            dn = per["dense"][float(p)][i] if "dense" in per else None
            point = {"pct": float(p), "active_in": d["active_in"], "work": d["work"],
                     "delta_ms": d["ms"], "dense_ms": dn["ms"] if dn else seed_ms[i]}
            if "swing_ms" in d:
                point.update(swing_work=d["swing_work"], swing_delta_ms=d["swing_ms"],
                             swing_dense_ms=dn["swing_ms"] if dn else seed_ms[i])
            points.append(point)
        units.append({**g, "seed_ms": seed_ms[i], "points": points})
    overhead = {m: {f"{float(p):g}": frame_ms[m][f"{float(p):g}"] - sum(r["ms"] for r in per[m][float(p)])
                    for p in pcts} for m in modes}
    if swing is not None:
        for m in modes:
            overhead[f"swing_{m}"] = {f"{float(p):g}": extra[f"swing_{m}"][f"{float(p):g}"]
                                      - sum(r["swing_ms"] for r in per[m][float(p)]) for p in pcts}
    frame_ms.update({k: v for k, v in extra.items() if v and "activity" not in k})
    meta = {"frames": len(frames), "dense_mode": "measured" if "dense" in per else "seed frame (no mode API)",
            "overhead_ms": overhead, "activity": extra["activity"], "swing_activity": extra["swing_activity"],
            "input_floor": input_floor, "seeding": "dense engine" if seeder is not None else "units",
            "dense_engine": dense_engine if dense_run is not None else None,
            "time_model": {m: timemodel.fit(v, frame_samples[m], len(graph)) for m, v in samples.items() if v}}
    bnd = boundary_costs([g["shape"] for g in graph])
    return Profile(key, fingerprint(), [float(p) for p in pcts], units, bnd, frame_ms, meta)
