"""The network input's delta with a noise floor: changes are held back until they exceed the floor.

State: the input applied so far `x_applied` (N, C, H, W). Per frame: a = x - x_applied; forward every pixel whose
max-over-channels |a| exceeds `floor` (all channels of it), and set x_applied = x there. What is held back is exactly
x - x_applied, so nothing is dropped: a pixel drifting slowly is forwarded once its accumulated change exceeds the
floor. floor = 0 forwards every changed pixel (exact). One pass over the input (a fused numba kernel for contiguous
float32 inputs, vectorised torch otherwise), no per-pixel Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from deluceva.delta.kernels._jit import HAVE_NUMBA, index_scratch, jit
from deluceva.delta.pixels import PixelDelta


@jit
def _input_delta_nb(x, a, floor, scratch):  # pragma: no cover - compiled
    """x, a: (N, C, P) float32; returns (idx (A,), vals (A, C)) of the pixels with max_c |x - a| > floor, and sets
    a = x there. One read pass over x and a (3-channel inputs: the channels side by side); scratch (N*P,) work."""
    n, c, p = x.shape
    cnt = 0
    for b in range(n):
        if c == 3:
            x0, x1, x2, a0, a1, a2 = x[b, 0], x[b, 1], x[b, 2], a[b, 0], a[b, 1], a[b, 2]
            for q in range(p):
                if max(abs(x0[q] - a0[q]), abs(x1[q] - a1[q]), abs(x2[q] - a2[q])) > floor:
                    scratch[cnt] = b * p + q
                    cnt += 1
        else:
            for q in range(p):
                m = abs(x[b, 0, q] - a[b, 0, q])
                for ch in range(1, c):
                    v = abs(x[b, ch, q] - a[b, ch, q])
                    if v > m:
                        m = v
                if m > floor:
                    scratch[cnt] = b * p + q
                    cnt += 1
    idx = scratch[:cnt].copy()
    vals = np.empty((cnt, c), x.dtype)
    for i in range(cnt):
        g = idx[i]
        b = g // p
        q = g - b * p
        for ch in range(c):
            xv = x[b, ch, q]
            vals[i, ch] = xv - a[b, ch, q]
            a[b, ch, q] = xv
    return idx, vals


def input_delta(x: torch.Tensor, applied: torch.Tensor, floor: float) -> PixelDelta | None:
    """PixelDelta of x (N, C, H, W) against `applied` (updated in place at the forwarded pixels); None if none.

    The floor compares in x's dtype (as `tensor > floor` does in torch)."""
    n, c, h, w = x.shape
    if (HAVE_NUMBA and x.dtype == torch.float32 and applied.dtype == torch.float32 and c > 0
            and x.is_contiguous() and applied.is_contiguous()):
        idx, vals = _input_delta_nb(x.detach().numpy().reshape(n, c, h * w), applied.numpy().reshape(n, c, h * w),
                                    np.float32(floor), index_scratch(n * h * w))
        if idx.shape[0] == 0:
            return None
        return PixelDelta(idx, vals, (n, c, h, w))
    d = x - applied
    mask = d.abs().amax(1) > floor  # (N, H, W)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    if n == 1:
        vals = d.view(c, h * w).index_select(1, idx).t().contiguous()
        applied.view(c, h * w).index_copy_(1, idx, x.reshape(c, h * w).index_select(1, idx))
    else:
        vals = d.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        flat = applied.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a copy for NCHW: write back below
        flat.index_copy_(0, idx, rows)
        applied.copy_(flat.view(n, h, w, c).permute(0, 3, 1, 2))
    return PixelDelta(idx, vals, (n, c, h, w))


@jit
def _max_absdiff_over_nb(u, a, limit):  # pragma: no cover - compiled
    """Whether some |u - a| (uint8 (h, w*c) rows) exceeds `limit`; stops at the first row that has one."""
    h, w = u.shape
    for i in range(h):
        m = 0
        for j in range(w):
            d = abs(np.int16(u[i, j]) - np.int16(a[i, j]))
            m = max(m, d)
        if m > limit:
            return True
    return False


@jit
def _change_histogram_nb(u, a, step, hist):  # pragma: no cover - compiled
    """hist[v] = number of sampled pixels (every `step`-th row and column) whose largest channel change |u - a| is
    v grey levels (uint8 (H, W, C) images)."""
    hist[:] = 0
    h, w, c = u.shape
    for i in range(0, h, step):
        for j in range(0, w, step):
            m = 0
            for k in range(c):
                m = max(m, abs(np.int16(u[i, j, k]) - np.int16(a[i, j, k])))
            hist[m] += 1


@jit
def _mirror_update_nb(a, u, idx, top, left, canvas_w, canvas_hw):  # pragma: no cover - compiled
    """a[y, x] = u[y, x] at the image pixels of canvas pixel indices idx (batch 1; pad pixels skipped)."""
    h, w = a.shape[0], a.shape[1]
    for k in range(idx.shape[0]):
        q = idx[k] % canvas_hw
        y = q // canvas_w - top
        x = q % canvas_w - left
        if 0 <= y < h and 0 <= x < w:
            a[y, x, :] = u[y, x, :]


class InputMirror:
    """uint8 copy of the input the delta network has applied so far, over the image a detector's `fit` places on the
    canvas (batch 1): finds frames that change no pixel beyond the input floor without building the float input.

    `unchanged(img, floor_grey)` is conservative: True only if every |img - mirror| <= `margin(floor_grey)` grey
    levels, under the input floor by at least half a grey level (0 when the floor is 0: only an identical image), so
    the float comparison of `input_delta` would forward nothing either. Keep it in step: `seeded(img)` after a
    dense frame (the network applied the whole input), `applied(img, index)` after a delta frame (index: the
    forwarded canvas pixels, `PixelDelta.index_np` of the input delta), `invalidate()` when the network's input state
    is unknown, or `previous(img)` after a frame the dense engine ran: the image is then only the reference of
    `typical_change` (the next frame's change against this one), not an applied input.
    """

    def __init__(self, top: int, left: int, canvas_hw: tuple[int, int]) -> None:
        self.top, self.left = top, left
        self.canvas_hw = canvas_hw
        self.image: np.ndarray | None = None
        self.is_applied = False  # `image` is the network's applied input (not only the previous frame)
        self._held = False  # `image` holds a frame (`forget` drops it and keeps the buffer)
        self._hist = np.zeros(256, np.int64)  # typical_change's histogram of the last image compared
        self._hist_fresh = False  # that histogram compares the current reference image with the last one given

    @staticmethod
    def margin(floor_grey: float) -> int:
        """Largest whole change in grey levels surely at or under an input floor of `floor_grey` grey levels."""
        return max(0, math.ceil(floor_grey - 0.5) - 1)

    def _comparable(self, img: np.ndarray) -> bool:
        """Whether the kernels can compare `img` with the mirror (one is held, same shape, uint8)."""
        a = self.image
        return a is not None and self._held and a.shape == img.shape and img.dtype == np.uint8 and HAVE_NUMBA

    def unchanged(self, img: np.ndarray, floor_grey: float) -> bool:
        if not self.is_applied or not self._comparable(img):
            return False
        a = self.image
        h = img.shape[0]
        limit = self.margin(floor_grey)
        return not _max_absdiff_over_nb(np.ascontiguousarray(img).reshape(h, -1), a.reshape(h, -1), limit)

    def typical_change(self, img: np.ndarray, step: int = 4) -> int | None:
        """Median over the image's pixels (every `step`-th row and column: ~0.1 ms at 768x432) of the largest
        channel change |img - mirror| in grey levels, or None when there is no mirror to compare with."""
        if not self._comparable(img) or img.ndim != 3:
            return None
        hist = self._hist
        _change_histogram_nb(img, self.image, step, hist)
        self._hist_fresh = step == 4
        cum = np.cumsum(hist)
        return int(np.searchsorted(cum, (cum[-1] + 1) // 2))

    def activity(self, floor_grey: float) -> float | None:
        """After `typical_change(img)` against a `previous` frame (a stay on the dense engine): the guard's input
        activity of img from the same histogram (`plan.guard.activity` on the canvas: the share of pixels sampled
        every 4th row and column whose largest channel change exceeds `floor_grey`, the canvas's never-changing
        padding counted as unchanged), without a pass of its own; None otherwise."""
        if not self._hist_fresh or self.is_applied or self.image is None:
            return None
        ch, cw = self.canvas_hw
        above = int(self._hist[int(math.floor(floor_grey)) + 1:].sum())
        return above / (-(-ch // 4) * -(-cw // 4)) if above else 0.0

    def seeded(self, img: np.ndarray) -> None:
        a = self.image
        if img.dtype != np.uint8:
            self.image = None
        elif a is not None and a.shape == img.shape:
            np.copyto(a, img)  # into the buffer held: a new 1 MB array per frame costs its page faults (~0.1 ms)
        else:
            self.image = np.array(img, dtype=np.uint8, copy=True)
        self.is_applied = self._held = self.image is not None
        self._hist_fresh = False

    def previous(self, img: np.ndarray, owned: bool = False) -> None:
        """The dense engine ran `img`: keep it as the reference of `typical_change` only, a copy (~0.2 ms) unless
        `owned` (nobody else holds or writes it: e.g. `fit`'s resized image, not the caller's frame)."""
        if owned and img.dtype == np.uint8:
            self.image = img  # (the next `seeded` copies into it)
            self._held = True
        else:
            self.seeded(img)
        self.is_applied = False
        self._hist_fresh = False

    def applied(self, img: np.ndarray, index: np.ndarray | None) -> None:
        a = self.image
        self._hist_fresh = False
        if a is None or a.shape != img.shape or not self.is_applied:
            self.invalidate()
            return
        if index is not None and index.shape[0]:
            _mirror_update_nb(a, np.ascontiguousarray(img), index, self.top, self.left, self.canvas_hw[1],
                              self.canvas_hw[0] * self.canvas_hw[1])

    def forget(self) -> None:
        """Nothing will be compared with the mirror's image (a stay on the dense engine that measures no frame):
        drop it, keeping its buffer (the next `seeded` or `previous` copies into it)."""
        self.is_applied = self._hist_fresh = False
        self._held = False

    def invalidate(self) -> None:
        self.image = None
        self.is_applied = self._hist_fresh = False
