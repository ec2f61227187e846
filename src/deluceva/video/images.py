"""Image-sequence source: the sorted image files of a folder, or the files a glob matches.

Image i is at t = i / folder_fps seconds (default 1 fps: each image counts as one second, so `--fps 1`
keeps every image). Files are sorted in natural order (frame2.png before frame10.png). Skipped images are
never read.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Iterator

import cv2
import numpy as np

from deluceva.errors import DelucevaError, SourceError
from deluceva.video.base import VideoSource
from deluceva.video.frame import Frame
from deluceva.video.sampling import TimestampSampler, exact

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
_DIGITS = re.compile(r"(\d+)")


def natural_key(path: str) -> list[str | int]:
    """Sort key that orders embedded numbers numerically: 'f2.png' < 'f10.png'."""
    return [int(p) if p.isdigit() else p.lower() for p in _DIGITS.split(path)]


def list_images(spec: str, is_glob: bool) -> list[str]:
    """Image files of a folder (by suffix) or every file a glob matches, in natural order."""
    if is_glob:
        paths = [p for p in glob.glob(spec) if os.path.isfile(p)]
    else:
        paths = [
            e.path
            for e in os.scandir(spec)
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        ]
    return sorted(paths, key=natural_key)


def read_rgb(path: str) -> np.ndarray:
    """uint8 (H, W, 3) RGB of an image file (grey and 16-bit images are converted)."""
    bgr = cv2.imread(path, cv2.IMREAD_COLOR)
    if bgr is None:
        raise SourceError(f"cannot read image {path}")
    return np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


class ImageSequenceSource(VideoSource):
    """Frames from image files. `folder_fps` sets the images' clock (see module doc)."""

    def __init__(
        self,
        spec: str,
        *,
        is_glob: bool,
        fps: float | None = None,
        start: float = 0.0,
        max_frames: int | None = None,
        folder_fps: float = 1.0,
    ) -> None:
        self.spec = spec
        if not folder_fps > 0:
            raise DelucevaError(f"folder fps must be positive, got {folder_fps}")
        self._paths = list_images(spec, is_glob)
        if not self._paths:
            what = "no files match" if is_glob else "no image files in folder"
            raise SourceError(f"{what}: {spec}")
        self.nominal_fps = float(folder_fps)
        period = 1 / exact(folder_fps)
        sampler = TimestampSampler(fps, start)
        self._kept = [i for i in range(len(self._paths)) if sampler.keep(i * period)]
        if max_frames is not None:
            self._kept = self._kept[:max_frames]
        self._period = period
        self.estimated_frames = len(self._kept)
        first = self._paths[self._kept[0]] if self._kept else self._paths[0]
        self._first_rgb = read_rgb(first)
        self.source_hw = (int(self._first_rgb.shape[0]), int(self._first_rgb.shape[1]))

    def __iter__(self) -> Iterator[Frame]:
        for n, i in enumerate(self._kept):
            rgb = self._first_rgb if n == 0 else read_rgb(self._paths[i])
            yield Frame(i, float(i * self._period), rgb)
        self._first_rgb = np.zeros((0, 0, 3), np.uint8)

    @property
    def paths(self) -> list[str]:
        """All image files of the sequence, in frame order."""
        return list(self._paths)

