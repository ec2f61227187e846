"""VideoSource: what every source offers (iteration over kept frames, geometry, rate, size estimate)."""

from __future__ import annotations

from collections.abc import Iterator

from deluceva.video.frame import Frame


class VideoSource:
    """An iterable of kept `Frame`s, single pass, also a context manager (closing releases the decoder).

    source_hw:        (H, W) of the first frame.
    nominal_fps:      the source's declared frame rate (None if it declares none).
    estimated_frames: how many frames iteration will yield after start/fps/max_frames (for progress
                      bars and ETAs; exact for constant-frame-rate files, an estimate otherwise), None
                      for live sources.
    """

    source_hw: tuple[int, int]
    nominal_fps: float | None
    estimated_frames: int | None
    spec: str

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def close(self) -> None:
        """Release resources; idempotent."""

    def __enter__(self) -> VideoSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.spec!r}, hw={self.source_hw}, fps={self.nominal_fps}, "
                f"estimated_frames={self.estimated_frames})")
