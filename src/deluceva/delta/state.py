"""RowState: a unit's accumulated full values (e.g. a conv's pre-activation z), updated by deltas at active rows.

4-D tensors are kept as channels-last rows (N*H*W, C), others as the tensor. The accumulation dtype (float64 by
default, FilterConfig.state_dtype) keeps hundreds of frames of `z += Δz` free of drift. The row update is one fused
numba pass when numba is importable (gather old, add, write back, return old and new in the working dtype); torch
ops otherwise.

`step*`: z += Δz and Δy = f(z_new) - f(z_old) for an activation f (`step` on rows: one fused numba pass for the
common activations, kernels.actstep). With `precise` (exact runs) f and the difference
are computed in the accumulation dtype and Δy is rounded once: in float32, f(z_new) and f(z_old) each carry a
rounding of the full value |y|, which the next frame's difference does not cancel, so it accumulates frame after frame
(YOLOX-Nano, car video at 768x448: the output drifts 3x further from a float64 run without it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from deluceva.delta.pixels import PixelDelta

try:
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def _update_nb(z, idx, d, like):  # pragma: no cover - compiled
        """z[idx] += d; returns (z_old, z_new) at idx in like's dtype (d's: the working dtype, or z's: the
        accumulation dtype), allocated here: no per-call torch buffers."""
        a, c = d.shape
        old_out = np.empty((a, c), like.dtype)
        new_out = np.empty((a, c), like.dtype)
        for i in range(a):
            r = idx[i]
            for j in range(c):
                o = z[r, j]
                n = o + d[i, j]
                z[r, j] = n
                old_out[i, j] = o
                new_out[i, j] = n
        return old_out, new_out

    from deluceva.delta.kernels._jit import PARALLEL_MIN, parallel
    from deluceva.delta.kernels.actstep import step_act_nb, step_act_par_nb

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - numba is a dependency of the kernels, normally present
    HAVE_NUMBA = False

_NB_DTYPES = (torch.float32, torch.float64)

# `step` takes the fused kernel up to this many values (A x C); above, torch's vectorised activation passes win
# (measured on contiguous float32 rows: 4.4 vs 9.7 us at 9 x 32, 18 vs 20 us at 128 x 64, 63 vs 53 us at 512 x 64).
# Precise (exact-run) steps compute f in float64 with libm's scalar exp: a lower limit.
FUSED_MAX = 8192
PRECISE_FUSED_MAX = 4096


def _step_act_par(z: np.ndarray, idx: np.ndarray, d: np.ndarray, code: int, alpha: float, precise: bool
                  ) -> np.ndarray:
    """`step_act_par_nb` with `step_act_nb`'s signature (fast mode only: `RowState._fused`)."""
    return step_act_par_nb(z, idx, d, code, alpha)


def rows_of(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Own contiguous channels-last rows (N*H*W, C) copy of a 4-D tensor, in `dtype` (default x's). Contiguous: the
    channels-last view of an NCHW tensor has strides (1, N*H*W), which `.clone()` / `.to(copy=True)` would keep, so a
    row's channels would lie N*H*W values apart (a cache line per value a row update touches)."""
    n, c, h, w = x.shape
    rows = torch.empty(n * h * w, c, dtype=dtype or x.dtype)
    rows.copy_(x.permute(0, 2, 3, 1).reshape(n * h * w, c))
    return rows


class RowState:
    """Accumulated full values z in dtype `acc` (default: x's dtype); `update(idx, Δ) -> (z_old, z_new)` at idx.

    adopt: x is the caller's to give away (nobody else reads or writes it afterwards): a 4-D x already in
    channels-last memory and in `acc` becomes the rows without a copy (a seeder's NHWC pre-activations: ~0.15 ms
    per conv at 768x448)."""

    def __init__(self, x: torch.Tensor, acc: torch.dtype | None = None, adopt: bool = False) -> None:
        self.dtype = x.dtype
        acc = acc or x.dtype
        self.rows = x.dim() == 4
        if self.rows and adopt and acc == x.dtype and x.permute(0, 2, 3, 1).is_contiguous():
            n, c, h, w = x.shape
            self.z = x.permute(0, 2, 3, 1).view(n * h * w, c)
        elif self.rows:
            self.z = rows_of(x, acc)
        else:
            self.z = x.to(acc, copy=True)
        self._nb = HAVE_NUMBA and self.rows and acc in _NB_DTYPES and x.dtype in _NB_DTYPES
        self._z_np = self.z.numpy() if self._nb else None  # z is updated in place, never replaced, for rows

    @property
    def z_np(self) -> np.ndarray | None:
        """The rows z as a NumPy array (same memory) when the fused kernels can update them in place, else None."""
        return self._z_np

    def update(self, idx: torch.Tensor, d: torch.Tensor, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """z[idx] += d (rows); returns (z_old, z_new) at idx in the working dtype (the accumulation dtype if
        `precise`)."""
        out = self.z.dtype if precise else self.dtype
        if self._nb and d.dtype == self.dtype and d.is_contiguous() and idx.dtype == torch.int64:
            dn = d.numpy()
            old, new = _update_nb(self._z_np, idx.numpy(), dn, self._z_np if precise else dn)
            return torch.from_numpy(old), torch.from_numpy(new)
        old = self.z.index_select(0, idx)
        new = old + d
        self.z.index_copy_(0, idx, new)
        return old.to(out), new.to(out)

    def update_all(self, d: torch.Tensor, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """z += d for every row (d: (N*H*W, C)); returns (z_old, z_new) in the working (accumulation if `precise`)
        dtype."""
        out = self.z.dtype if precise else self.dtype
        old = self.z.to(out, copy=True)
        self.z.add_(d)
        return old, self.z.to(out, copy=precise)

    def update_dense(self, d: torch.Tensor, precise: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """z += d (whole tensor); returns (z_old, z_new) in the working (accumulation if `precise`) dtype."""
        out = self.z.dtype if precise else self.dtype
        old = self.z
        self.z = old + d
        return old.to(out), self.z.to(out)

    def step(self, idx: torch.Tensor, d: torch.Tensor, f: Callable, precise: bool,
             act: tuple[int, float] | None = None) -> torch.Tensor:
        """z[idx] += d; returns f(z_new) - f(z_old) at idx (A, C) in the working dtype. act: f's code and parameter
        for the fused kernel (`activation.activation_code`), which then does it in one pass (float32 rows)."""
        if (act is not None and self._nb and d.dtype == torch.float32 and self.dtype == torch.float32
                and d.is_contiguous() and idx.dtype == torch.int64):
            fused = self._fused(d.numel(), precise)
            if fused is not None:
                return torch.from_numpy(fused(self._z_np, idx.numpy(), d.numpy(), act[0], act[1], precise))
        z_old, z_new = self.update(idx, d, precise)
        return (f(z_new) - f(z_old)).to(self.dtype)

    def step_delta(self, d: PixelDelta, f: Callable, precise: bool, act: tuple[int, float] | None = None
                   ) -> torch.Tensor | np.ndarray:
        """`step` at d's pixels with d's values. On the fused kernel's path the arrays stay NumPy (input and result:
        no tensor round trip); otherwise `step` on tensors."""
        if act is not None and self._nb and self.dtype == torch.float32:
            v, i = d.values_np, d.index_np
            fused = self._fused(v.size, precise)
            if fused is not None and v.dtype == np.float32 and i.dtype == np.int64 and v.flags.c_contiguous:
                return fused(self._z_np, i, v, act[0], act[1], precise)
        return self.step(d.index, d.values, f, precise, act)

    @staticmethod
    def _fused(values: int, precise: bool) -> Callable | None:
        """The fused kernel for a step of `values` (A x C) values: sequential up to FUSED_MAX, the parallel form
        (fast mode) from PARALLEL_MIN when the kernels may use threads (`kernels._jit.parallel`), else None (the
        torch path: its vectorised passes win on one thread)."""
        if values <= (PRECISE_FUSED_MAX if precise else FUSED_MAX):
            return step_act_nb
        if not precise and values >= PARALLEL_MIN and parallel():
            return _step_act_par
        return None

    def step_all(self, d: torch.Tensor, f: Callable, precise: bool) -> torch.Tensor:
        """z += d on every row; returns f(z_new) - f(z_old) (N*H*W, C) in the working dtype."""
        z_old, z_new = self.update_all(d, precise)
        return (f(z_new) - f(z_old)).to(self.dtype)

    def step_dense(self, d: torch.Tensor, f: Callable, precise: bool) -> torch.Tensor:
        """z += d (whole tensor); returns f(z_new) - f(z_old) in the working dtype."""
        z_old, z_new = self.update_dense(d, precise)
        return (f(z_new) - f(z_old)).to(self.dtype)

