"""Per-operator benchmark: dense op vs delta unit (filter + sparse kernel) at several active-pixel fractions.

Used by bench/ops.py (and `deluceva bench ops`). Shapes are those of the zoo models (YOLOv5n, YOLOX-Nano) at
their native input size and at 768x448; for every shape: dense time (channels_last, inference_mode) and delta
time at active fractions 0.5..50%, clustered (random blobs) and scattered (uniform random pixels), per thread count,
median over repeats. Results: JSON, a printed table, a PNG plot of speed-up vs active fraction per family.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from deluceva.delta.kernels._jit import HAVE_NUMBA
from deluceva.delta.kernels.conv import SparseConv2d
from deluceva.delta.kernels.elementwise import SparseActivation
from deluceva.delta.kernels.filter import PixelFilter
from deluceva.delta.kernels.merge import add, concat
from deluceva.delta.kernels.pool import SparseMaxPool2d
from deluceva.delta.kernels.resample import upsample_nearest2x
from deluceva.delta.pixels import PixelDelta
from deluceva.threads import use_threads

FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5)
PATTERNS = ("clustered", "scattered")
# network input (H, W) per model and size name
SIZES = {
    "yolov5n": {"native": (640, 640), "768x448": (448, 768)},
    "yolox-nano": {"native": (416, 416), "768x448": (448, 768)},
}


@dataclass(frozen=True)
class OpShape:
    """One operator of a zoo model; its input map is the network input divided by `in_stride`."""

    family: str
    model: str
    name: str
    cin: int
    cout: int
    k: int = 1
    stride: int = 1
    groups: int = 1
    in_stride: int = 1
    quick: bool = False  # part of the --quick subset


# Source: models/yolov5n-coco/yolov5n.yaml (width 0.25, depth 0.33; layer indices in the names) and the conv list
# of src/deluceva/zoo/weights/yolox-nano-coco/yolox_nano.onnx (weights shapes and input shapes at 416x416).
SHAPES: tuple[OpShape, ...] = (
    OpShape("conv6x6_s2", "yolov5n", "model.0 (first conv)", 3, 16, 6, 2, 1, 1, quick=True),
    OpShape("conv3x3_s2", "yolov5n", "model.1", 16, 32, 3, 2, 1, 2),
    OpShape("conv3x3_s2", "yolov5n", "model.3", 32, 64, 3, 2, 1, 4),
    OpShape("conv3x3_s2", "yolov5n", "model.5", 64, 128, 3, 2, 1, 8, quick=True),
    OpShape("conv3x3_s2", "yolov5n", "model.7", 128, 256, 3, 2, 1, 16),
    OpShape("conv3x3", "yolov5n", "model.2.m.0.cv2", 16, 16, 3, 1, 1, 4),
    OpShape("conv3x3", "yolov5n", "model.4.m.*.cv2", 32, 32, 3, 1, 1, 8),
    OpShape("conv3x3", "yolov5n", "model.6.m.*.cv2", 64, 64, 3, 1, 1, 16, quick=True),
    OpShape("conv3x3", "yolov5n", "model.8.m.0.cv2", 128, 128, 3, 1, 1, 32),
    OpShape("conv1x1", "yolov5n", "model.2.cv1", 32, 16, 1, 1, 1, 4),
    OpShape("conv1x1", "yolov5n", "model.4.cv3", 64, 64, 1, 1, 1, 8, quick=True),
    OpShape("conv1x1", "yolov5n", "model.6.cv1", 128, 64, 1, 1, 1, 16),
    OpShape("conv1x1", "yolov5n", "model.9.cv2 (SPPF)", 512, 256, 1, 1, 1, 32),
    OpShape("conv1x1", "yolov5n", "model.24.m.0 (detect P3)", 64, 255, 1, 1, 1, 8),
    OpShape("conv3x3", "yolox-nano", "stem conv (after Focus)", 12, 16, 3, 1, 1, 2),
    OpShape("conv1x1", "yolox-nano", "pointwise 32ch @stride 8", 32, 32, 1, 1, 1, 8),
    OpShape("conv1x1", "yolox-nano", "pointwise 64ch @stride 16", 64, 64, 1, 1, 1, 16),
    OpShape("conv1x1", "yolox-nano", "pointwise 128->128 @stride 32", 128, 128, 1, 1, 1, 32),
    OpShape("dwconv3x3", "yolox-nano", "depthwise 64ch @stride 16", 64, 64, 3, 1, 64, 16, quick=True),
    OpShape("dwconv3x3", "yolox-nano", "depthwise 32ch @stride 8", 32, 32, 3, 1, 32, 8),
    OpShape("dwconv3x3_s2", "yolox-nano", "depthwise s2 64ch @stride 8", 64, 64, 3, 2, 64, 8),
    OpShape("silu", "yolov5n", "SiLU after model.6.m.*.cv2", 64, 64, in_stride=16, quick=True),
    OpShape("maxpool5", "yolov5n", "model.9 SPPF max-pool 5/1/2", 128, 128, 5, 1, 1, 32, quick=True),
    OpShape("upsample2x", "yolov5n", "model.11 nearest x2", 128, 128, in_stride=32, quick=True),
    OpShape("add", "yolov5n", "model.6.m.* shortcut add", 64, 64, in_stride=16, quick=True),
    OpShape("concat", "yolov5n", "model.12 cat(upsampled, model.6)", 128, 256, in_stride=16, quick=True),
)


def paired_ms(dense: Callable[[], object], delta: Callable[[], object], repeats: int, warmup: int = 2):
    """Median wall times (ms) of dense() and delta(), called alternately so that both see the same machine load
    (other processes share the CPU); returns (dense_ms, delta_ms)."""
    for _ in range(warmup):
        dense()
        delta()
    td, tx = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense()
        t1 = time.perf_counter()
        delta()
        t2 = time.perf_counter()
        td.append(t1 - t0)
        tx.append(t2 - t1)
    return 1e3 * statistics.median(td), 1e3 * statistics.median(tx)


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of fn() in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def crossover(points: list[dict]) -> float | None:
    """Active fraction where the speed-up falls through 1 (log-log interpolation); None if it never does."""
    pts = sorted(points, key=lambda p: p["fraction"])
    for a, b in zip(pts, pts[1:], strict=False):
        if a["speedup"] >= 1.0 > b["speedup"]:
            la, lb = math.log(a["fraction"]), math.log(b["fraction"])
            sa, sb = math.log(a["speedup"]), math.log(b["speedup"])
            return round(math.exp(la + (lb - la) * sa / (sa - sb)), 4)
    return 0.0 if pts and pts[0]["speedup"] < 1.0 else None


def active_pixels(h: int, w: int, frac: float, pattern: str, seed: int) -> torch.Tensor:
    """Sorted flat indices of about frac*h*w active pixels: random blobs ('clustered') or uniform ('scattered')."""
    g = torch.Generator().manual_seed(seed)
    target = max(1, round(frac * h * w))
    if pattern == "scattered":
        return torch.randperm(h * w, generator=g)[:target].sort().values
    mask = torch.zeros(h, w, dtype=torch.bool)
    lo, hi = max(2, round(0.02 * min(h, w))), max(3, round(0.1 * min(h, w)))
    covered = 0
    while covered < target:
        bh, bw = (int(v) for v in torch.randint(lo, hi + 1, (2,), generator=g))
        y, x = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
        mask[y : y + bh, x : x + bw] = True
        covered = int(mask.sum())
    return mask.reshape(-1).nonzero().squeeze(1)


def _input_hw(op: OpShape, size: str) -> tuple[int, int]:
    h, w = SIZES[op.model][size]
    return h // op.in_stride, w // op.in_stride


def _dense_fn(op: OpShape, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The dense reference of `op` on x (channels_last)."""
    if op.family == "silu":
        return lambda: F.silu(x)
    if op.family == "maxpool5":
        return lambda: F.max_pool2d(x, 5, 1, 2)
    if op.family == "upsample2x":
        return lambda: F.interpolate(x, scale_factor=2, mode="nearest")
    if op.family == "add":
        other = x.clone()
        return lambda: x + other
    if op.family == "concat":
        other = x.clone()
        return lambda: torch.cat([x, other], 1)
    w = torch.randn(op.cout, op.cin // op.groups, op.k, op.k).contiguous(memory_format=torch.channels_last)
    pad = 2 if op.k == 6 else op.k // 2
    return lambda: F.conv2d(x, w, None, op.stride, pad, 1, op.groups)


def _delta_fn(op: OpShape, shape: tuple[int, int, int, int], x: torch.Tensor) -> Callable[[PixelDelta], object]:
    """The delta unit of `op`: filter (0% held back) + sparse conv; kernel alone for non-conv families."""
    if op.family == "silu":
        act = SparseActivation("silu", shape)
        act.seed(x)
        return act
    if op.family == "maxpool5":
        pool = SparseMaxPool2d(shape, 5, 1, 2)
        pool.seed(x)
        return pool
    if op.family == "upsample2x":
        return upsample_nearest2x
    if op.family in ("add", "concat"):  # the other operand: a different random delta of the same size
        other = {}

        def merged(d: PixelDelta) -> PixelDelta:
            key = d.index.numel()
            if key not in other:
                idx = active_pixels(shape[2], shape[3], key / (shape[2] * shape[3]), "clustered", key + 7)
                other[key] = PixelDelta(idx, torch.randn(idx.numel(), shape[1]), shape)
            return add(d, other[key]) if op.family == "add" else concat(d, other[key])

        return merged
    weight = torch.randn(op.cout, op.cin // op.groups, op.k, op.k)
    conv = SparseConv2d(weight, shape, op.stride, 2 if op.k == 6 else op.k // 2, 1, op.groups)
    filt = PixelFilter(shape)
    return lambda d: conv(filt(d, 0.0))


def bench_op(op: OpShape, size: str, threads: int, fractions, repeats: int, seed: int = 0) -> dict:
    """Dense vs delta timings of one operator at one size and thread count."""
    use_threads(threads)
    h, w = _input_hw(op, size)
    shape = (1, op.cin, h, w)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        x = torch.randn(shape, generator=g).contiguous(memory_format=torch.channels_last)
        torch.manual_seed(seed)
        dense = _dense_fn(op, x)
        unit = _delta_fn(op, shape, x)
        empty = PixelDelta.empty(shape)
        empty_us = 1e3 * median_ms(lambda: unit(empty), max(50, repeats), warmup=5)
        points, dense_all = [], []
        for pattern in PATTERNS:
            for i, frac in enumerate(fractions):
                idx = active_pixels(h, w, frac, pattern, seed + i)
                delta = PixelDelta(idx, 0.1 * torch.randn(idx.numel(), op.cin, generator=g), shape)
                dense_ms, delta_ms = paired_ms(dense, lambda d=delta: unit(d), repeats)
                dense_all.append(dense_ms)
                points.append(
                    {
                        "fraction": frac,
                        "pattern": pattern,
                        "active": int(idx.numel()),
                        "dense_ms": round(dense_ms, 4),
                        "delta_ms": round(delta_ms, 4),
                        "speedup": round(dense_ms / delta_ms, 3),
                    }
                )
    return {
        **asdict(op),
        "size": size,
        "input_hw": [h, w],
        "threads": threads,
        "dense_ms": round(statistics.median(dense_all), 4),
        "empty_us": round(empty_us, 2),
        "crossover": {p: crossover([q for q in points if q["pattern"] == p]) for p in PATTERNS},
        "includes_filter": op.family.startswith(("conv", "dwconv")),
        "points": points,
    }


def run(
    threads: list[int],
    quick: bool,
    repeats: int,
    sizes: list[str],
    families: list[str] | None,
    fractions=FRACTIONS,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """All benchmark rows plus machine metadata."""
    ops = [o for o in SHAPES if (o.quick or not quick) and (families is None or o.family in families)]
    rows = []
    total = len(ops) * len(sizes) * len(threads)
    for t in threads:
        for size in sizes:
            for op in ops:
                if progress:
                    progress(f"[{len(rows) + 1}/{total}] {op.family} {op.model} {op.name} {size} {t} thr")
                rows.append(bench_op(op, size, t, fractions, repeats))
    return {
        "meta": {
            "torch": torch.__version__,
            "numba": HAVE_NUMBA,
            "machine": platform.processor() or platform.machine(),
            "quick": quick,
            "repeats": repeats,
            "fractions": list(fractions),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "note": "delta = filter (0% held back) + sparse conv for conv families; kernel alone otherwise",
        },
        "results": rows,
    }


def print_table(report: dict) -> None:
    """One row per (operator, size, threads, pattern): dense ms, empty-delta us, speed-up per fraction."""
    from rich.console import Console
    from rich.table import Table

    fractions = report["meta"]["fractions"]
    table = Table(title="dense time / delta time (speed-up), delta includes the filter for convs")
    for col in ("family", "model / op", "size", "HxW", "thr", "pattern", "dense ms", "empty us"):
        table.add_column(col)
    for f in fractions:
        table.add_column(f"{100 * f:g}%", justify="right")
    for r in report["results"]:
        for pattern in PATTERNS:
            pts = {p["fraction"]: p for p in r["points"] if p["pattern"] == pattern}
            cells = [f"{pts[f]['speedup']:.2f}" if f in pts else "" for f in fractions]
            table.add_row(
                r["family"], f"{r['model']} {r['name']} {r['cin']}->{r['cout']}", r["size"],
                "x".join(map(str, r["input_hw"])), str(r["threads"]), pattern, f"{r['dense_ms']:.3f}",
                f"{r['empty_us']:.1f}", *cells,
            )  # fmt: skip
    Console(width=200).print(table)


def plot(report: dict, path: Path) -> None:
    """Speed-up vs active fraction, one panel per family: per (threads, pattern) the median over the family's
    shapes and sizes, with a band from the worst to the best shape."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows_all = report["results"]
    families = list(dict.fromkeys(r["family"] for r in rows_all))
    threads = sorted({r["threads"] for r in rows_all})
    fractions = report["meta"]["fractions"]
    cols = min(4, len(families))
    nrows = (len(families) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
    x = [100 * f for f in fractions]
    for ax, fam in zip(axes.flat, families, strict=False):
        rows = [r for r in rows_all if r["family"] == fam]
        for ti, t in enumerate(threads):
            for pattern, style in (("clustered", "-"), ("scattered", "--")):
                curves = [
                    [next(p["speedup"] for p in r["points"] if p["pattern"] == pattern and p["fraction"] == f)
                     for f in fractions]
                    for r in rows if r["threads"] == t
                ]  # fmt: skip
                if not curves:
                    continue
                per_f = list(zip(*curves, strict=True))
                color = f"C{2 * ti + (pattern == 'scattered')}"
                ax.plot(x, [statistics.median(v) for v in per_f], style, color=color, marker=".",
                        label=f"{t} thr, {pattern}")  # fmt: skip
                ax.fill_between(x, [min(v) for v in per_f], [max(v) for v in per_f], color=color, alpha=0.12)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="active pixels (%)", ylabel="dense / delta")
        ax.set_title(f"{fam} ({len({(r['name'], r['size']) for r in rows})} shapes)", fontsize=10)
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(families) :]:
        ax.axis("off")
    fig.suptitle("delta unit (filter + sparse kernel) vs dense: median over shapes, band = min..max")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """CLI: python bench/ops.py [--threads 1,2] [--quick] [--out bench/results/ops.json] [--plot PNG] ..."""
    ap = argparse.ArgumentParser(prog="bench/ops.py", description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="one shape per family, native size, few repeats (<2 min)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per point (default 15, quick 5)")
    ap.add_argument("--sizes", default=None, help="comma-separated: native,768x448 (quick: native)")
    ap.add_argument("--families", default=None, help="comma-separated families to run (default all)")
    ap.add_argument("--fractions", default=None, help="comma-separated active fractions in %% (default 0.5..50)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ops.json"))
    ap.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    args = ap.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    sizes = args.sizes.split(",") if args.sizes else (["native"] if args.quick else ["native", "768x448"])
    repeats = args.repeats or (5 if args.quick else 15)
    fractions = tuple(float(f) / 100 for f in args.fractions.split(",")) if args.fractions else FRACTIONS
    families = args.families.split(",") if args.families else None
    report = run(threads, args.quick, repeats, sizes, families, fractions, progress=lambda s: print(s, flush=True))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    png = args.plot or args.out.with_suffix(".png")
    plot(report, png)
    print(f"wrote {args.out} and {png}")
    return 0
