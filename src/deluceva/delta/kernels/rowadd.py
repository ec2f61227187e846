"""Delta rows into channels-last rows: the network's output mirrors, kept up to date at touched pixels.

`rows[idx[i]] += vals[i]`, and the handed-out copy of the output takes the same new values in the same pass (one
read of each touched row instead of a second `index_copy_`).
"""

from __future__ import annotations

import numpy as np

from deluceva.delta.kernels._jit import HAVE_NUMBA, jit

__all__ = ["HAVE_NUMBA", "add_rows_nb", "no_copy"]


@jit
def add_rows_nb(rows, idx, vals, copy):  # pragma: no cover - compiled
    """rows (P, C) float32 += vals (A, C) at rows idx (A,) (unique); `copy` (P, C), or (0, C) for none, gets the
    same new values (a second array equal to rows before the call)."""
    a, ch = vals.shape
    both = copy.shape[0] > 0
    for i in range(a):
        p = idx[i]
        src = vals[i]
        dst = rows[p]
        for c in range(ch):
            dst[c] += src[c]
        if both:
            out = copy[p]
            for c in range(ch):
                out[c] = dst[c]


def no_copy(channels: int) -> np.ndarray:
    """The `copy` argument for no second array."""
    return np.zeros((0, channels), np.float32)
