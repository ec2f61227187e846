"""Max-pool delta from the stored input and output.

State: the input x rows (N*H*W, C) and output y rows (N*Ho*Wo, C), channels-last. Per call: x[idx] += Δx and the
outputs whose window holds an active input are updated, Δy = new - old there (rows that stay equal are dropped).
The numba kernel re-pools every affected window separably (window-row maxima shared between neighbouring
outputs); the torch fallback re-maxes every affected window from gathered (B, K*K, C) windows. An incremental
update (compare a raised value with the output, re-max a window whose maximum dropped) was 2-4x slower on real
filtered deltas at every active fraction (YOLOv5n's 5x5 and YOLOX-Nano's 13x13 SPP pools, 2-42% active): about
half the forwarded deltas are negative and the pixels that change are often their window's maximum.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deluceva.delta.kernels._jit import jit, resolve_backend
from deluceva.delta.kernels.conv import IntPair, _pair, conv_out_hw, conv_plan
from deluceva.delta.kernels.scatter import reach_nb, reachable
from deluceva.delta.pixels import PixelDelta


@jit
def _repool_nb(outs, x, y, rowmax, seen, h, w, ho, wo, kh, kw, sy, sx, py, px, dy, dx):
    """Recompute the max-pool outputs `outs` from the input rows x, separably: the maximum over one window row
    (input row iy, output column ox) is computed once per call into rowmax ((N*H*Wo, C) scratch; seen (N*H*Wo,)
    uint8, all 0 between calls) and shared by every output whose window holds that row, so an output costs ~K*C,
    not K*K*C, when its neighbours are recomputed too. Updates y; returns (index, Δ rows) of the outputs that
    changed."""
    ch = x.shape[1]
    hw = h * w
    ohw = ho * wo
    b = outs.shape[0]
    idx = np.empty(b, np.int64)
    out = np.empty((b, ch), x.dtype)
    new = np.empty(ch, x.dtype)
    used = np.empty(b * kh, np.int64)  # the rowmax rows filled in this call (their seen marks are cleared)
    nu = 0
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
            q = (n * h + iy) * wo + ox
            rm = rowmax[q]
            if seen[q] == 0:
                seen[q] = 1
                used[nu] = q
                nu += 1
                rm[:] = -np.inf
                for kx in range(kw):
                    ix = ox * sx - px + kx * dx
                    if ix < 0 or ix >= w:
                        continue
                    src = n * hw + iy * w + ix
                    for c in range(ch):
                        v = x[src, c]
                        if v > rm[c]:
                            rm[c] = v
            for c in range(ch):
                if rm[c] > new[c]:
                    new[c] = rm[c]
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
    for k in range(nu):
        seen[used[k]] = 0
    return idx[:m], out[:m]


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
        self._rowmax = np.empty((n * h * wo, c), np.float32) if self.backend == "numba" else None
        self._seen = np.zeros(n * h * wo, np.uint8)
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
        if self.backend == "numba":
            self.x.index_add_(0, delta.index, delta.values)
            p = self._reach
            outs = reach_nb(delta.index_np, *p.in_hw, *p.out_hw, *p.mul, *p.div, p.ntaps, p.off0_y, p.off0_x,
                            p.rel_y, p.rel_x, self._mark, self._touched)  # fmt: skip
            idx, rows = _repool_nb(outs, self._x_np, self._y_np, self._rowmax, self._seen, *self._geometry)
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
