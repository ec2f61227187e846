"""The unit a source yields: one decoded, kept frame."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(eq=False)
class Frame:
    """One kept frame of a source.

    index:       0-based position of the frame in the source's output order (the order the decoder
                 emits frames, i.e. presentation order), counted over ALL frames, also those that
                 sampling or `start` skipped.
    pts_seconds: presentation time in seconds, relative to the stream's start time (first frame ~0).
    rgb:         uint8 (H, W, 3) RGB, C-contiguous.
    """

    index: int
    pts_seconds: float
    rgb: np.ndarray
