"""Nearest-neighbour upsampling of a PixelDelta by an integer factor: pure index arithmetic, values repeated.

Input pixels are sorted, so grouping them by image row (n, y) and emitting, per row, output rows s*y .. s*y+s-1
with each pixel repeated s times gives the output already sorted (numba); the torch fallback sorts.
"""

from __future__ import annotations

import numpy as np
import torch

from deluceva.delta.kernels._jit import HAVE_NUMBA, jit
from deluceva.delta.pixels import PixelDelta


@jit
def _upsample_nb(pix, vals, h, w, s):
    a = pix.shape[0]
    ho, wo = h * s, w * s
    idx = np.empty(a * s * s, np.int64)
    out = np.empty((a * s * s, vals.shape[1]), vals.dtype)
    j = 0
    i = 0
    while i < a:
        row = pix[i] // w  # n * h + y
        e = i
        while e < a and pix[e] // w == row:
            e += 1
        n = row // h
        y = row - n * h
        for dy in range(s):
            base = n * ho * wo + (y * s + dy) * wo
            for k in range(i, e):
                x = pix[k] - row * w
                for dx in range(s):
                    idx[j] = base + x * s + dx
                    out[j, :] = vals[k, :]
                    j += 1
        i = e
    return idx, out


def upsample_nearest2x(delta: PixelDelta, scale: int = 2, backend: str = "auto") -> PixelDelta:
    """Δ of F.interpolate(x, scale_factor=scale, mode='nearest'): each active pixel becomes a scale x scale block."""
    n, c, h, w = delta.shape
    ho, wo = h * scale, w * scale
    out_shape = (n, c, ho, wo)
    if delta.active == 0:
        return PixelDelta.empty(out_shape, delta.values.dtype)
    if HAVE_NUMBA and backend != "torch":
        out_idx, out_vals = _upsample_nb(delta.index_np, delta.values_np, h, w, scale)
        return PixelDelta(out_idx, out_vals, out_shape)
    idx = delta.index
    b, r = idx.div(h * w, rounding_mode="floor"), idx.remainder(h * w)
    y, x = r.div(w, rounding_mode="floor"), r.remainder(w)
    off = torch.arange(scale)
    oy = (y * scale)[:, None, None] + off[None, :, None]  # (A, s, 1)
    ox = (x * scale)[:, None, None] + off[None, None, :]  # (A, 1, s)
    out = ((b * (ho * wo))[:, None, None] + oy * wo + ox).reshape(-1)
    order = torch.argsort(out)
    values = delta.values.index_select(0, order.div(scale * scale, rounding_mode="floor"))
    return PixelDelta(out.index_select(0, order), values, out_shape)
