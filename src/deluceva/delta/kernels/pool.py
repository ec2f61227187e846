"""Max-pool delta from the stored input and output.

State: the input x rows (N*H*W, C) and output y rows (N*Ho*Wo, C), channels-last. Per call: x[idx] += Δx and the
outputs whose window holds an active input are updated, Δy = new - old there (rows that stay equal are dropped).
The numba kernels update incrementally for few active pixels (a raised value is compared with the output, a lowered
one that was the maximum triggers a re-max of that channel's window) and re-pool every affected window for many;
the torch fallback re-maxes every affected window from gathered (B, K*K, C) windows.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deluceva.delta.kernels._jit import jit, resolve_backend
from deluceva.delta.kernels.conv import IntPair, _pair, conv_out_hw, conv_plan
from deluceva.delta.kernels.scatter import reach_nb, reachable, sorted_marked_nb
from deluceva.delta.pixels import PixelDelta


@jit
def _maxpool_delta_nb(pix, vals, x, y, y0, mark, touched, h, w, ho, wo, kh, kw, sy, sx, py, px, dy, dx):
    """Apply Δx (pix, vals) to the stored input rows x and update the max-pool output rows y incrementally, pixel by
    pixel: at each output whose window holds the pixel, a channel whose new input value beats the output takes it;
    a channel whose output was this pixel's old value and that value dropped is re-maxed over its window; others
    keep their value. So a pixel costs O(K*K*C) plus the rare re-max, not O(K^4*C) as re-pooling every affected
    window would (YOLOX-Nano's 13x13 SPP pool: ~40x less). y0 (scratch, rows of y) keeps the outputs' values before
    the call. Returns (sorted index, Δy rows) of the outputs that changed."""
    ch = x.shape[1]
    hw = h * w
    ohw = ho * wo
    old = np.empty(ch, x.dtype)
    nt = 0
    for i in range(pix.shape[0]):
        p = pix[i]
        n = p // hw
        r = p - n * hw
        iy = r // w
        ix = r - iy * w
        xr = x[p]
        for c in range(ch):
            old[c] = xr[c]
            xr[c] = xr[c] + vals[i, c]
        for ky in range(kh):
            ty = iy + py - ky * dy
            if ty < 0 or ty % sy != 0 or ty // sy >= ho:
                continue
            oy = ty // sy
            for kx in range(kw):
                tx = ix + px - kx * dx
                if tx < 0 or tx % sx != 0 or tx // sx >= wo:
                    continue
                ox = tx // sx
                o = n * ohw + oy * wo + ox
                yr = y[o]
                if mark[o] == 0:
                    mark[o] = 1
                    touched[nt] = o
                    nt += 1
                    y0[o, :] = yr
                for c in range(ch):
                    v = xr[c]
                    if v > yr[c]:
                        yr[c] = v
                    elif v < old[c] and old[c] == yr[c]:  # this pixel held the maximum and dropped: re-max
                        best = -np.inf
                        for wy in range(kh):
                            sy_ = oy * sy - py + wy * dy
                            if sy_ < 0 or sy_ >= h:
                                continue
                            for wx in range(kw):
                                sx_ = ox * sx - px + wx * dx
                                if sx_ < 0 or sx_ >= w:
                                    continue
                                u = x[n * hw + sy_ * w + sx_, c]
                                if u > best:
                                    best = u
                        yr[c] = best
    idx = sorted_marked_nb(touched, nt, mark)
    out = np.empty((nt, ch), y.dtype)
    m = 0
    for j in range(nt):
        o = idx[j]
        mark[o] = 0
        changed = False
        for c in range(ch):
            d = y[o, c] - y0[o, c]
            out[m, c] = d
            changed |= d != 0
        if changed:
            idx[m] = o
            m += 1
    return idx[:m], out[:m]


@jit
def _repool_nb(outs, x, y, h, w, ho, wo, kh, kw, sy, sx, py, px, dy, dx):
    """Recompute max-pool outputs `outs` from x; returns (index, Δ rows) of those that changed, updates y."""
    ch = x.shape[1]
    hw = h * w
    ohw = ho * wo
    b = outs.shape[0]
    idx = np.empty(b, np.int64)
    out = np.empty((b, ch), x.dtype)
    new = np.empty(ch, x.dtype)
    m = 0
    for j in range(b):
        o = outs[j]
        n = o // ohw
        r = o - n * ohw
        oy = r // wo
        ox = r - oy * wo
        new[:] = -np.inf
        for ky in range(kh):
            iy = oy * sy - py + ky * dy
            if iy < 0 or iy >= h:
                continue
            for kx in range(kw):
                ix = ox * sx - px + kx * dx
                if ix < 0 or ix >= w:
                    continue
                src = n * hw + iy * w + ix
                for c in range(ch):
                    v = x[src, c]
                    if v > new[c]:
                        new[c] = v
        changed = False
        for c in range(ch):
            d = new[c] - y[o, c]
            out[m, c] = d
            if d != 0:
                changed = True
            y[o, c] = new[c]
        if changed:
            idx[m] = o
            m += 1
    return idx[:m], out[:m]


# Above this active fraction the outputs are re-pooled (`_repool_nb`): with most pixels changing, the incremental
# update's per-pixel passes over K*K outputs (and its re-maxes) cost 2-4x more (measured: 13x13 and 9x9 pools,
# 128 channels, 50-100% active)
INCREMENTAL_MAX_FRACTION = 0.25


class SparseMaxPool2d:
    """Sparse delta of F.max_pool2d(x, kernel, stride, padding, dilation) for one input shape (N, C, H, W)."""

    def __init__(
        self,
        input_shape: tuple[int, int, int, int],
        kernel: IntPair,
        stride: IntPair | None = None,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        backend: str = "auto",
    ):
        n, c, h, w = input_shape
        self.in_shape = (n, c, h, w)
        self.kernel = _pair(kernel)
        self.stride = _pair(stride if stride is not None else kernel)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.backend = resolve_backend(backend)
        ho, wo = conv_out_hw((h, w), self.kernel, self.stride, self.padding, self.dilation)
        self.out_shape = (n, c, ho, wo)
        # input -> output reachability is that of a conv with the same geometry
        self._reach = conv_plan((h, w), self.kernel, self.stride, self.padding, self.dilation)
        self.x = torch.zeros(n * h * w, c)
        self.y = torch.zeros(n * ho * wo, c)
        self._x_np, self._y_np = self.x.numpy(), self.y.numpy()  # x, y are updated in place, never replaced
        self._geometry = (h, w, ho, wo, *self.kernel, *self.stride, *self.padding, *self.dilation)
        self._y0 = np.empty((n * ho * wo, c), np.float32) if self.backend == "numba" else None
        self._mark = np.zeros(n * ho * wo, np.uint8)
        self._touched = np.empty(n * ho * wo, np.int64)

    def seed(self, dense_x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Set x and y from a dense (N, C, H, W) input (y: its max-pool when already computed)."""
        n, c, h, w = self.in_shape
        self.x.copy_(dense_x.permute(0, 2, 3, 1).reshape(n * h * w, c))
        if y is None:
            y = F.max_pool2d(dense_x, self.kernel, self.stride, self.padding, self.dilation)
        self.y.copy_(y.permute(0, 2, 3, 1).reshape(-1, c))

    def __call__(self, delta: PixelDelta) -> PixelDelta:
        if delta.active == 0:
            return PixelDelta.empty(self.out_shape, delta.values.dtype)
        if self.backend == "numba" and delta.active_fraction > INCREMENTAL_MAX_FRACTION:
            self.x.index_add_(0, delta.index, delta.values)
            p = self._reach
            outs = reach_nb(delta.index_np, *p.in_hw, *p.out_hw, *p.mul, *p.div, p.ntaps, p.off0_y, p.off0_x,
                            p.rel_y, p.rel_x, self._mark, self._touched)  # fmt: skip
            idx, rows = _repool_nb(outs, self._x_np, self._y_np, *self._geometry)
            return PixelDelta(idx, rows, self.out_shape)
        if self.backend == "numba":
            idx, rows = _maxpool_delta_nb(delta.index_np, delta.values_np, self._x_np, self._y_np, self._y0,
                                          self._mark, self._touched, *self._geometry)  # fmt: skip
            return PixelDelta(idx, rows, self.out_shape)
        self.x.index_add_(0, delta.index, delta.values)
        return self._torch(reachable(self._reach, delta.index))

    def _torch(self, aff: torch.Tensor) -> PixelDelta:
        n, c, h, w = self.in_shape
        _, _, ho, wo = self.out_shape
        (kh, kw), (py, px), (dy, dx) = self.kernel, self.padding, self.dilation
        win_y = torch.arange(kh).repeat_interleave(kw) * dy - py
        win_x = torch.arange(kw).repeat(kh) * dx - px
        b, r = aff.div(ho * wo, rounding_mode="floor"), aff.remainder(ho * wo)
        oy, ox = r.div(wo, rounding_mode="floor"), r.remainder(wo)
        iy = oy[:, None] * self.stride[0] + win_y[None]
        ix = ox[:, None] * self.stride[1] + win_x[None]
        valid = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
        src = torch.where(valid, b[:, None] * (h * w) + iy * w + ix, 0)
        win = self.x.index_select(0, src.reshape(-1)).view(aff.numel(), -1, c)
        new = win.masked_fill(~valid[:, :, None], float("-inf")).amax(1)
        out = new - self.y.index_select(0, aff)
        self.y.index_copy_(0, aff, new)
        keep = out.abs().amax(1).ne(0)
        if not bool(keep.all()):
            sel = keep.nonzero().squeeze(1)
            aff, out = aff.index_select(0, sel), out.index_select(0, sel)
        return PixelDelta(aff, out, self.out_shape)
