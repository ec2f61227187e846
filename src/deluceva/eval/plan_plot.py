"""Per-frame timelines of a `deluceva bench plan` result: where the mixed engine ran each frame and what it cost.

One panel per result row (model, size, threads, video, filtering percentage): x = frame of the clip, y = engine ms
per frame (log scale) for ONNX Runtime, the all-delta network and the mixed engine; the mixed engine's frames are
marked by its guard's decision (delta frame, ONNX Runtime frame, re-seed). The title carries the row's totals
(mixed x ONNX Runtime by mean, mixed / fastest engine, mAP@0.5 against dense, decision counts), so a failing cell
shows at a glance which frames cost it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deluceva.errors import DelucevaError

DECISION_STYLE = {"delta": ("tab:green", "delta frame"), "ort": ("0.55", "ONNX Runtime frame"),
                  "reseed": ("tab:red", "re-seed")}
MAX_PANELS = 48  # one figure; larger results: plot a filtered copy


def load_result(path: Path) -> dict[str, Any]:
    """A `bench plan` JSON with per-frame series; a clear DelucevaError for anything else."""
    try:
        result = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DelucevaError(f"no such result file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DelucevaError(f"{path} is not JSON: {e}") from None
    rows = result.get("rows") if isinstance(result, dict) else None
    if not rows or not all(isinstance(r, dict) and "decision" in r.get("per_frame", {}) for r in rows):
        raise DelucevaError(f"{path} is not a `deluceva bench plan` result with per-frame series (rows[].per_frame)")
    return result


def select_rows(result: dict[str, Any], models: list[str] | None = None, videos: list[str] | None = None,
                threads: list[int] | None = None, filters: list[float] | None = None) -> dict[str, Any]:
    """`result` with only the rows of the given models, videos (file name or stem), thread counts and filtering
    percentages (None: any); a DelucevaError when none is left."""
    def keep(row: dict[str, Any]) -> bool:
        video = Path(row["video"])
        return ((not models or row["model"] in models) and (not videos or video.name in videos or video.stem in videos)
                and (not threads or row["threads"] in threads)
                and (not filters or any(abs(row["filter_pct"] - f) < 1e-9 for f in filters)))

    rows = [r for r in result["rows"] if keep(r)]
    if not rows:
        raise DelucevaError("no result row matches the selection (models, videos, threads, filters)")
    return {**result, "rows": rows}


def panel_title(row: dict[str, Any]) -> str:
    """One row's headline: which cell, mixed x ONNX Runtime, mixed / fastest, mAP, decisions ort/reseed/delta."""
    ms, d = row["ms_mean"], row["decisions"]
    return (f"{row['model']} {row['imgsz']} t{row['threads']} {Path(row['video']).stem} filter {row['filter_pct']:g}: "
            f"{ms['ort'] / ms['mixed']:.2f}x ORT, mix/min {row['ratio_mean']:.2f}, "
            f"mAP {row['map50_vs_ort']['mixed']:.3f}, o/r/d {d.get('ort', 0)}/{d.get('reseed', 0)}/{d.get('delta', 0)}")


def plot_timelines(result: dict[str, Any], path: Path) -> Path:
    """Write the timelines of `result` (a loaded `bench plan` JSON, see `load_result`) as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    if len(rows) > MAX_PANELS:
        raise DelucevaError(f"{len(rows)} result rows: at most {MAX_PANELS} panels fit one figure (select some: "
                            "--model, --video, --threads, --filter)")
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 2.6 * len(rows)), squeeze=False)
    for ax, row in zip(axes[:, 0], rows, strict=True):
        pf = row["per_frame"]
        x = range(len(pf["mixed"]))
        ax.plot(x, pf["ort"], color="tab:blue", lw=1.0, label="ONNX Runtime")
        ax.plot(x, pf["all-delta"], color="tab:orange", lw=0.7, alpha=0.7, label="all-delta")
        ax.plot(x, pf["mixed"], color="k", lw=0.6, alpha=0.6, label="mixed")
        for decision, (color, label) in DECISION_STYLE.items():
            idx = [i for i, d in enumerate(pf["decision"]) if d == decision]
            if idx:
                ax.scatter(idx, [pf["mixed"][i] for i in idx], s=9, color=color, zorder=3, label=f"mixed: {label}")
        ax.set_yscale("log")
        ax.set_ylabel("ms / frame")
        ax.set_title(panel_title(row), fontsize=9)
        ax.grid(True, which="both", alpha=0.25)
    axes[-1, 0].set_xlabel("frame of the clip (frame 0 seeds every delta engine: excluded from the totals)")
    axes[0, 0].legend(fontsize=7, ncol=6, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
