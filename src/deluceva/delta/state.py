"""RowState: a unit's accumulated full values (e.g. a conv's pre-activation z), updated by deltas at active rows.

4-D tensors are kept as channels-last rows (N*H*W, C), others as the tensor. The accumulation dtype (float64 by
default, FilterConfig.state_dtype) keeps hundreds of frames of `z += Δz` free of drift. The row update is one fused
numba pass when numba is importable (gather old, add, write back, return old and new in the working dtype); torch
ops otherwise.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _update_nb(z, idx, d):  # pragma: no cover - compiled
        """z[idx] += d; returns (z_old, z_new) at idx in d's dtype (allocated here: no per-call torch buffers)."""
        a, c = d.shape
        old_out = np.empty((a, c), d.dtype)
        new_out = np.empty((a, c), d.dtype)
        for i in range(a):
            r = idx[i]
            for j in range(c):
                o = z[r, j]
                n = o + d[i, j]
                z[r, j] = n
                old_out[i, j] = o
                new_out[i, j] = n
        return old_out, new_out

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency of the kernels, normally present
    HAVE_NUMBA = False

_NB_DTYPES = (torch.float32, torch.float64)


class RowState:
    """Accumulated full values z in dtype `acc` (default: x's dtype); `update(idx, Δ) -> (z_old, z_new)` at idx."""

    def __init__(self, x: torch.Tensor, acc: torch.dtype | None = None) -> None:
        self.dtype = x.dtype
        acc = acc or x.dtype
        self.rows = x.dim() == 4
        if self.rows:
            n, c, h, w = x.shape
            self.z = x.permute(0, 2, 3, 1).reshape(n * h * w, c).to(acc, copy=True)
        else:
            self.z = x.to(acc, copy=True)
        self._nb = HAVE_NUMBA and self.rows and acc in _NB_DTYPES and x.dtype in _NB_DTYPES
        self._z_np = self.z.numpy() if self._nb else None  # z is updated in place, never replaced, for rows

    def update(self, idx: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z[idx] += d (rows); returns (z_old, z_new) at idx in the working dtype."""
        if self._nb and d.dtype == self.dtype and d.is_contiguous() and idx.dtype == torch.int64:
            old, new = _update_nb(self._z_np, idx.numpy(), d.numpy())
            return torch.from_numpy(old), torch.from_numpy(new)
        old = self.z.index_select(0, idx)
        new = old + d
        self.z.index_copy_(0, idx, new)
        return old.to(self.dtype), new.to(self.dtype)

    def update_all(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z += d for every row (d: (N*H*W, C)); returns (z_old, z_new) in the working dtype."""
        old = self.z.to(self.dtype, copy=True)
        self.z.add_(d)
        return old, self.z.to(self.dtype)

    def update_dense(self, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z += d (whole tensor); returns (z_old, z_new) in the working dtype."""
        old = self.z
        self.z = old + d
        return old.to(self.dtype), self.z.to(self.dtype)

