"""Fused state update + activation delta on rows: z[idx] += Δz; Δy = f(z_new) - f(z_old), one pass, no temporaries
beyond a few hundred floats.

The torch path of RowState.step is six passes over (A, C) (gather-update, two activations, subtraction, casts)
and ~10 us of dispatch; this kernel does it in one call. Codes: SILU, RELU, LEAKY_RELU (alpha = slope), SIGMOID,
HARDSWISH. Fast mode (filtered runs): f in float32 on the old and new values rounded to float32, as the torch path
does, with a vectorisable exp (Cody-Waite reduction + degree-6 polynomial, |rel err| < 2e-7 on exp, SiLU within
1 ulp-scale of torch's). Precise mode (exact runs): f in the state's dtype with libm's exp, Δy rounded once.
"""

from __future__ import annotations

import numpy as np

from deluceva.delta.kernels._jit import jit_finite, jit_parallel, jit_vec, prange

SILU, RELU, LEAKY_RELU, SIGMOID, HARDSWISH = 1, 2, 3, 4, 5
ROW_BLOCK = 512  # values per block of rows in fast mode (temporaries stay in L1)
# The parallel forms (`*_par_nb`, fast mode; for calls of `_jit.PARALLEL_MIN` values and more) split the rows into
# this many slices, run by numba's thread pool
PAR_SLICES = 16

_F = np.float32


@jit_finite
def _exp_neg32(x, e, bits, n):  # pragma: no cover - compiled
    """e[:n] = exp(-x[:n]) in float32 (inputs clamped to exp's finite range); bits: int32 scratch."""
    for j in range(n):
        t = min(max(-x[j], _F(-87.0)), _F(88.0))
        k = np.rint(t * _F(1.44269504))  # nearest integer (one vector instruction)
        r = t - k * _F(0.693359375) - k * _F(-2.12194440e-4)
        p = ((((_F(1.9875691500e-4) * r + _F(1.3981999507e-3)) * r + _F(8.3334519073e-3)) * r
              + _F(4.1665795894e-2)) * r + _F(1.6666665459e-1)) * r + _F(5.0000001201e-1)
        e[j] = p * (r * r) + r + _F(1.0)
        bits[j] = (np.int32(k) + np.int32(127)) << np.int32(23)  # 2**k as float32 bits
    scale = bits.view(np.float32)
    for j in range(n):
        e[j] = e[j] * scale[j]


@jit_finite
def _act32(x, y, e, bits, n, code, alpha):  # pragma: no cover - compiled
    """y[:n] = f(x[:n]) in float32."""
    if code == SILU or code == SIGMOID:
        _exp_neg32(x, e, bits, n)
        if code == SILU:
            for j in range(n):
                y[j] = x[j] / (_F(1.0) + e[j])
        else:
            for j in range(n):
                y[j] = _F(1.0) / (_F(1.0) + e[j])
    elif code == RELU:
        for j in range(n):
            y[j] = max(x[j], _F(0.0))
    elif code == LEAKY_RELU:
        a = _F(alpha)
        for j in range(n):
            v = x[j]
            y[j] = v if v > _F(0.0) else v * a
    else:  # HARDSWISH
        for j in range(n):
            v = x[j]
            y[j] = v * min(max(v + _F(3.0), _F(0.0)), _F(6.0)) / _F(6.0)


@jit_vec
def _act64(v, code, alpha):  # pragma: no cover - compiled
    """f(v) in float64 (libm exp)."""
    if code == SILU:
        return v / (1.0 + np.exp(-v))
    if code == SIGMOID:
        return 1.0 / (1.0 + np.exp(-v))
    if code == RELU:
        return max(v, 0.0)
    if code == LEAKY_RELU:
        return v if v > 0.0 else v * alpha
    return v * min(max(v + 3.0, 0.0), 6.0) / 6.0


@jit_vec
def _step_fast(z, idx, d, at_rows, code, alpha, out):  # pragma: no cover - compiled
    """Fast mode of `step_act_nb` into out (A, C): row i's delta is d[idx[i]] if at_rows (d: every row of the
    tensor) else d[i]. f runs over blocks of rows gathered into L1-sized temporaries (vectorised)."""
    _step_fast_span(z, idx, d, at_rows, code, alpha, out, 0, out.shape[0])


@jit_vec
def _step_fast_span(z, idx, d, at_rows, code, alpha, out, lo, hi):  # pragma: no cover - compiled
    """`_step_fast` on rows lo..hi of idx and out (and of d unless at_rows) only."""
    a, c = out.shape
    rb = max(1, ROW_BLOCK // c)
    m = rb * c
    xn = np.empty(m, np.float32)
    xo = np.empty(m, np.float32)
    yn = np.empty(m, np.float32)
    yo = np.empty(m, np.float32)
    e = np.empty(m, np.float32)
    bits = np.empty(m, np.int32)
    flat = out.reshape(a * c)
    for i0 in range(lo, hi, rb):
        nb = min(rb, hi - i0)
        for i in range(nb):
            r = idx[i0 + i]
            dr = r if at_rows else i0 + i
            for j in range(c):
                o = z[r, j]
                nv = o + d[dr, j]
                z[r, j] = nv
                xn[i * c + j] = nv
                xo[i * c + j] = o
        n = nb * c
        _act32(xn, yn, e, bits, n, code, alpha)
        _act32(xo, yo, e, bits, n, code, alpha)
        base = i0 * c
        for j in range(n):
            flat[base + j] = yn[j] - yo[j]


@jit_vec
def nonzero_rows_nb(rows, scratch):  # pragma: no cover - compiled
    """Ascending indices of the rows of (P, C) with a non-zero entry (a row's scan stops at its first one);
    scratch: int64 (P,) work. Returns a new array."""
    k = 0
    for p in range(rows.shape[0]):
        for j in range(rows.shape[1]):
            if rows[p, j] != 0:
                scratch[k] = p
                k += 1
                break
    return scratch[:k].copy()


@jit_vec
def step_act_rows_nb(z, dz, code, alpha, scratch):  # pragma: no cover - compiled
    """A dense conv's output delta dz (P, C) float32 on state rows z (P, C): at the rows of dz with a non-zero entry
    z += dz and Δy = f(z_new) - f(z_old) (fast mode); elsewhere nothing changes (Δy = 0). Returns (index (A,),
    Δy (A, C)) of those rows: one read of dz, the state and f touched only where the delta is (the torch path runs
    f twice over every row and finds the non-zero rows again after)."""
    idx = nonzero_rows_nb(dz, scratch)
    out = np.empty((idx.shape[0], dz.shape[1]), np.float32)
    _step_fast(z, idx, dz, True, code, alpha, out)
    return idx, out


@jit_parallel
def _step_fast_par(z, idx, d, at_rows, code, alpha, out):  # pragma: no cover - compiled
    """`_step_fast` over PAR_SLICES slices of the rows in parallel: idx holds distinct rows, so the slices update
    disjoint state rows, and each value is computed as `_step_fast` computes it."""
    a = out.shape[0]
    chunk = (a + PAR_SLICES - 1) // PAR_SLICES
    for s in prange(PAR_SLICES):
        lo = min(a, s * chunk)
        hi = min(a, lo + chunk)
        if lo < hi:
            _step_fast_span(z, idx, d, at_rows, code, alpha, out, lo, hi)


@jit_vec
def step_act_rows_par_nb(z, dz, code, alpha, scratch):  # pragma: no cover - compiled
    """`step_act_rows_nb` with the rows found first and then updated in parallel slices (`_step_fast_par`)."""
    idx = nonzero_rows_nb(dz, scratch)
    out = np.empty((idx.shape[0], dz.shape[1]), np.float32)
    _step_fast_par(z, idx, dz, True, code, alpha, out)
    return idx, out


@jit_vec
def step_act_par_nb(z, idx, d, code, alpha):  # pragma: no cover - compiled
    """`step_act_nb` in fast mode, its rows in parallel slices (`_step_fast_par`): the same results."""
    out = np.empty(d.shape, np.float32)
    _step_fast_par(z, idx, d, False, code, alpha, out)
    return out


@jit_vec
def step_act_nb(z, idx, d, code, alpha, precise):  # pragma: no cover - compiled
    """z (R, C) float32|float64 state rows, idx (A,) int64 rows, d (A, C) float32 deltas -> Δy (A, C) float32;
    z[idx] += d in place. precise: f in z's dtype, else in float32."""
    a, c = d.shape
    out = np.empty((a, c), np.float32)
    if precise:
        for i in range(a):
            r = idx[i]
            for j in range(c):
                o = z[r, j]
                nv = o + d[i, j]
                z[r, j] = nv
                out[i, j] = _act64(nv, code, alpha) - _act64(o, code, alpha)
        return out
    _step_fast(z, idx, d, False, code, alpha, out)
    return out
