"""AnnotatedVideoSink: frames with detections drawn, encoded with PyAV (libx264, else mpeg4)."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from deluceva.errors import OutputError
from deluceva.sinks.atomic import AtomicPath, CommitOnExit
from deluceva.sinks.draw import as_records, draw_detections
from deluceva.zoo.base import Detections

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")


def pick_codec() -> str:
    """'libx264' if this FFmpeg build has the encoder, else 'mpeg4'."""
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.FFmpegError, ValueError, KeyError):
        return "mpeg4"


class AnnotatedVideoSink(CommitOnExit):
    """Writes annotated frames to a video at constant `fps`.

    path:    .mp4, .mkv, .mov or .avi; written to a hidden temporary file beside it and renamed on
             successful close (an exception in a `with` block, or `abort()`, leaves no file).
    fps:     output frame rate (e.g. the sampling rate).
    size_hw: (H, W) of the output; None: the first frame's size. Frames of another size are resized to
             it; odd sizes are padded to even (yuv420p needs even sides).
    names:   class names, used when `write` gets a `Detections` instead of records.
    A sink that received no frame writes no file.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float,
        size_hw: tuple[int, int] | None = None,
        *,
        names: list[str] | None = None,
        codec: str | None = None,
    ) -> None:
        if Path(path).suffix.lower() not in VIDEO_SUFFIXES:
            raise OutputError(f"annotated video must end in one of {', '.join(VIDEO_SUFFIXES)}: {path}")
        if not fps > 0:
            raise OutputError(f"annotated video fps must be positive, got {fps}")
        self._atomic = AtomicPath(path)
        self.fps = Fraction(fps).limit_denominator(1001)
        self.size_hw = tuple(size_hw) if size_hw else None
        self.names = names
        self.codec = codec or pick_codec()
        self.count = 0
        try:
            self._container = av.open(str(self._atomic.temp), "w")
        except (av.FFmpegError, OSError) as e:
            self._atomic.abort()
            raise OutputError(f"cannot write video {path}: {e}") from None
        self._stream: av.VideoStream | None = None

    @property
    def path(self) -> Path:
        return self._atomic.target

    def _open_stream(self, h: int, w: int) -> av.VideoStream:
        options = {"preset": "veryfast", "crf": "23"} if self.codec == "libx264" else {}
        s = self._container.add_stream(self.codec, rate=self.fps, options=options)
        s.width, s.height = w + w % 2, h + h % 2
        s.pix_fmt = "yuv420p"
        if self.codec != "libx264":
            s.bit_rate = int(min(8e6, max(1e6, 4 * w * h)))
        return s

    def write(
        self, rgb: np.ndarray, detections: Detections | list[dict] | None = None, caption: str | None = None
    ) -> None:
        """Draw `detections` (records or Detections) on a copy of uint8 (H, W, 3) `rgb` and encode it."""
        if self.size_hw is None:
            self.size_hw = (int(rgb.shape[0]), int(rgb.shape[1]))
        h, w = self.size_hw
        img = draw_detections(rgb, as_records(detections or [], self.names), caption)
        if img.shape[:2] != (h, w):
            img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        if h % 2 or w % 2:
            img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_CONSTANT, value=(0, 0, 0))
        if self._stream is None:
            self._stream = self._open_stream(h, w)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
        frame.pts = self.count
        frame.time_base = 1 / self.fps
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self.count += 1

    def close(self) -> Path:
        """Flush the encoder and publish the video; returns its path."""
        if self._atomic.done:
            return self.path
        if self._stream is None:
            self.abort()
            return self.path
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._atomic.commit()
        return self.path

    def abort(self) -> None:
        """Discard the video; no file appears at the path."""
        if self._atomic.done:
            return
        try:
            self._container.close()
        except (av.FFmpegError, OSError):
            pass
        finally:
            self._atomic.abort()

