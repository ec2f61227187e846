"""Executed-MAC ratio of the delta networks: sum of executed MACs / sum of dense MACs over the delta frames.

python bench/macs.py [--frames 100] [--filters 0,50,90,99] [--models yolox-nano,yolov5n,yolo-fastest-xl]
                     [--imgsz 768x448] [--out bench/results/macs.json]
Consecutive frames at each shipped video's own rate; the first frame (dense seed) is excluded.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from deluceva.convert import convert
from deluceva.video import open_source
from deluceva.zoo.registry import ZOO, load_model

VIDEOS = sorted(Path("assets/video").glob("*.mp4")) + sorted(Path("assets/video").glob("*.avi"))


def mac_ratio(model: str, video: Path, imgsz: str | None, frames: int, pct: float) -> dict:
    det = load_model(model)
    macs = dense_macs = 0
    active = []
    net = None
    with open_source(str(video), max_frames=frames) as src, torch.inference_mode():
        hw = det.input_hw(imgsz, src.source_hw)
        for i, frame in enumerate(src):
            x, _ = det.preprocess(frame.rgb, hw)
            if net is None:
                net = convert(det.network, x, filter_pct=pct)
            net(x)
            if i == 0:
                continue
            for u in net.last_stats:
                macs += u.get("macs", 0) or 0
                dense_macs += u.get("dense_macs", 0) or 0
            first = next((u for u in net.last_stats if u.get("dense_macs")), None)
            if first:
                active.append(first["active_in"])
    return {"model": model, "imgsz": f"{hw[1]}x{hw[0]}", "video": video.name, "filter_pct": pct,
            "frames": frames, "mac_ratio": macs / max(dense_macs, 1),
            "input_active": sum(active) / max(len(active), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--filters", default="0,50,90,99")
    ap.add_argument("--models", default=",".join(ZOO))
    ap.add_argument("--imgsz", default=None, help="default: each model's native size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("bench/results/macs.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [mac_ratio(m, v, args.imgsz, args.frames, float(p))
            for m in args.models.split(",") for v in VIDEOS for p in args.filters.split(",")]
    t = Table(title="Executed MACs / dense MACs (delta frames)")
    for c in ("model", "imgsz", "video", "filter %", "MAC ratio", "input active px"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["model"], r["imgsz"], r["video"], f"{r['filter_pct']:g}", f"{r['mac_ratio']:.3f}",
                  f"{r['input_active']:.3f}")
    Console(width=140).print(t)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
