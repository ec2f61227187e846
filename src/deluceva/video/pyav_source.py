"""PyAV (FFmpeg) source: video files, network streams (http(s)/rtsp/rtmp/hls) and V4L2 camera devices.

Timestamps: t = (pts - stream.start_time) * time_base, exact (Fraction). Frames without a pts get the
previous t + 1/nominal_fps. AVI stores no presentation timestamps (packets are numbered in decode order),
so with B-frames the decoder's frames carry scrambled pts; for AVI the k-th output frame gets the k-th
smallest pts seen within a small look-ahead window (a no-op for well-ordered streams).

`start` on a local file seeks to the keyframe before it and decodes forward; the index of the first
decoded frame is the number of packets whose pts lies before it (a demux-only pass, no decoding), so
indices equal those of a full decode. Elsewhere (AVI, live streams) frames before `start` are decoded and
dropped (never converted to RGB).
"""

from __future__ import annotations

import heapq
import itertools
import warnings
from collections import deque
from collections.abc import Iterator
from fractions import Fraction

import av
import numpy as np

from deluceva.errors import SourceError
from deluceva.video.base import VideoSource
from deluceva.video.frame import Frame
from deluceva.video.sampling import TimestampSampler

AVI_REORDER_WINDOW = 16  # frames held back to re-pair AVI frames with their timestamps
MAX_CONSECUTIVE_BAD_PACKETS = 50
_OPEN_ERRORS = (av.FFmpegError, OSError, ValueError, UnicodeDecodeError)


class SourceWarning(UserWarning):
    """A source problem that does not stop processing (e.g. a truncated file ends early)."""


def _reason(err: BaseException) -> str:
    """One-line reason from an FFmpeg/OS error, without errno numbers and file names."""
    return str(getattr(err, "strerror", None) or err).strip() or type(err).__name__


def _to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """uint8 (H, W, 3) RGB, contiguous. Only called for kept frames."""
    return np.ascontiguousarray(frame.to_ndarray(format="rgb24"))


class PyAVSource(VideoSource):
    """Frames of the first video stream of anything FFmpeg opens. See `open_source` for the options."""

    def __init__(
        self,
        spec: str,
        *,
        live: bool,
        fps: float | None = None,
        start: float = 0.0,
        max_frames: int | None = None,
        timeout: float = 5.0,
        device_format: str | None = None,
        decode_threads: int = 0,
    ) -> None:
        self.spec = spec
        self._live = live
        self._sampler = TimestampSampler(fps, start)
        self._max_frames = max_frames
        self._container = self._open(timeout, device_format)
        try:
            self._setup(decode_threads)
        except BaseException:
            self._container.close()
            raise
        self._iterated = False

    def _open(self, timeout: float, device_format: str | None) -> av.container.InputContainer:
        try:
            return av.open(
                self.spec, "r", format=device_format, timeout=(timeout, max(30.0, 2 * timeout)) if self._live else None
            )
        except FileNotFoundError:
            raise SourceError(f"video not found: {self.spec}") from None
        except ConnectionError as e:
            raise SourceError(f"cannot connect to {self.spec}: {_reason(e)}") from None
        except TimeoutError:
            raise SourceError(f"cannot open {self.spec}: no answer within {timeout:g} s") from None
        except av.InvalidDataError:
            raise SourceError(f"not a readable video (invalid or truncated data): {self.spec}") from None
        except _OPEN_ERRORS as e:
            raise SourceError(f"cannot open {self.spec}: {_reason(e)}") from None

    def _setup(self, decode_threads: int) -> None:
        c = self._container
        if not c.streams.video:
            raise SourceError(f"no video stream in {self.spec}")
        s = self._stream = c.streams.video[0]
        s.thread_type = "AUTO"
        if decode_threads:
            s.codec_context.thread_count = decode_threads
        self._tb = s.time_base or Fraction(1, 90000)
        rate = s.average_rate or s.guessed_rate or s.base_rate
        self.nominal_fps = float(rate) if rate else None
        self._reorder = c.format.name == "avi"
        self._duration = self._declared_duration()
        self._seek_index: int | None = None
        self._origin: int | None = s.start_time
        self._decoded = self._timed_frames()
        self._pending: list[tuple[int, av.VideoFrame, Fraction]] = []
        h, w = s.codec_context.height, s.codec_context.width
        if not (h and w):  # some live streams only know their size after the first frame
            first = next(self._decoded, None)
            if first is None:
                raise SourceError(f"no decodable video frames in {self.spec}")
            self._pending.append(first)
            h, w = first[1].height, first[1].width
        self.source_hw = (int(h), int(w))
        self.estimated_frames = self._estimate()

    def _declared_duration(self) -> Fraction | None:
        """Stream duration in seconds from the container (None for live streams or when unknown)."""
        if self._live and not self.spec.lower().startswith(("http://", "https://")):
            return None
        s = self._stream
        if s.duration:
            return s.duration * self._tb
        if self._container.duration:
            return Fraction(self._container.duration, av.time_base)
        return None

    def _estimate(self) -> int | None:
        if self._duration is None:
            return None
        n = self._sampler.expected_count(self._duration)
        if n is None:  # every frame after start
            if self._sampler.start == 0 and self._stream.frames:
                n = int(self._stream.frames)
            elif self.nominal_fps:
                n = max(0, round(float(self._duration - self._sampler.start) * self.nominal_fps))
            else:
                return None
        return n if self._max_frames is None else min(n, self._max_frames)

    # --- decoding ---

    def _seek_to_start(self) -> bool:
        """Seek a local, well-timestamped file to the keyframe before `start`; False if not applicable."""
        start = self._sampler.start
        if start <= 0 or self._live or self._reorder or self._origin is None:
            return False
        try:
            self._container.seek(self._origin + int(start / self._tb), stream=self._stream, backward=True)
        except _OPEN_ERRORS:
            return False
        self._seek_index = -1  # resolved from the first decoded frame's pts
        return True

    def _frames(self) -> Iterator[av.VideoFrame]:
        """Decoded frames in output order; isolated undecodable packets are skipped."""
        bad = 0
        try:
            for packet in self._container.demux(self._stream):
                try:
                    frames = packet.decode()
                except (av.InvalidDataError, av.error.EOFError) as e:
                    bad += 1
                    if bad > MAX_CONSECUTIVE_BAD_PACKETS:
                        raise SourceError(f"cannot decode {self.spec}: {_reason(e)}") from None
                    continue
                bad = 0
                yield from frames
        except TimeoutError:
            raise SourceError(f"{self.spec}: stream stalled (no data for too long)") from None
        except _OPEN_ERRORS as e:
            raise SourceError(f"cannot read {self.spec}: {_reason(e)}") from None

    def _with_pts(self) -> Iterator[tuple[av.VideoFrame, int | None]]:
        """(frame, pts in time_base units); for AVI, pts re-paired with output order (see module doc)."""
        if not self._reorder:
            for f in self._frames():
                yield f, f.pts
            return
        held: deque[av.VideoFrame] = deque()
        heap: list[int] = []
        for f in self._frames():
            held.append(f)
            if f.pts is not None:
                heapq.heappush(heap, f.pts)
            if len(held) > AVI_REORDER_WINDOW:
                yield held.popleft(), heapq.heappop(heap) if heap else None
        while held:
            yield held.popleft(), heapq.heappop(heap) if heap else None

    def _timed_frames(self) -> Iterator[tuple[int, av.VideoFrame, Fraction]]:
        """(index, frame, t seconds) for every decoded frame."""
        seeking = self._seek_to_start()
        index = 0
        t_prev: Fraction | None = None
        rate = Fraction(self.nominal_fps or 0).limit_denominator(100000)
        step = 1 / rate if rate else Fraction(0)
        for frame, pts in self._with_pts():
            if seeking and self._seek_index == -1:
                if pts is None:
                    raise SourceError(f"{self.spec}: frames have no timestamps, cannot seek to --start")
                index = self._seek_index = self._count_packets_before(pts)
            if pts is not None and self._origin is None:
                self._origin = pts
            if pts is None or self._origin is None:
                t = Fraction(0) if t_prev is None else t_prev + step
            else:
                t = (pts - self._origin) * self._tb
            t_prev = t
            yield index, frame, t
            index += 1

    def _count_packets_before(self, pts: int) -> int:
        """Number of frames that precede `pts` (demux only; dts <= pts, so stop at dts >= pts)."""
        n = 0
        with av.open(self.spec, "r") as c:
            s = c.streams.video[0]
            for packet in c.demux(s):
                if packet.dts is not None and packet.dts >= pts:
                    break
                if packet.pts is not None and packet.size and packet.pts < pts:
                    n += 1
        return n

    # --- public ---

    def __iter__(self) -> Iterator[Frame]:
        if self._iterated:
            raise SourceError(f"{self.spec}: a source can be iterated only once; open it again")
        self._iterated = True
        return self._iterate()

    def _iterate(self) -> Iterator[Frame]:
        kept = 0
        decoded = 0
        last_t: Fraction | None = None
        pending, self._pending = self._pending, []
        for index, frame, t in itertools.chain(pending, self._decoded):
            decoded += 1
            last_t = t
            if not self._sampler.keep(t):
                continue
            yield Frame(index, float(t), _to_rgb(frame))
            kept += 1
            if self._max_frames is not None and kept >= self._max_frames:
                return
        if decoded == 0 and self._seek_index is None:
            raise SourceError(f"no decodable video frames in {self.spec}")
        self._check_complete(last_t)

    def _check_complete(self, last_t: Fraction | None) -> None:
        """Warn when a file ends well before its declared duration (truncated download, broken file)."""
        if self._live or self._duration is None or last_t is None:
            return
        slack = max(Fraction(1, 2), 2 / Fraction(self.nominal_fps or 1).limit_denominator(1000))
        if last_t + slack < self._duration:
            warnings.warn(
                f"{self.spec}: decoding ended at {float(last_t):.2f} s but the file declares "
                f"{float(self._duration):.2f} s (truncated or damaged file?)",
                SourceWarning,
                stacklevel=3,
            )

    def close(self) -> None:
        self._container.close()
