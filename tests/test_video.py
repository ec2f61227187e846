"""Video sources: timestamp sampling on the shipped videos, seeking, VFR, image folders, errors."""

from __future__ import annotations

import bisect
import functools
import http.server
import math
import os
import socket
import threading
import time
import zlib
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pytest

import deluceva.video.pyav_source as pyav_source
from deluceva.errors import DelucevaError, SourceError
from deluceva.video import Frame, SourceWarning, TimestampSampler, open_source

VIDEOS = Path(__file__).resolve().parents[1] / "assets" / "video"
CAR, PERSON, PETS = "car-detection.mp4", "one-by-one-person-detection.mp4", "vtest_pets09_s2l1.avi"
# from assets/video/MANIFEST.md: (frames, duration s, fps, (H, W))
FACTS = {
    CAR: (377, 30.16, 12.5, (432, 768)),
    PERSON: (1394, 139.4, 10.0, (432, 768)),
    PETS: (795, 79.5, 10.0, (360, 480)),
}


@functools.cache
def stream_times(name: str) -> tuple[Fraction, ...]:
    """Presentation times of every frame, in output order, from the stream's own packet timestamps
    (demux only, no decoding): output order is presentation order, i.e. the sorted packet pts."""
    with av.open(str(VIDEOS / name)) as c:
        s = c.streams.video[0]
        origin = s.start_time or 0
        pts = sorted(p.pts for p in c.demux(s) if p.pts is not None and p.size)
        return tuple((p - origin) * s.time_base for p in pts)


def expected_indices(times: tuple[Fraction, ...], fps: float, start: float = 0.0) -> list[int]:
    """For each multiple start + k/fps up to the last frame, the first frame at or after it (deduplicated)."""
    start_f, period = Fraction(str(start)), 1 / Fraction(str(fps))
    out: list[int] = []
    k = 0
    while start_f + k * period <= times[-1]:
        i = bisect.bisect_left(times, start_f + k * period)
        if not out or out[-1] != i:
            out.append(i)
        k += 1
    return out


def read(name: str | Path, **kw: object) -> tuple[list[Frame], object]:
    """All frames of a shipped video (by name) or any other spec, and the (closed) source."""
    with open_source(VIDEOS / name if name in FACTS else name, **kw) as src:
        return list(src), src


@pytest.mark.parametrize("name", [CAR, PERSON, PETS])
def test_fps1_sampling_matches_stream_timestamps(name: str) -> None:
    n_frames, duration, fps, hw = FACTS[name]
    times = stream_times(name)
    assert len(times) == n_frames
    frames, src = read(name, fps=1)
    exp = expected_indices(times, 1.0)
    assert [f.index for f in frames] == exp
    assert [f.pts_seconds for f in frames] == [float(times[i]) for i in exp]
    # hard checks independent of the helper
    assert frames[0].index == 0
    assert len(frames) == math.ceil(duration) == src.estimated_frames
    assert all(math.floor(f.pts_seconds) == k for k, f in enumerate(frames))  # one per whole second
    assert src.source_hw == hw and src.nominal_fps == fps
    f = frames[len(frames) // 2]
    assert f.rgb.shape == (*hw, 3) and f.rgb.dtype == np.uint8 and f.rgb.flags["C_CONTIGUOUS"]


def test_every_frame_without_fps() -> None:
    frames, src = read(CAR)
    assert [f.index for f in frames] == list(range(377)) and src.estimated_frames == 377
    assert [f.pts_seconds for f in frames] == [float(Fraction(2 * i, 25)) for i in range(377)]


def test_pets_avi_timestamps_are_repaired() -> None:
    # AVI carries decode-order numbers as pts; with B-frames the decoder's frames come out with scrambled
    # pts (1, 4, 3, 5, 2, ...). The source re-pairs them: strictly increasing, 0.1 s apart.
    frames, src = read(PETS)
    assert len(frames) == 795 == src.estimated_frames
    pts = [f.pts_seconds for f in frames]
    assert pts == [float(t) for t in stream_times(PETS)]
    assert np.allclose(np.diff(pts), 0.1)


def test_fps_2_5_from_start_10() -> None:
    frames, src = read(PERSON, fps=2.5, start=10)
    exp = expected_indices(stream_times(PERSON), 2.5, 10.0)
    assert [f.index for f in frames] == exp
    assert frames[0].index == 100 and frames[0].pts_seconds == 10.0
    assert frames[1].pts_seconds == pytest.approx(10.4)
    assert len(frames) == math.ceil((139.4 - 10) * 2.5) == src.estimated_frames


def test_start_and_max_frames() -> None:
    frames, src = read(CAR, fps=1, start=10, max_frames=4)
    assert [f.index for f in frames] == [125, 138, 150, 163]  # 10.0, 11.04, 12.0, 13.04 s
    assert src.estimated_frames == 4
    frames, _ = read(PETS, fps=1, start=10, max_frames=3)
    assert [(f.index, f.pts_seconds) for f in frames] == [(99, 10.0), (109, 11.0), (119, 12.0)]
    assert read(CAR, start=40)[0] == []


@functools.cache
def fingerprints(name: str) -> list[tuple[int, float, int]]:
    """(index, pts, crc32 of the RGB) of the first 400 frames, decoded from the start."""
    return [(f.index, f.pts_seconds, zlib.crc32(f.rgb)) for f in read(name, max_frames=400)[0]]


@pytest.mark.parametrize("name", [CAR, PERSON])
@pytest.mark.parametrize("start", [0.05, 3.3, 17.96, 29.5])
def test_seek_gives_the_same_frames_as_decoding_from_the_start(name: str, start: float) -> None:
    full = [fp for fp in fingerprints(name) if fp[1] >= start][:8]
    got = [(f.index, f.pts_seconds, zlib.crc32(f.rgb)) for f in read(name, start=start, max_frames=8)[0]]
    assert got == full and len(got) > 0


def test_skipped_frames_are_not_converted(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = pyav_source._to_rgb

    def counting(frame: av.VideoFrame) -> np.ndarray:
        calls.append(frame.pts)
        return original(frame)

    monkeypatch.setattr(pyav_source, "_to_rgb", counting)
    frames, _ = read(CAR, fps=1)
    assert len(calls) == len(frames) == 31


def write_video(path: Path, pts_ms: list[int]) -> None:
    """A 64x48 H.264 MP4 whose i-th frame is uniform grey 20*i+10, at the given timestamps (ms)."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=1000, options={"preset": "ultrafast"})
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i, p in enumerate(pts_ms):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i + 10, np.uint8), format="rgb24")
            f.pts = p
            for packet in s.encode(f):
                c.mux(packet)
        for packet in s.encode(None):
            c.mux(packet)


def test_variable_frame_rate(tmp_path: Path) -> None:
    path = tmp_path / "vfr.mp4"
    write_video(path, [0, 40, 80, 500, 990, 1000, 1010, 2600, 2650, 4999, 5000, 7300])
    frames, _ = read(path, fps=1)
    # multiples 0..7 s: 0 -> #0, 1 -> #5 (1.0), 2 -> #7 (2.6), 3 and 4 -> #9 (4.999), 5 -> #10, 6 and 7 -> #11
    assert [(f.index, f.pts_seconds) for f in frames] == [(0, 0), (5, 1), (7, 2.6), (9, 4.999), (10, 5), (11, 7.3)]
    assert [round(float(f.rgb.mean())) for f in frames] == pytest.approx([20 * f.index + 10 for f in frames], abs=3)
    frames, _ = read(path, fps=4, start=0.9)
    # multiples 0.9 + k/4: 0.9 -> #4 (0.99); 1.15 -> #7 (2.6); 2.65 -> #8; 4.9 -> #9 (4.999); 5.15 -> #11
    assert [f.index for f in frames] == [4, 7, 8, 9, 11]


def test_sampler_rules() -> None:
    s = TimestampSampler(fps=2, start=1)
    times = [Fraction(t, 10) for t in (5, 10, 12, 15, 16, 31, 32, 35)]
    assert [s.keep(t) for t in times] == [False, True, False, True, False, True, False, True]
    with pytest.raises(DelucevaError):
        TimestampSampler(fps=0)
    with pytest.raises(DelucevaError):
        TimestampSampler(start=-1)


def write_images(folder: Path, names: list[str]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for i, name in enumerate(names):
        rgb = rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        images.append(rgb)
    return images


def test_image_folder_and_glob(tmp_path: Path) -> None:
    names = ["f1.png", "f2.png", "f3.png", "f10.png", "f11.png"]  # natural order, not f1 f10 f11 f2 f3
    images = write_images(tmp_path, names)
    (tmp_path / "notes.txt").write_text("not an image")
    with open_source(tmp_path) as src:
        frames = list(src)
        assert src.source_hw == (20, 30) and src.nominal_fps == 1.0 and src.estimated_frames == 5
    assert [(f.index, f.pts_seconds) for f in frames] == [(i, float(i)) for i in range(5)]
    assert all(np.array_equal(f.rgb, img) for f, img in zip(frames, images, strict=True))  # RGB, lossless
    frames, _ = read(str(tmp_path), fps=0.5, start=1)
    assert [f.index for f in frames] == [1, 3]
    with open_source(str(tmp_path / "f1*.png"), folder_fps=10, fps=20, max_frames=2) as src:
        frames = list(src)
    assert [(f.index, f.pts_seconds) for f in frames] == [(0, 0.0), (1, 0.1)]
    assert np.array_equal(frames[1].rgb, images[3])  # f10.png


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_http_url(tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Quiet, directory=str(VIDEOS))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{CAR}"
        frames, src = read(url, fps=1)
    finally:
        server.shutdown()
        server.server_close()
    assert [f.index for f in frames] == expected_indices(stream_times(CAR), 1.0)
    assert src.estimated_frames == 31


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("scheme", ["rtsp", "http"])
def test_unreachable_url_fails_fast(scheme: str) -> None:
    url = f"{scheme}://127.0.0.1:{closed_port()}/stream"
    t0 = time.monotonic()
    with pytest.raises(SourceError, match="cannot connect") as err:
        open_source(url)
    assert time.monotonic() - t0 < 5
    assert "\n" not in str(err.value) and url in str(err.value)


def test_error_cases(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        open_source(tmp_path / "missing.mp4")
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(SourceError, match="not a readable video"):
        open_source(text)
    head = tmp_path / "head.mp4"
    head.write_bytes((VIDEOS / CAR).read_bytes()[:2000])
    with pytest.raises(SourceError, match="not a readable video"):
        open_source(head)
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(SourceError, match="empty"):
        open_source(tmp_path / "empty.mp4")
    empty = tmp_path / "frames"
    empty.mkdir()
    with pytest.raises(SourceError, match="no image files"):
        open_source(empty)
    with pytest.raises(SourceError, match="no files match"):
        open_source(str(empty / "*.jpg"))
    (empty / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SourceError, match="cannot read image"):
        open_source(empty)
    with pytest.raises(DelucevaError):
        open_source(VIDEOS / CAR, fps=0)
    with pytest.raises(DelucevaError):
        open_source(VIDEOS / CAR, max_frames=0)


def test_truncated_file_warns_and_yields_what_it_can(tmp_path: Path) -> None:
    data = (VIDEOS / CAR).read_bytes()
    half = tmp_path / "half.mp4"
    half.write_bytes(data[: len(data) // 2])
    with pytest.warns(SourceWarning, match="truncated"):
        frames, _ = read(half, fps=1)
    full = expected_indices(stream_times(CAR), 1.0)
    assert 5 < len(frames) < len(full)
    assert [f.index for f in frames] == full[: len(frames)]


def test_source_is_single_pass_and_closes() -> None:
    src = open_source(VIDEOS / CAR, max_frames=2)
    assert len(list(src)) == 2
    with pytest.raises(SourceError):
        list(src)
    src.close()
    src.close()
    assert os.path.exists(VIDEOS / CAR)
