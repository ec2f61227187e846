"""The `deluceva` command end to end on real frames, and one clear line + exit code 2 for every bad input."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deluceva.sinks import read_results

ROOT = Path(__file__).resolve().parents[1]
PERSON = ROOT / "assets/video/one-by-one-person-detection.mp4"
FASTEST_CFG = ROOT / "src/deluceva/zoo/weights/yolo-fastest-1.1-xl-coco/yolo-fastest-1.1-xl.cfg"


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deluceva.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w.lower() in lines[0].lower(), lines[0]


def test_detect_end_to_end_jsonl_and_video(tmp_path: Path) -> None:
    out, vid = tmp_path / "r.jsonl", tmp_path / "a.mp4"
    proc = run_cli("detect", str(PERSON), "--model", "yolo-fastest-xl", "--fps", "1", "--start", "28",
                   "--max-frames", "10", "--out", str(out), "--video-out", str(vid))
    assert proc.returncode == 0, proc.stderr
    recs = read_results(out)
    assert len(recs) == 10
    assert [r["frame"] for r in recs] == sorted(r["frame"] for r in recs)
    assert recs[0]["pts"] >= 28.0 and recs[1]["pts"] - recs[0]["pts"] == pytest.approx(1.0, abs=0.11)
    assert {r["mode"] for r in recs} == {"dense"}
    assert all(r["ms"] > 0 for r in recs)
    # people stand at the table in this part of the video
    persons = [d for r in recs for d in r["detections"] if d["label"] == "person"]
    assert persons, recs
    x1, y1, x2, y2 = persons[0]["box"]
    assert 0 <= x1 < x2 <= 768 and 0 <= y1 < y2 <= 432
    assert vid.stat().st_size > 10_000


def test_detect_with_an_error_target_probes_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    proc = run_cli("detect", str(ROOT / "assets/video/vtest_pets09_s2l1.avi"), "--model", "yolov5n", "--imgsz",
                   "384x224", "--mode", "delta", "--plan", "delta", "--filter", "90", "--error-target", "0.05",
                   "--probe-every", "4", "--max-frames", "13", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    recs = read_results(out)
    assert [r["mode"] for r in recs[:5]] == ["refresh", "delta", "delta", "delta", "refresh"]  # seed, probe
    assert recs[1]["filter_pct"] == 90.0 and recs[5]["filter_pct"] < 90.0  # walking people: the probe cut it
    assert "probes (error: mean, max)" in proc.stderr and "filter % on delta frames" in proc.stderr  # the summary


def test_detect_parquet_readable_by_duckdb(tmp_path: Path) -> None:
    duckdb = pytest.importorskip("duckdb")
    out = tmp_path / "r.parquet"
    proc = run_cli("detect", str(PERSON), "--model", str(FASTEST_CFG), "--fps", "2", "--start", "30",
                   "--max-frames", "6", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    n = duckdb.sql(f"select count(*) from '{out}'").fetchall()[0][0]
    assert n == 6
    labels = duckdb.sql(f"select unnest(detections).label as l from '{out}'").fetchall()
    assert ("person",) in labels


def test_models_lists_zoo() -> None:
    proc = run_cli("models")
    assert proc.returncode == 0, proc.stderr
    for name in ("yolox-nano", "yolo-fastest-xl", "yolov5n", "AGPL"):
        assert name in proc.stdout


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case",
    ["missing_file", "not_a_video", "unreachable_url", "unknown_model", "cfg_without_weights", "bad_onnx",
     "unwritable_out", "bad_imgsz", "onnx_without_family", "negative_relative_floor", "error_target_out_of_range",
     "error_target_in_dense_mode", "probe_every_one"],
)
def test_bad_input_gives_one_clear_line(case: str, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = [str(PERSON), "--model", "yolo-fastest-xl", "--max-frames", "2", "--out", str(out)]
    words: tuple[str, ...] = ()
    if case == "missing_file":
        args[0], words = str(tmp_path / "nope.mp4"), ("nope.mp4",)
    elif case == "not_a_video":
        bogus = tmp_path / "notes.mp4"
        bogus.write_text("this is not a video\n" * 100)
        args[0], words = str(bogus), ("notes.mp4",)
    elif case == "unreachable_url":
        args[0], words = f"rtsp://127.0.0.1:{_closed_port()}/stream", ("127.0.0.1",)
    elif case == "unknown_model":
        args[2], words = "no-such-model", ("no-such-model",)
    elif case == "cfg_without_weights":
        cfg = tmp_path / "lonely.cfg"
        shutil.copy(FASTEST_CFG, cfg)
        args[2], words = str(cfg), ("weights",)
    elif case == "bad_onnx":
        bad = tmp_path / "broken.onnx"
        bad.write_bytes(b"\x08\x07garbage" * 50)
        args[2:3], words = [str(bad), "--family", "yolox"], ("broken.onnx",)
    elif case == "onnx_without_family":
        bad = tmp_path / "some.onnx"
        bad.write_bytes(b"x")
        args[2], words = str(bad), ("--family",)
    elif case == "unwritable_out":
        out = tmp_path / "missing_dir" / "r.jsonl"
        args[-1], words = str(out), ("missing_dir",)
    elif case == "bad_imgsz":
        args += ["--imgsz", "100x50"]
        words = ("multiples of 32",)
    elif case == "negative_relative_floor":
        args += ["--mode", "delta", "--filter", "1", "--relative-floor", "-0.3"]
        words = ("--relative-floor",)
    elif case == "error_target_out_of_range":
        args += ["--mode", "delta", "--error-target", "1.5"]
        words = ("--error-target", "(0, 1)")
    elif case == "error_target_in_dense_mode":
        args += ["--error-target", "0.05"]
        words = ("--error-target", "delta")
    elif case == "probe_every_one":
        args += ["--mode", "delta", "--error-target", "0.05", "--probe-every", "1"]
        words = ("--probe-every",)
    proc = run_cli("detect", *args, timeout=60)
    assert_clean_error(proc, *words)
    assert not out.exists()
    assert not [p for p in out.parent.glob("*") if p.suffix in (".jsonl", ".parquet")] if out.parent.exists() else True


def test_results_schema_per_record(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    proc = run_cli("detect", str(PERSON), "--model", "yolo-fastest-xl", "--max-frames", "3", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        assert set(rec) == {"frame", "pts", "mode", "filter_pct", "ms", "detections"}
        for d in rec["detections"]:
            assert set(d) == {"label", "class_id", "score", "box"} and len(d["box"]) == 4


def test_bench_plot_draws_one_timeline_per_result_row(tmp_path: Path) -> None:
    """A shipped `bench plan` result (6 rows of 120 frames) -> a PNG, one panel per row; bad files fail clearly."""
    from PIL import Image

    result = ROOT / "bench/results/plan_768x448_t1_120f_0.01_rf0.2_s23fin.json"
    rows = json.loads(result.read_text())["rows"]
    out = tmp_path / "timelines.png"
    proc = run_cli("bench", "plot", str(result), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    width, height = Image.open(out).size
    assert (width, height) == (1200, 260 * len(rows)), (width, height)  # 12 x 2.6 in per panel at 100 dpi
    proc = run_cli("bench", "plot", str(result), "--out", str(out), "--model", "yolov5n", "--video",
                   "one-by-one-person-detection", "--threads", "1", "--filter", "0.01")
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (1200, 260)  # the one matching row
    assert_clean_error(run_cli("bench", "plot", str(result), "--threads", "2"), "no result row matches")
    assert_clean_error(run_cli("bench", "plot", str(tmp_path / "missing.json")), "no such result file")
    assert_clean_error(run_cli("bench", "plot", str(ROOT / "pyproject.toml")), "not json")
    ops = tmp_path / "ops.json"
    ops.write_text(json.dumps({"meta": {}, "results": []}))
    assert_clean_error(run_cli("bench", "plot", str(ops)), "not a `deluceva bench plan` result")
