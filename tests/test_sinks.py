"""Result sinks: JSONL / Parquet round trips, DuckDB access, atomic publishing, bad paths, annotated video."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from deluceva.errors import DelucevaError, OutputError
from deluceva.sinks import AnnotatedVideoSink, open_sink, read_results
from deluceva.video import open_source
from deluceva.zoo.base import Detections

ROOT = Path(__file__).resolve().parents[1]
CAR = ROOT / "assets" / "video" / "car-detection.mp4"
NAMES = (ROOT / "src/deluceva/zoo/weights/yolox-nano-coco/coco.names").read_text().split("\n")[:80]


def real_records() -> list[dict]:
    """Records as the engine writes them, with real detections (YOLOX-Nano's shipped reference outputs on
    20 car-detection.mp4 frames, decoded and thresholded at 0.05, no NMS)."""
    ref = np.load(ROOT / "tests/data/yolox-nano-coco/reference_outputs.npz")
    out, idx = ref["out/output"][:, 0], ref["frame_indices"]
    grids = []
    for stride in (8, 16, 32):
        n = 416 // stride
        yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xx.ravel(), yy.ravel(), np.full(n * n, stride)], 1))
    g = np.concatenate(grids).astype(np.float32)
    records = []
    for k, o in enumerate(out):
        s = o[:, 4:5] * o[:, 5:]
        keep = s.max(1) > 0.05
        xy = (o[keep, :2] + g[keep, :2]) * g[keep, 2:]
        wh = np.exp(o[keep, 2:4]) * g[keep, 2:]
        d = Detections(np.concatenate([xy - wh / 2, xy + wh / 2], 1), s[keep].max(1), s[keep].argmax(1))
        records.append({
            "frame": int(idx[k]), "pts": float(idx[k]) * 0.08, "mode": "dense" if k % 5 == 0 else "delta",
            "filter_pct": None if k % 5 == 0 else 62.5, "ms": 12.25 + k, "detections": d.to_records(NAMES),
        })
    return records


def test_real_records_are_not_trivial() -> None:
    recs = real_records()
    assert sum(len(r["detections"]) for r in recs) > 50 and any(not r["detections"] for r in recs)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_round_trip(tmp_path: Path, suffix: str) -> None:
    recs = real_records()
    path = tmp_path / f"results{suffix}"
    with open_sink(path) as sink:
        for r in recs:
            sink.write(r)
        assert not path.exists()  # published only on close
    assert read_results(path) == recs
    assert os.listdir(tmp_path) == [path.name]  # no temporary file left


def test_parquet_for_duckdb_and_row_groups(tmp_path: Path) -> None:
    recs = real_records() * 30  # 600 rows
    path = tmp_path / "x.parquet"
    with open_sink(path, row_group_size=256) as sink:
        for r in recs:
            sink.write(r)
    assert pq.ParquetFile(path).metadata.num_row_groups == 3
    con = duckdb.connect()
    assert con.sql(f"select count(*) from '{path}'").fetchall() == [(600,)]
    rows = con.sql(f"select frame, unnest(detections) as d from '{path}'").fetchall()
    assert len(rows) == sum(len(r["detections"]) for r in recs)
    first = next(r for r in recs if r["detections"])
    assert rows[0] == (first["frame"], first["detections"][0])
    q = f"select d.label, count(*) from (select unnest(detections) as d from '{path}') group by all order by 1"
    counts: dict[str, int] = {}
    for r in recs:
        for d in r["detections"]:
            counts[d["label"]] = counts.get(d["label"], 0) + 1
    assert con.sql(q).fetchall() == sorted(counts.items())


def test_parquet_other_record_shapes(tmp_path: Path) -> None:
    # e.g. per-unit statistics: fields other than the DESIGN.md ones get inferred types
    recs = [{"frame": i, "unit": f"conv{i % 3}", "active": i * 0.5, "ok": bool(i % 2), "extra": None}
            for i in range(10)]
    path = tmp_path / "stats.parquet"
    with open_sink(path, row_group_size=4) as sink:
        for r in recs:
            sink.write(r)
    assert read_results(path) == recs
    with pytest.raises(OutputError, match="gained fields"):
        with open_sink(tmp_path / "bad.parquet", row_group_size=2) as sink:
            for r in recs[:2] + [{**recs[2], "new": 1}] * 2:
                sink.write(r)
    assert not (tmp_path / "bad.parquet").exists()


def test_empty_outputs(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.parquet"):
        with open_sink(tmp_path / name):
            pass
        assert read_results(tmp_path / name) == []


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_interrupted_writing_leaves_nothing(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"out{suffix}"
    path.write_text("previous complete results")
    with pytest.raises(KeyboardInterrupt):
        with open_sink(path) as sink:
            for r in real_records():
                sink.write(r)
            raise KeyboardInterrupt
    assert path.read_text() == "previous complete results"  # untouched
    assert sorted(os.listdir(tmp_path)) == [path.name]
    sink = open_sink(tmp_path / f"gc{suffix}")
    sink.write(real_records()[0])
    del sink  # dropped without close: discarded
    assert sorted(os.listdir(tmp_path)) == [path.name]


def test_killed_process_leaves_no_final_file(tmp_path: Path) -> None:
    target = tmp_path / "killed.jsonl"
    code = textwrap.dedent(f"""
        import sys, time
        from deluceva.sinks import open_sink
        sink = open_sink({str(target)!r})
        for i in range(3):
            sink.write({{"frame": i}})
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        temps = [p for p in tmp_path.iterdir() if p.name.startswith(".killed.")]
        assert len(temps) == 1 and len(temps[0].read_text().splitlines()) == 3  # flushed line by line
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not target.exists()


def test_bad_paths_fail_at_open(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="does not exist"):
        open_sink(tmp_path / "missing" / "x.jsonl")
    with pytest.raises(OutputError, match="unknown results format"):
        open_sink(tmp_path / "x.csv")
    (tmp_path / "d.parquet").mkdir()
    with pytest.raises(OutputError, match="directory"):
        open_sink(tmp_path / "d.parquet")
    with pytest.raises(OutputError, match="cannot write"):
        open_sink("/proc/deluceva-results.jsonl")  # a read-only location, even for root
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError):
            open_sink(ro / "x.parquet")
    with pytest.raises(OutputError):
        AnnotatedVideoSink(tmp_path / "missing" / "v.mp4", fps=1)
    with pytest.raises(OutputError):
        AnnotatedVideoSink(tmp_path / "v.gif", fps=1)
    with pytest.raises(DelucevaError, match="not found"):
        read_results(tmp_path / "nothing.jsonl")


def test_annotated_video(tmp_path: Path) -> None:
    box = [200.0, 100.0, 400.0, 300.0]
    det = {"label": "car", "class_id": 2, "score": 0.77, "box": box}
    path = tmp_path / "annotated.mp4"
    with open_source(CAR, fps=2, max_frames=6) as src:
        frames = list(src)
        with AnnotatedVideoSink(path, fps=2, size_hw=src.source_hw, names=NAMES) as sink:
            for i, f in enumerate(frames):
                if i % 2:
                    sink.write(f.rgb, Detections(np.array([box], np.float32), np.array([0.77], np.float32),
                                                 np.array([2])), caption=f"frame {f.index}")
                else:
                    sink.write(f.rgb, [det])
            assert not path.exists()
    assert os.listdir(tmp_path) == [path.name]
    with open_source(path) as out:
        written = list(out)
        assert out.source_hw == (432, 768) and out.nominal_fps == 2.0
    assert len(written) == 6
    for orig, ann in zip(frames, written, strict=True):
        diff = np.abs(ann.rgb.astype(np.int16) - orig.rgb.astype(np.int16)).mean(axis=2)
        assert diff[200, 195:205].max() > 60  # the box's left edge at x=200
        assert diff[350:, 450:].mean() < 6  # elsewhere: only compression noise


def test_annotated_video_odd_size_and_abort(tmp_path: Path) -> None:
    rgb = np.full((101, 151, 3), 90, np.uint8)
    with AnnotatedVideoSink(tmp_path / "odd.mkv", fps=5) as sink:
        for _ in range(3):
            sink.write(rgb)
    with open_source(tmp_path / "odd.mkv") as out:
        assert out.source_hw == (102, 152) and len(list(out)) == 3
    with pytest.raises(RuntimeError):
        with AnnotatedVideoSink(tmp_path / "aborted.mp4", fps=5) as sink:
            sink.write(rgb)
            raise RuntimeError("engine failed")
    assert sorted(os.listdir(tmp_path)) == ["odd.mkv"]


def test_jsonl_is_flushed_per_record(tmp_path: Path) -> None:
    sink = open_sink(tmp_path / "live.jsonl")
    sink.write({"frame": 0, "ms": np.float32(1.5), "n": np.int64(3)})  # numpy scalars are fine
    temp = next(p for p in tmp_path.iterdir() if p.name.startswith(".live."))
    assert temp.read_text() == '{"frame":0,"ms":1.5,"n":3}\n'
    time.sleep(0)
    assert sink.close() == tmp_path / "live.jsonl"
    assert read_results(tmp_path / "live.jsonl") == [{"frame": 0, "ms": 1.5, "n": 3}]
