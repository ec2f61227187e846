"""End-to-end benchmark: delta inference vs the fastest dense engine on real video, speed and error together.

For each video, the same decoded frames (consecutive, at the video's own rate unless --fps is given) run through
the dense engine (ONNX Runtime by default) and through the delta engine at each filtering percentage. Time is the
engine's per-frame time from decoded frame to detections (pre-processing, network, post-processing). Error is the
weighted AP@0.5 of the delta detections against the dense detections of the same frames (DESIGN.md). The speed-up
is measured in the same run, same threads, same frames.

Per video it also measures the delta engine's fixed costs on the clip's first frame (`measure_overhead`): an empty
frame (the same frame again: nothing to propagate) against a dense frame, decoded RGB to detections, and the
cost of a frame in which one input pixel changed by half the input range, divided by the units that ran (the change
spreads with depth, so this includes real work), the cost of a unit visited and skipped (all inputs unchanged), and
the framework overhead per unit (`unit_pixel_times`: each unit, filters included, on 1- and 3-pixel deltas; the fixed
cost is the intercept).
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext
from deluceva.engine import Engine, EngineConfig
from deluceva.eval.metrics import weighted_ap50
from deluceva.threads import use_threads
from deluceva.video import open_source
from deluceva.zoo.base import Detections, Detector
from deluceva.zoo.registry import load_model


def _decode(video: Path, frames: int, fps: float | None):
    with open_source(str(video), fps=fps, max_frames=frames) as src:
        return list(src)


def _run(engine: Engine, frames, pcts: list[float] | None = None
         ) -> tuple[list[Detections], list[float], list[str], list[list[dict]]]:
    """Detections, ms, modes and unit stats per frame; `pcts` (if given) gets the percentage of every delta frame."""
    dets, ms, modes, units = [], [], [], []
    for f in frames:
        rec = engine.process(f)
        dets.append(Detections.from_records(rec["detections"]))
        ms.append(rec["ms"])
        modes.append(rec["mode"])
        units.append(engine.last_unit_stats)
        if pcts is not None and rec["mode"] == "delta":
            pcts.append(rec["filter_pct"])
    return dets, ms, modes, units


def _unit_breakdown(units: list[list[dict]]) -> list[dict]:
    """Mean time, active fraction and share of frames run in the unit's dense form, per unit, over the delta frames."""
    per: dict[str, dict] = {}
    for frame_units in units:
        for u in frame_units:
            p = per.setdefault(u.get("name", "?"), {"name": u.get("name"), "kind": u.get("kind"), "ms": [],
                                                     "active_in": [], "dense": []})
            p["ms"].append(u.get("ms", 0.0))
            p["active_in"].append(u.get("active_in", float("nan")))
            p["dense"].append(u.get("mode", "dense" if u.get("dense") else "delta") == "dense")
    return [{"name": p["name"], "kind": p["kind"], "ms": statistics.fmean(p["ms"]),
             "active_in": float(np.nanmean(p["active_in"])), "dense_share": statistics.fmean(p["dense"])}
            for p in per.values()]


def _ms(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _ms2(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall ms, this thread's CPU ms) of one call: CPU time is robust to other processes on a shared machine."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - t0) * 1e3, (time.thread_time() - c0) * 1e3


def _ran(net) -> int:
    """Units that ran in the network's last frame (an input delta after its filter)."""
    return sum(1 for s in net.delta_steps if any(d is not None for d in s.last_in))


def _unit_call_us(step, shapes: list[tuple], pixels: int, g: torch.Generator, repeats: int, batches: int
                  ) -> float | None:
    """Time (us) of one call of a step's filters + unit on deltas of `pixels` active pixels spread along the middle
    row of every varying input (random rows of 0.1 std, alternately + and -, so the state returns); best of
    `batches` batches of `repeats` calls. None when the unit does not take such deltas."""
    pairs = []
    for n, c, h, w in shapes:
        idx = torch.tensor([(h // 2) * w + (k + 1) * w // (pixels + 1) for k in range(pixels)])
        v = 0.1 * torch.randn(pixels, c, generator=g)
        pairs.append((PixelDelta(idx, v, (n, c, h, w)), PixelDelta(idx, -v, (n, c, h, w))))
    filters = step.filters or [None] * len(pairs)
    unit = step.unit

    def call(sign: int) -> None:
        ins = [p[sign] if f is None else f(p[sign]) for f, p in zip(filters, pairs, strict=True)]
        if any(d is not None for d in ins):
            unit(*ins)

    try:
        for i in range(20):
            call(i % 2)
    except (TypeError, ValueError, RuntimeError):  # a unit whose inputs are not all pixel deltas
        return None
    best = float("inf")
    for _ in range(batches):
        t0 = time.perf_counter()
        for i in range(repeats):
            call(i % 2)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6


def unit_pixel_times(net, repeats: int = 200, batches: int = 7) -> list[dict]:
    """Framework overhead per unit. Every unit whose inputs are 4-D runs, through its filters as in the network, on
    a delta of 1 and of 3 active pixels (apart on the middle row) on each varying input. us: the time of the
    1-pixel call (best of `batches` batches of `repeats` calls: the floor under this machine's noise); fixed_us:
    the intercept of time against pixels, us - (us_3 - us) / 2 clipped to [0, us], i.e. the call's cost without its
    arithmetic (one pixel of a 3x3 conv with 256 channels is ~0.6 M multiply-adds; max-pool windows of the 3 pixels
    can overlap, so its intercept is rough). The network must be seeded; its state is
    disturbed (measure on a throw-away network). Rows: {name, kind, us, us_3, fixed_us}."""
    g = torch.Generator().manual_seed(0)
    rows = []
    for step in net.delta_steps:
        shapes = [BuildContext.shape(n) for n in step.unit.var_nodes]
        if not shapes or any(s is None or len(s) != 4 for s in shapes):
            continue
        one = _unit_call_us(step, shapes, 1, g, repeats, batches)
        three = _unit_call_us(step, shapes, 3, g, repeats, batches) if one is not None else None
        if one is None or three is None:
            continue
        rows.append({"name": step.unit.name, "kind": step.unit.kind, "us": one, "us_3": three,
                     "fixed_us": min(one, max(0.0, one - (three - one) / 2))})
    return rows


def measure_overhead(det: Detector, imgsz: str | None, rgb: np.ndarray, threads: int, dense_engine: str,
                     repeats: int = 15, small: int = 16) -> dict:
    """Fixed costs of the delta engine on one decoded frame (medians over `repeats`, dense and delta interleaved).

    empty_ms: Engine.infer of the same frame again (nothing changed: no unit runs, the previous detections are
    reused) vs dense_ms: the dense engine's infer of the frame (wall clock; *_cpu_ms: the calling thread's CPU time,
    which other processes do not inflate); preprocess_ms: the detector's pre-processing alone.
    one_pixel_ms: the delta network on a frame where one input pixel changed by half the input range (alternately up
    and back), units_ran of units_total ran: unit_overhead_us = one_pixel_ms / units_ran (includes their compute: the
    change spreads with depth); small_unit_us: median time of the units that ran on <= `small` active pixels (mostly
    overhead); skipped_unit_us: per unit, a frame that visits every unit and skips it minus one that skips the loop.
    """
    dense = Engine(det, EngineConfig(mode="dense", imgsz=imgsz, threads=threads, dense_engine=dense_engine))
    delta = Engine(det, EngineConfig(mode="delta", imgsz=imgsz, threads=threads, plan="delta"))  # the units
    hw = dense.ensure_prepared(rgb.shape[:2])
    delta.ensure_prepared(rgb.shape[:2])
    dense.infer(rgb)
    delta.infer(rgb)  # seeds the state
    dense_ms, empty_ms, pre_ms, modes = [], [], [], set()
    for _ in range(repeats):
        dense_ms.append(_ms2(lambda: dense.infer(rgb)))
        empty_ms.append(_ms2(lambda: modes.add(delta.infer(rgb)[1])))
        pre_ms.append(_ms(lambda: det.preprocess(rgb, hw)))
    net = delta.delta_network
    idle = not net.last_changed
    x, _ = det.preprocess(rgb, hw)
    y = x.clone()
    y[0, :, hw[0] // 2, hw[1] // 2] += 0.5 * 255.0 * float(getattr(det, "input_scale", 1 / 255))
    steps = net.delta_steps
    one_ms, ran, small_us = [], [], []
    with torch.inference_mode():
        net.reset()
        net(x)
        for i in range(2 * repeats):
            one_ms.append(_ms(lambda i=i: net(y if i % 2 == 0 else x)))
            ran.append(_ran(net))
            small_us += [s.ms * 1e3 for s in steps if s.last_in and s.last_in[0] is not None
                         and 0 < getattr(s.last_in[0], "active", small + 1) <= small]
        net(x)
        loop_ms, skip_ms = [], []
        for _ in range(repeats):
            net.idle_shortcut = False
            loop_ms.append(_ms(lambda: net(x)))
            net.idle_shortcut = True
            skip_ms.append(_ms(lambda: net(x)))
    # per unit on 1 and 3 pixels as in a filtered run (float32 state, filters selecting; 0.001% holds nothing back)
    filtered = Engine(det, EngineConfig(mode="delta", imgsz=imgsz, threads=threads, plan="delta", filter_pct=1e-3))
    filtered.ensure_prepared(rgb.shape[:2])
    filtered.infer(rgb)
    with torch.inference_mode():
        per_unit = unit_pixel_times(filtered.delta_network)
    unit_us = [r["us"] for r in per_unit]
    fixed_us = [r["fixed_us"] for r in per_unit]
    one, n_ran = statistics.median(one_ms), statistics.median(ran)
    (e_ms, e_cpu), (d_ms, d_cpu) = ([statistics.median(t[i] for t in v) for i in (0, 1)] for v in (empty_ms, dense_ms))
    return {"repeats": repeats, "empty_ms": e_ms, "dense_ms": d_ms, "empty_ratio": e_ms / d_ms,
            "empty_cpu_ms": e_cpu, "dense_cpu_ms": d_cpu, "empty_ratio_cpu": e_cpu / max(d_cpu, 1e-9),
            "empty_idle": idle, "empty_modes": sorted(modes), "preprocess_ms": statistics.median(pre_ms),
            "one_pixel_ms": one, "units_ran": n_ran, "units_total": len(steps),
            "unit_overhead_us": one * 1e3 / max(1.0, n_ran),
            "small_unit_us": statistics.median(small_us) if small_us else None, "small_pixels": small,
            "skipped_unit_us": max(0.0, statistics.median(loop_ms) - statistics.median(skip_ms)) * 1e3
            / max(1, len(steps)),
            "unit_pixel_us_mean": statistics.mean(unit_us) if unit_us else None,
            "unit_pixel_us_median": statistics.median(unit_us) if unit_us else None,
            "unit_fixed_us_mean": statistics.mean(fixed_us) if fixed_us else None,
            "unit_fixed_us_median": statistics.median(fixed_us) if fixed_us else None,
            "unit_pixel_units": len(unit_us), "unit_pixel": per_unit}


def overhead_line(o: dict) -> str:
    """One printed line for a `measure_overhead` result."""
    small = f"{o['small_unit_us']:.0f}" if o["small_unit_us"] is not None else "-"
    return (f"{o['model']} {o['imgsz']} {o['video']} {o['threads']} thr: empty frame {o['empty_ms']:.2f} ms vs dense "
            f"{o['dense_ms']:.2f} ms = {o['empty_ratio']:.1%} (CPU time: {o['empty_cpu_ms']:.2f} vs "
            f"{o['dense_cpu_ms']:.2f} ms = {o['empty_ratio_cpu']:.1%}; pre-processing {o['preprocess_ms']:.2f} ms); "
            f"one-pixel frame {o['one_pixel_ms']:.1f} ms / {o['units_ran']:g} of {o['units_total']} units = "
            f"{o['unit_overhead_us']:.0f} us/unit (units on <= {o['small_pixels']} pixels: median {small} us); "
            f"skipped unit {o['skipped_unit_us']:.1f} us; per unit, filters included, {o['unit_pixel_units']} units: "
            f"one-pixel delta mean {o['unit_pixel_us_mean']:.1f} us (median {o['unit_pixel_us_median']:.1f}), "
            f"framework overhead (fixed cost: intercept over 1 and 3 pixels) mean {o['unit_fixed_us_mean']:.1f} us "
            f"(median {o['unit_fixed_us_median']:.1f})")


def run_delta_benchmark(model: str, imgsz: str | None, videos: list[Path], frames: int, fps: float | None,
                        filters: list[float], threads: int, refresh_every: int | None, dense_engine: str,
                        out: Path, console: Console, progress_factory, overhead: bool = True,
                        relative_floor: float = 0.0, plan: str = "auto", filter_of: str = "changes",
                        error_target: float | None = None, probe_every: int = 10) -> dict:
    """Run the benchmark (see module docs); relative_floor, plan, filter_of, error_target and probe_every are the
    delta engine's (EngineConfig; with an error target each filter is the controller's starting percentage, and the
    row adds the mean percentage of the delta frames and the number of probes)."""
    use_threads(threads)
    det = load_model(model)
    rows: list[dict] = []
    overheads: list[dict] = []
    with progress_factory() as bar:
        task = bar.add_task("delta benchmark", total=len(videos) * (1 + len(filters) + overhead), rate="")
        for video in videos:
            clip = _decode(video, frames, fps)
            dense = Engine(det, EngineConfig(mode="dense", imgsz=imgsz, threads=threads, dense_engine=dense_engine))
            ref, dense_ms, _, _ = _run(dense, clip)
            bar.update(task, advance=1)
            hw = dense.input_hw_for(clip[0].rgb.shape[:2])
            if overhead:
                o = measure_overhead(det, imgsz, clip[0].rgb, threads, dense_engine)
                overheads.append({"model": model, "imgsz": f"{hw[1]}x{hw[0]}", "video": video.name,
                                  "threads": threads, "dense_engine": dense_engine, **o})
                bar.update(task, advance=1)
            base = {"model": model, "imgsz": f"{hw[1]}x{hw[0]}", "video": video.name, "frames": len(clip),
                    "threads": threads, "dense_engine": dense_engine, "dense_ms_mean": statistics.fmean(dense_ms),
                    "dense_ms_median": statistics.median(dense_ms)}
            for pct in filters:
                eng = Engine(det, EngineConfig(mode="delta", imgsz=imgsz, threads=threads, filter_pct=pct,
                                               refresh_every=refresh_every, relative_floor=relative_floor,
                                               plan=plan, filter_of=filter_of, error_target=error_target,
                                               probe_every=probe_every))
                used: list[float] = []
                got, ms, modes, units = _run(eng, clip, used)
                ctl = {}
                if error_target is not None:
                    ctl = {"error_target": error_target, "probe_every": probe_every,
                           "mean_filter_pct": statistics.fmean(used) if used else None,
                           "probes": len(eng.errors_measured),
                           "probe_errors": [round(e, 4) for e in eng.errors_measured]}
                steady = ms[1:] or ms  # the first frame seeds the state densely
                rows.append({**base, "filter_pct": pct, "filter_of": filter_of, "relative_floor": relative_floor,
                             "plan": plan,
                             "delta_ms_mean": statistics.fmean(ms),
                             "delta_ms_median": statistics.median(steady),
                             "speedup_mean": statistics.fmean(dense_ms) / statistics.fmean(ms),
                             "map50_vs_dense": weighted_ap50(ref, got),
                             "refresh_frames": modes.count("refresh"), **ctl,
                             "units": _unit_breakdown(units[1:])})
                bar.update(task, advance=1)
    _print_table(rows, console)
    for o in overheads:
        console.print("overhead: " + overhead_line(o))
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "time": "engine ms per frame: pre-processing + network + post-processing", "fps": fps}
    result = {"meta": meta, "rows": rows, "overhead": overheads}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result


def _print_table(rows: list[dict], console: Console) -> None:
    t = Table(title="Delta vs dense, end to end (ms/frame, mean over the clip; same frames, same threads)")
    controlled = any("error_target" in r for r in rows)
    for c in ("model", "imgsz", "video", "frames", "thr", "filter %", "rel. floor", "dense ms", "delta ms", "speed-up",
              "mAP@0.5 vs dense", "refreshes"):
        t.add_column(c, justify="right")
    for r in rows:
        pct = f"{r['filter_pct']:g}"
        if controlled and r.get("mean_filter_pct") is not None:  # start -> mean over the delta frames
            pct = f"{r['filter_pct']:g} -> {r['mean_filter_pct']:.0f}"
        t.add_row(r["model"], r["imgsz"], r["video"], str(r["frames"]), str(r["threads"]), pct,
                  f"{r.get('relative_floor', 0.0):g}", f"{r['dense_ms_mean']:.1f}", f"{r['delta_ms_mean']:.1f}",
                  f"{r['speedup_mean']:.2f}x", f"{r['map50_vs_dense']:.3f}", str(r["refresh_frames"]))
    console.print(t)
