"""Dense baseline benchmark: ms/frame of each zoo model's network per engine, size and thread count.

Engines: our PyTorch paths (eager NCHW, eager channels_last, TorchScript frozen), ONNX Runtime on our network's
export (the project's default dense executor), ONNX Runtime on the original model file, and OpenCV dnn on the
original file where OpenCV can import it. Times cover the network only (pre/post-processing excluded), on real
pre-processed frames, median over repeats after warm-up.
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

from deluceva.dense import ENGINES, make_dense, onnxruntime_session
from deluceva.zoo.registry import ZOO, load_model

ORIGINAL = ("onnxruntime-file", "opencv-dnn")


def _frames(video: Path, n: int) -> list[np.ndarray]:
    from deluceva.video import open_source

    with open_source(str(video), fps=1.0, max_frames=n) as src:
        return [f.rgb for f in src]


def _time(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        ts.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(ts)


def _original_runner(kind: str, model_path: Path, hw: tuple[int, int], threads: int):
    """A runner for the original model file, or None where that engine cannot run it at this size."""
    if model_path.suffix != ".onnx":
        return None  # OpenCV 5 has no Darknet importer; ONNX Runtime reads ONNX only
    if kind == "onnxruntime-file":
        sess = onnxruntime_session(str(model_path), threads)
        inp = sess.get_inputs()[0]
        if all(isinstance(d, int) for d in inp.shape[2:]) and tuple(inp.shape[2:]) != hw:
            return None  # fixed-size export
        return lambda x: sess.run(None, {inp.name: x.numpy()})
    import cv2

    cv2.setNumThreads(threads)
    try:
        net = cv2.dnn.readNetFromONNX(str(model_path))

        def run(x: torch.Tensor):
            net.setInput(x.numpy())
            return net.forward()

        run(torch.zeros(1, 3, *hw))
        return run
    except cv2.error:
        return None


def run_dense_benchmark(models: list[str] | None, threads_list: list[int], sizes: list[str], repeats: int,
                        video: Path, out: Path, console: Console, progress_factory) -> list[dict]:
    rows: list[dict] = []
    frames = _frames(video, 5)
    names = models or list(ZOO)
    cells = [(m, s, t) for m in names for s in sizes for t in threads_list]
    with progress_factory() as bar:
        task = bar.add_task("dense benchmark", total=len(cells), rate="")
        for name, size, threads in cells:
            det = load_model(name)
            hw = det.input_hw(None if size == "native" else size, frames[0].shape[:2])
            xs = [det.preprocess(f, hw)[0] for f in frames]
            row = {"model": name, "imgsz": f"{hw[1]}x{hw[0]}", "threads": threads}
            torch.set_num_threads(threads)
            for engine in ENGINES:
                run = make_dense(det.network, hw, threads, engine)
                it = iter(range(10**9))
                row[engine] = _time(lambda run=run, it=it, xs=xs: run(xs[next(it) % len(xs)]), repeats)
            for kind in ORIGINAL:
                path = ZOO[name].path
                run = _original_runner(kind, path, hw, threads)
                row[kind] = _time(lambda run=run, x=xs[0]: run(x), repeats) if run else None
            rows.append(row)
            bar.update(task, advance=1)
    _print_table(rows, console)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "repeats": repeats,
            "video": str(video), "unit": "ms per frame, network only, median"}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    console.print(f"wrote {out}")
    return rows


def _print_table(rows: list[dict], console: Console) -> None:
    cols = [*ENGINES, *ORIGINAL]
    t = Table(title="Dense ms/frame (network only, median)")
    for c in ("model", "imgsz", "threads", *cols, "default / best ORT"):
        t.add_column(c, justify="right")
    for r in rows:
        ort = [r[k] for k in ("onnxruntime", "onnxruntime-file") if r.get(k)]
        ratio = r["onnxruntime"] / min(ort) if ort else float("nan")
        t.add_row(r["model"], r["imgsz"], str(r["threads"]),
                  *[f"{r[c]:.1f}" if r.get(c) else "n/a" for c in cols], f"{ratio:.2f}")
    console.print(t)
