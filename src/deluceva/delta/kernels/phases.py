"""Stride-phase tap tables of an input-centric sparse conv (which taps each input pixel reaches, division-free).

Along an axis, input coordinate i reaches output coordinate o = (i * mul + off[t]) / div through tap t when the
division is exact and 0 <= o < O:
- conv:           mul = 1,      div = stride, off[t] = padding - k[t] * dilation
- conv_transpose: mul = stride, div = 1,      off[t] = k[t] * dilation - padding
Exactness depends only on the phase (i * mul) % div, so pixels fall into div_y * div_x phase classes, each with a
fixed list of reachable taps. Within a class, o = base + rel[t] with base = (i * mul + off0) / div computed once
per pixel, so the per-tap work has no division at all and no GEMM column is wasted on unreachable taps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PhasePlan:
    """Per phase class c = cy * div_x + cx: ntaps[c] reachable taps, their kernel-tap ids, offsets and relative
    output shifts (arrays padded to (ncls, Tmax))."""

    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    mul: tuple[int, int]
    div: tuple[int, int]
    ntaps: np.ndarray  # int64 (ncls,)
    tap: np.ndarray  # int64 (ncls, Tmax): index into the K*K taps (ky-major), -1 past ntaps
    off_y: np.ndarray  # int64 (ncls, Tmax)
    off_x: np.ndarray  # int64 (ncls, Tmax)
    off0_y: np.ndarray  # int64 (ncls,): offset of the class's first tap
    off0_x: np.ndarray
    rel_y: np.ndarray  # int64 (ncls, Tmax): (off - off0) / div
    rel_x: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.ntaps.shape[0])

    @staticmethod
    def build(
        in_hw: tuple[int, int],
        out_hw: tuple[int, int],
        kernel: tuple[int, int],
        tap_off_y: np.ndarray,
        tap_off_x: np.ndarray,
        mul: tuple[int, int],
        div: tuple[int, int],
    ) -> PhasePlan:
        """tap_off_y (Kh,), tap_off_x (Kw,): offsets per kernel row / column; taps are (ky, kx) ky-major."""
        kh, kw = kernel
        dy, dx = div
        per_class = []
        for cy in range(dy):
            for cx in range(dx):
                sel = [
                    (ky * kw + kx, int(tap_off_y[ky]), int(tap_off_x[kx]))
                    for ky in range(kh)
                    for kx in range(kw)
                    if (cy + tap_off_y[ky]) % dy == 0 and (cx + tap_off_x[kx]) % dx == 0
                ]
                per_class.append(sel)
        ncls, tmax = len(per_class), max(1, max(len(s) for s in per_class))
        tap = np.full((ncls, tmax), -1, np.int64)
        off_y, off_x = np.zeros((ncls, tmax), np.int64), np.zeros((ncls, tmax), np.int64)
        for c, sel in enumerate(per_class):
            for t, (k, oy, ox) in enumerate(sel):
                tap[c, t], off_y[c, t], off_x[c, t] = k, oy, ox
        ntaps = np.array([len(s) for s in per_class], np.int64)
        off0_y, off0_x = off_y[:, 0].copy(), off_x[:, 0].copy()
        rel_y = np.where(tap >= 0, (off_y - off0_y[:, None]) // dy, 0)
        rel_x = np.where(tap >= 0, (off_x - off0_x[:, None]) // dx, 0)
        return PhasePlan(
            tuple(in_hw), tuple(out_hw), tuple(mul), tuple(div), ntaps, tap, off_y, off_x, off0_y, off0_x,
            rel_y, rel_x,
        )  # fmt: skip

    def class_of(self, y: np.ndarray | int, x: np.ndarray | int):
        """Phase class of input coordinates (y, x)."""
        return ((y * self.mul[0]) % self.div[0]) * self.div[1] + (x * self.mul[1]) % self.div[1]
