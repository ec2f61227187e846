"""Channels-last delta rows into NCHW planes: the network's output mirrors, kept up to date at touched pixels.

`planes[c, idx[i]] += vals[i, c]` is a transposing update: torch's `index_add_` along dim 1 with the transposed
rows walks them with a stride of C floats (YOLOv5n's three 255-channel heads at 768x448: ~4.5 ms per busy frame
for the mirror and its handed-out copy). Here the pixels go in blocks whose rows stay in L1 while the channels are
walked, and the handed-out copy takes the same new values in the same pass.
"""

from __future__ import annotations

import numpy as np

from deluceva.delta.kernels._jit import HAVE_NUMBA, jit

PIXEL_BLOCK = 16  # rows per block: 16 x 255 floats (16 KB) stay in L1 while the channels are walked

__all__ = ["HAVE_NUMBA", "add_rows_to_planes_nb"]


@jit
def add_rows_to_planes_nb(planes, idx, vals, copy):  # pragma: no cover - compiled
    """planes (C, P) float32 += vals (A, C) at columns idx (A,) (unique); `copy` (C, P), or (C, 0) for none, gets the
    same new values (a second tensor equal to planes before the call)."""
    a, ch = vals.shape
    both = copy.shape[1] > 0
    for i0 in range(0, a, PIXEL_BLOCK):
        i1 = min(a, i0 + PIXEL_BLOCK)
        for c in range(ch):
            for i in range(i0, i1):
                p = idx[i]
                v = planes[c, p] + vals[i, c]
                planes[c, p] = v
                if both:
                    copy[c, p] = v


def no_copy(channels: int) -> np.ndarray:
    """The `copy` argument for no second tensor."""
    return np.zeros((channels, 0), np.float32)
