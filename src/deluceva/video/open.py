"""open_source: one entry point for every kind of source spec."""

from __future__ import annotations

import os
from pathlib import Path

from deluceva.errors import DelucevaError, SourceError
from deluceva.video.base import VideoSource
from deluceva.video.images import ImageSequenceSource
from deluceva.video.pyav_source import PyAVSource
from deluceva.video.spec import SpecKind, classify


def open_source(
    spec: str | os.PathLike[str],
    *,
    fps: float | None = None,
    start: float = 0.0,
    max_frames: int | None = None,
    timeout: float = 5.0,
    folder_fps: float = 1.0,
    decode_threads: int = 0,
) -> VideoSource:
    """Open a video source; iterate it for `Frame`s.

    spec:       a video file (any container FFmpeg reads); an http(s)/rtsp/rtmp/hls/udp/srt URL; an image
                folder or a glob ("frames/*.jpg"); a V4L2 camera "/dev/videoN".
    fps:        sample by presentation time: keep the first frame at or after each multiple of 1/fps
                seconds after `start` (None: keep every frame).
    start:      skip to this many seconds (relative to the stream's start time).
    max_frames: stop after this many kept frames.
    timeout:    seconds to wait when opening a network stream or device before failing (a stream that
                then stalls fails after max(30 s, 2 * timeout) without data).
    folder_fps: the clock of an image sequence: image i is at i / folder_fps seconds.
    decode_threads: FFmpeg decoder threads (0: FFmpeg's choice).

    Raises SourceError (one line) when the source cannot be opened, DelucevaError for invalid options.
    """
    spec = os.fspath(spec)
    if max_frames is not None and max_frames < 1:
        raise DelucevaError(f"--max-frames must be >= 1, got {max_frames}")
    if not spec:
        raise SourceError("empty source")
    kind = classify(spec)
    common = {"fps": fps, "start": start, "max_frames": max_frames}
    if kind in (SpecKind.FOLDER, SpecKind.GLOB):
        return ImageSequenceSource(spec, is_glob=kind is SpecKind.GLOB, folder_fps=folder_fps, **common)
    if kind is SpecKind.FILE:
        if not os.path.exists(spec):
            raise SourceError(f"video not found: {spec}")
        if not os.access(spec, os.R_OK):
            raise SourceError(f"video not readable (permission denied): {spec}")
        if Path(spec).stat().st_size == 0:
            raise SourceError(f"video file is empty: {spec}")
    live = kind in (SpecKind.URL, SpecKind.DEVICE)
    device_format = "v4l2" if kind is SpecKind.DEVICE else None
    return PyAVSource(
        spec, live=live, timeout=timeout, device_format=device_format, decode_threads=decode_threads, **common
    )
