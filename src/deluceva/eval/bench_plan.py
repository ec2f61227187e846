"""Mixed-plan benchmark (issue 5): the planned network (plan=auto) vs all units dense, all units delta and the fastest
dense engine (ONNX Runtime), end to end on the shipped videos.

Per (model, input size, threads, video, filtering percentage) the same decoded frames run through four engines, in
one of three schedules (`SCHEDULES`; the mixed engine and the ORT engine share one ONNX Runtime session):
  frame  interleaved frame by frame (a seeded random order every frame), so that load changes on a shared machine
         hit all engines alike; the default with 1 thread.
  block  the engines take turns over blocks of BLOCK_FRAMES consecutive frames (a seeded random order per block);
         the default with more threads: there, an engine that follows another pays for the other runtime's thread
         pool still spinning on the cores (PyTorch's OpenMP workers after a PyTorch engine slowed the next ONNX
         Runtime frame of YOLOX-Nano 416 from ~10 to ~15 ms), a cost that a deployed engine, running alone, does not
         pay: blocks pay it once per block, yet spread the machine's drift (2 threads on this VM: up to ~2x over
         seconds, docs/architecture.md "Threads") over all engines alike.
  clip   each engine runs the whole clip, the engines in a seeded random order per repeat (a block of the whole clip).
  mixed      Engine(mode=delta, plan=auto): this machine's profile -> plan bands (units | ort) + per-frame guard
  all-dense  Engine(mode=delta, plan=dense): every unit in its dense (torch) form
  all-delta  Engine(mode=delta, plan=delta): every unit in its delta form
  ort        Engine(mode=dense, dense_engine=onnxruntime)
Time is the engine's per-frame time from decoded frame to detections (pre-processing, network, post-processing).
Per frame the median over repeats is taken, then mean and median over frames. Predictions: the plan band's
profile prediction (mean ms per frame incl. re-seeds, or the dense engine's) and the guard's per-frame predictions,
against the mixed network's measured network time. Exposure swings: frames where nearly everything changes
(`swing_positions`); per such frame mixed ms / ort ms.
A missing or stale profile is made first (`deluceva profile` defaults, on the person video), one per input size
(`--imgsz native`: each video's own size).
"""

from __future__ import annotations

import json
import platform
import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deluceva.engine import Engine, EngineConfig
from deluceva.eval.metrics import weighted_ap50
from deluceva.eval.plan_plot import MAX_PANELS, plot_timelines
from deluceva.plan import CostModel, ProfileKey, make_planset, timemodel
from deluceva.plan.profiler import unit_sizes, work_fractions
from deluceva.plan.session import DEFAULT_VIDEO, find_profile, profile_model
from deluceva.plan.store import Profile, default_profile_path
from deluceva.video import open_source
from deluceva.zoo.base import Detections
from deluceva.zoo.registry import load_model

ENGINES = ("mixed", "all-dense", "all-delta", "ort")
SWING_LEVEL, SWING_SHARE = 3.0, 0.3  # exposure-swing frames: >= 30% of pixels change by > 3 grey levels (on
# car-detection.mp4 typically 0.05% of pixels change by more than 3 levels between frames, 30-96% in its swings)


def decode(video: Path, frames: int, start: float = 0.0) -> list[Any]:
    """`frames` consecutive decoded frames of `video` from `start` seconds."""
    with open_source(str(video), start=start, max_frames=frames) as src:
        return list(src)


def swing_positions(clip: Sequence[Any], level: float = SWING_LEVEL, share: float = SWING_SHARE) -> list[int]:
    """Positions in `clip` where nearly everything changes: at least `share` of the pixels differ from the previous
    frame by more than `level` grey levels (max over channels)."""
    out = []
    for i in range(1, len(clip)):
        d = np.abs(clip[i].rgb.astype(np.int16) - clip[i - 1].rgb.astype(np.int16)).max(axis=2)
        if (d > level).mean() >= share:
            out.append(i)
    return out


def ensure_profile(model: str, imgsz: str | None, threads: int, frames: int, reprofile: bool, console: Console,
                   progress_factory: Any) -> Profile:
    """This machine's fresh profile for (model, size, threads) from the default cache; made when missing or stale."""
    det = load_model(model)
    with open_source(str(DEFAULT_VIDEO), max_frames=1) as src:
        hw = det.input_hw(imgsz, src.source_hw)
    key = ProfileKey(det.name, (int(hw[0]), int(hw[1])), threads)
    prof, reasons = find_profile(key)
    if prof is not None and not reasons and not reprofile and prof.meta.get("dense_engine"):
        return prof
    with progress_factory(transient=True) as bar:
        def start(total: int):  # noqa: ANN202
            task = bar.add_task(f"profile {model} {hw[1]}x{hw[0]} t{threads}", total=total, rate="")
            return lambda desc: bar.update(task, advance=1, rate=desc)

        prof, path = profile_model(model, imgsz, threads, DEFAULT_VIDEO, frames, out=default_profile_path(key),
                                   progress=start)
    console.print(f"profiled {model} {hw[1]}x{hw[0]} {threads} thread(s): {path}")
    return prof


def _engines(det: Any, imgsz: str | None, threads: int, pct: float, ort: Engine, relative_floor: float = 0.0,
             coherence: float = EngineConfig.coherence) -> dict[str, Engine]:
    def delta(plan: str) -> Engine:
        return Engine(det, EngineConfig(mode="delta", imgsz=imgsz, threads=threads, filter_pct=pct, plan=plan,
                                        relative_floor=relative_floor, coherence=coherence))

    mixed = delta("auto")
    mixed.share_dense_engine(ort)  # one ONNX Runtime thread pool: with 2 threads, two pools spinning share 2 cores
    return {"mixed": mixed, "all-dense": delta("dense"), "all-delta": delta("delta"), "ort": ort}


def cost_model_ms(engine: Engine, cost: CostModel, pct: float) -> float | None:
    """The cost model's ms for the delta frame `engine` just ran, from each unit's mode and work fraction in it
    (CostModel.predict_frame); None when the frame was not a delta frame."""
    if getattr(engine, "last_plan_info", {}).get("decision") != "delta" or not engine.last_unit_stats:
        return None
    net, stats = engine.delta_network, engine.last_unit_stats
    counts = timemodel.unit_counts(stats, unit_sizes(net))
    ran = {row["name"]: (row["mode"], w, c)
           for row, w, c in zip(stats, work_fractions(net, stats), counts, strict=True)}
    return cost.predict_frame(ran, pct)


SCHEDULES = ("frame", "block", "clip")
BLOCK_FRAMES = 10


def default_schedule(threads: int) -> str:
    """'frame' with 1 thread, 'block' with more (module docs)."""
    return "frame" if threads == 1 else "block"


def run_order(schedule: str, engines: Sequence[str], frames: int, seed: int) -> list[tuple[str, int]]:
    """(engine, frame position) pairs in the order `schedule` runs them (module docs): every engine sees every frame
    once and its frames in order."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    block = {"frame": 1, "block": BLOCK_FRAMES, "clip": max(1, frames)}[schedule]
    rng = np.random.default_rng(seed)
    order = []
    for b0 in range(0, frames, block):
        for name in rng.permutation(list(engines)):
            order += [(str(name), i) for i in range(b0, min(frames, b0 + block))]
    return order


def run_cell(det: Any, clip: Sequence[Any], imgsz: str | None, threads: int, pct: float, repeats: int,
             ort: Engine, cost: CostModel, tick: Any = None, schedule: str = "frame", relative_floor: float = 0.0,
             coherence: float = EngineConfig.coherence) -> dict[str, Any]:
    """Runs of the four engines over `clip` at `pct` in `schedule` order (module docs); per engine per frame ms
    (median over repeats), the mixed engine's per-frame info (first repeat, with the cost model's ms of its delta
    frames) and detections (first repeat). tick: called once per frame and engine run."""
    ms: dict[str, list[list[float]]] = {e: [[] for _ in clip] for e in ENGINES}
    info: list[dict[str, Any]] = []
    dets: dict[str, list[Detections]] = {e: [] for e in ENGINES}
    for r in range(repeats):
        engines = _engines(det, imgsz, threads, pct, ort, relative_floor, coherence)
        for eng in engines.values():
            eng.ensure_prepared(clip[0].rgb.shape[:2])
        for name, i in run_order(schedule, list(engines), len(clip), r):
            eng = engines[name]
            rec = eng.process(clip[i])
            ms[name][i].append(rec["ms"])
            if r == 0:
                dets[name].append(Detections.from_records(rec["detections"]))
                if name == "mixed":
                    info.append({**getattr(eng, "last_plan_info", {}), "mode": rec["mode"], "ms": rec["ms"],
                                 "cost_ms": cost_model_ms(eng, cost, pct)})
            if tick:
                tick()
    per_frame = {e: [statistics.median(v) for v in ms[e]] for e in ENGINES}
    return {"per_frame": per_frame, "info": info, "dets": dets,
            "note": engines["mixed"].plan_note}


def machine_drift(ort_ms_now: float, ort_ms_profiled: float | None) -> float | None:
    """How much slower this machine runs now than when the profile was made: the dense engine's (ONNX Runtime's)
    network ms per frame measured in this run over the profile's (content-independent: the same model on any frame).
    On this 2-core VM the same delta frames measure up to ~30% apart minutes apart, so a prediction from a profile
    taken in a faster minute reads low against a slower one's measurement; multiplying predicted / measured by this
    factor compares them at one machine speed. None without the profile's dense-engine time."""
    return ort_ms_now / ort_ms_profiled if ort_ms_profiled else None


def summarise(cell: dict[str, Any], clip: Sequence[Any], cost: CostModel, pct: float) -> dict[str, Any]:
    """Row of the result table from one cell (see module docs)."""
    pf, info = cell["per_frame"], cell["info"]
    steady = slice(1, None)  # frame 0 seeds every delta engine (and warms ONNX Runtime's caches)
    mean = {e: statistics.fmean(pf[e][steady]) for e in ENGINES}
    med = {e: statistics.median(pf[e][steady]) for e in ENGINES}
    others = [e for e in ENGINES if e != "mixed"]
    plans = make_planset(cost.profile)
    band = plans.for_pct(pct)
    net = [i["net_ms"] for i in info[steady]]
    pred = [i["predicted_ms"] for i in info[steady] if i.get("predicted_ms") is not None]
    by_cost = [(i["cost_ms"], i["net_ms"]) for i in info[steady] if i.get("cost_ms") is not None]
    # ONNX Runtime's network time: its end-to-end time minus pre/post-processing (the same in the mixed engine)
    ort_net = mean["ort"] - statistics.fmean(i["ms"] - i["net_ms"] for i in info[steady])
    rel = None  # prediction relative to ONNX Runtime (cancels the load difference between profiling and now)
    if band.dense_ms:
        rel = (band.predicted_ms / band.dense_ms) / (statistics.fmean(net) / ort_net)
    cost_ratio = (statistics.fmean(c for c, _ in by_cost) / statistics.fmean(m for _, m in by_cost)
                  if by_cost else None)
    drift = machine_drift(ort_net, cost.dense_engine_ms())
    swings = swing_positions(clip)
    sw_ratio = [pf["mixed"][i] / pf["ort"][i] for i in swings]
    ref = cell["dets"]["ort"]
    return {
        "filter_pct": pct, "frames": len(clip),
        "ms_mean": mean, "ms_median": med,
        "ratio_mean": mean["mixed"] / min(mean[e] for e in others),
        "ratio_median": med["mixed"] / min(med[e] for e in others),
        "band": {"kind": band.kind, "pct": band.pct, "predicted_ms": band.predicted_ms, "delta_ms": band.delta_ms,
                 "dense_ms": band.dense_ms},
        "mixed_net_ms_mean": statistics.fmean(net),
        "pred_plan_over_measured": band.predicted_ms / statistics.fmean(net),
        "pred_frames_over_measured": (statistics.fmean(pred) / statistics.fmean(net[-len(pred):])) if pred else None,
        "pred_rel_ort_over_measured": rel, "ort_net_ms_mean": ort_net,
        # the cost model on each delta frame's own unit modes and work fractions (mean over those frames)
        "pred_cost_over_measured": cost_ratio,
        # the same with the machine's speed now vs at profiling time factored out (`machine_drift`)
        "machine_drift": drift,
        "pred_cost_over_measured_drift": None if cost_ratio is None or drift is None else cost_ratio * drift,
        "cost_model_frames": len(by_cost),
        "predicted_uniform_ms": {"all-dense": cost.predict(cost.uniform("dense"), pct),
                                 "all-delta": cost.predict(cost.uniform("delta"), pct),
                                 "ort": cost.dense_engine_ms()},
        "decisions": dict(Counter(i["decision"] for i in info)),
        "swing_frames": len(swings),
        "swing_ratio_max": max(sw_ratio) if sw_ratio else None,
        "swing_ratio_mean": statistics.fmean(sw_ratio) if sw_ratio else None,
        "swing_over_1p1": sum(1 for v in sw_ratio if v > 1.1),
        "map50_vs_ort": {e: weighted_ap50(ref, cell["dets"][e]) for e in ("mixed", "all-delta")},
        "per_frame": {"index": [int(f.index) for f in clip], **{e: [round(v, 2) for v in pf[e]] for e in ENGINES},
                      "decision": [i["decision"] for i in info],
                      "activity": [None if i.get("activity") is None else round(i["activity"], 4) for i in info],
                      "predicted_ms": [None if i.get("predicted_ms") is None else round(i["predicted_ms"], 2)
                                       for i in info],
                      "cost_ms": [None if i.get("cost_ms") is None else round(i["cost_ms"], 2) for i in info],
                      "net_ms": [round(i["net_ms"], 2) for i in info], "swings": swings},
    }


def run_plan_benchmark(models: list[str], sizes: list[str], threads_list: list[int], filters: list[float],
                       videos: list[Path], frames: int, start: float, repeats: int, profile_frames: int,
                       reprofile: bool, out: Path, console: Console, progress_factory: Any,
                       schedule: str | None = None, relative_floor: float = 0.0,
                       coherence: float = EngineConfig.coherence) -> dict[str, Any]:
    """Run the benchmark matrix; print the table; write JSON to `out` (per-frame series included). schedule:
    one of SCHEDULES or None (per thread count: `default_schedule`). relative_floor, coherence: the delta engines'
    `EngineConfig.relative_floor` (the profile stays the one made without floors: cost/meas then reads low) and
    `EngineConfig.coherence`."""
    rows: list[dict[str, Any]] = []
    clips = {v: decode(v, frames, start) for v in videos}
    for model in models:
        det = load_model(model)
        for size in sizes:
            imgsz = None if size in ("", "default") else size
            for threads in threads_list:
                torch.set_num_threads(threads)
                prof = ensure_profile(model, imgsz, threads, profile_frames, reprofile, console, progress_factory)
                cost = CostModel(prof)
                with progress_factory() as bar:
                    total = len(videos) * len(filters) * repeats * frames * len(ENGINES)
                    sched = schedule or default_schedule(threads)
                    task = bar.add_task(f"{model} {size} t{threads}", total=total, rate="")
                    for video, clip in clips.items():
                        ort = Engine(det, EngineConfig(mode="dense", imgsz=imgsz, threads=threads,
                                                       dense_engine="onnxruntime"))
                        hw = ort.input_hw_for(clip[0].rgb.shape[:2])
                        video_cost = cost
                        if (int(hw[0]), int(hw[1])) != tuple(prof.key.hw):  # "native": each video its own size
                            video_cost = CostModel(ensure_profile(model, f"{hw[1]}x{hw[0]}", threads, profile_frames,
                                                                  reprofile, console, progress_factory))
                        for pct in filters:
                            cell = run_cell(det, clip, imgsz, threads, pct, repeats, ort, video_cost,
                                            lambda t=task: bar.update(t, advance=1), sched, relative_floor,
                                            coherence)
                            row = {"model": model, "imgsz": f"{hw[1]}x{hw[0]}", "threads": threads,
                                   "video": video.name, "schedule": sched, **summarise(cell, clip, video_cost, pct),
                                   "plan": cell["note"]}
                            rows.append(row)
    _print_table(rows, console)
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "time": "engine ms per frame: pre-processing + network + post-processing; per frame median over "
                    "repeats; frame 0 (seeding) excluded from means/medians", "repeats": repeats, "start_s": start,
            "swing": {"level": SWING_LEVEL, "share": SWING_SHARE}, "relative_floor": relative_floor,
            "coherence": coherence}
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"meta": meta, "rows": rows}
    out.write_text(json.dumps(result, indent=1))
    console.print(f"wrote {out}")
    if len(rows) <= MAX_PANELS:
        console.print(f"wrote {plot_timelines(result, out.with_suffix('.png'))} (per-frame timelines)")
    return result


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None else format(v, fmt)


def _print_table(rows: list[dict[str, Any]], console: Console) -> None:
    t = Table(title="Mixed plan vs all-dense, all-delta and ONNX Runtime (ort), end to end, ms/frame mean over "
                    "frames; mix/min = mixed / min(others) by mean (by median); pred/meas: the plan band's predicted "
                    "network ms / measured (rel. ORT: both as ratios to ONNX Runtime's); cost/meas: the cost model "
                    "on each delta frame's unit modes and work fractions / measured (x drift: times ONNX Runtime's "
                    "ms now / at profiling); swing max: worst mixed/ort "
                    "on exposure-swing frames; o/r/d: mixed frames on ONNX Runtime / re-seeds / delta; mAP@0.5 vs "
                    "ONNX Runtime")
    cols = ("model", "size", "thr", "video", "n", "filter", "band", "ort", "dense", "delta", "mixed",
            "mix/min", "(median)", "pred/meas", "rel. ORT", "cost/meas", "x drift", "swing max", "o/r/d", "mAP mix",
            "mAP delta")
    for c in cols:
        t.add_column(c, justify="right")
    for r in rows:
        m, d = r["ms_mean"], r["decisions"]
        flag = "[red]" if r["ratio_mean"] > 1.05 else ""
        t.add_row(r["model"], r["imgsz"], str(r["threads"]), r["video"][:8], str(r["frames"]), f"{r['filter_pct']:g}",
                  r["band"]["kind"], *(_f(m[e]) for e in ("ort", "all-dense", "all-delta", "mixed")),
                  f"{flag}{r['ratio_mean']:.2f}", f"{r['ratio_median']:.2f}", _f(r["pred_plan_over_measured"], ".2f"),
                  _f(r["pred_rel_ort_over_measured"], ".2f"), _f(r.get("pred_cost_over_measured"), ".2f"),
                  _f(r.get("pred_cost_over_measured_drift"), ".2f"), _f(r["swing_ratio_max"], ".2f"),
                  f"{d.get('ort', 0)}/{d.get('reseed', 0)}/{d.get('delta', 0)}", _f(r["map50_vs_ort"]["mixed"], ".2f"),
                  _f(r["map50_vs_ort"]["all-delta"], ".2f"))
    console.print(t)
