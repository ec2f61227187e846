"""End-to-end benchmark: delta inference vs the fastest dense engine on real video, speed and error together.

For each video, the same decoded frames (consecutive, at the video's own rate unless --fps is given) run through
the dense engine (ONNX Runtime by default) and through the delta engine at each filtering percentage. Time is the
engine's per-frame time from decoded frame to detections (pre-processing, network, post-processing). Error is the
weighted AP@0.5 of the delta detections against the dense detections of the same frames (DESIGN.md). The speed-up
is measured in the same run, same threads, same frames.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from deluceva.engine import Engine, EngineConfig
from deluceva.eval.metrics import weighted_ap50
from deluceva.video import open_source
from deluceva.zoo.base import Detections
from deluceva.zoo.registry import load_model


def _decode(video: Path, frames: int, fps: float | None):
    with open_source(str(video), fps=fps, max_frames=frames) as src:
        return list(src)


def _run(engine: Engine, frames) -> tuple[list[Detections], list[float], list[str], list[list[dict]]]:
    dets, ms, modes, units = [], [], [], []
    for f in frames:
        rec = engine.process(f)
        dets.append(Detections.from_records(rec["detections"]))
        ms.append(rec["ms"])
        modes.append(rec["mode"])
        units.append(engine.last_unit_stats)
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


def run_delta_benchmark(model: str, imgsz: str | None, videos: list[Path], frames: int, fps: float | None,
                        filters: list[float], threads: int, refresh_every: int | None, dense_engine: str,
                        out: Path, console: Console, progress_factory) -> dict:
    torch.set_num_threads(threads)
    det = load_model(model)
    rows: list[dict] = []
    with progress_factory() as bar:
        task = bar.add_task("delta benchmark", total=len(videos) * (1 + len(filters)), rate="")
        for video in videos:
            clip = _decode(video, frames, fps)
            dense = Engine(det, EngineConfig(mode="dense", imgsz=imgsz, threads=threads, dense_engine=dense_engine))
            ref, dense_ms, _, _ = _run(dense, clip)
            bar.update(task, advance=1)
            hw = dense.input_hw_for(clip[0].rgb.shape[:2])
            base = {"model": model, "imgsz": f"{hw[1]}x{hw[0]}", "video": video.name, "frames": len(clip),
                    "threads": threads, "dense_engine": dense_engine, "dense_ms_mean": statistics.fmean(dense_ms),
                    "dense_ms_median": statistics.median(dense_ms)}
            for pct in filters:
                eng = Engine(det, EngineConfig(mode="delta", imgsz=imgsz, threads=threads, filter_pct=pct,
                                               refresh_every=refresh_every))
                got, ms, modes, units = _run(eng, clip)
                steady = ms[1:] or ms  # the first frame seeds the state densely
                rows.append({**base, "filter_pct": pct, "delta_ms_mean": statistics.fmean(ms),
                             "delta_ms_median": statistics.median(steady),
                             "speedup_mean": statistics.fmean(dense_ms) / statistics.fmean(ms),
                             "map50_vs_dense": weighted_ap50(ref, got),
                             "refresh_frames": modes.count("refresh"),
                             "units": _unit_breakdown(units[1:])})
                bar.update(task, advance=1)
    _print_table(rows, console)
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "time": "engine ms per frame: pre-processing + network + post-processing", "fps": fps}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"wrote {out}")
    return {"meta": meta, "rows": rows}


def _print_table(rows: list[dict], console: Console) -> None:
    t = Table(title="Delta vs dense, end to end (ms/frame, mean over the clip; same frames, same threads)")
    for c in ("model", "imgsz", "video", "frames", "thr", "filter %", "dense ms", "delta ms", "speed-up",
              "mAP@0.5 vs dense", "refreshes"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], r["imgsz"], r["video"], str(r["frames"]), str(r["threads"]), f"{r['filter_pct']:g}",
                  f"{r['dense_ms_mean']:.1f}", f"{r['delta_ms_mean']:.1f}", f"{r['speedup_mean']:.2f}x",
                  f"{r['map50_vs_dense']:.3f}", str(r["refresh_frames"]))
    console.print(t)
