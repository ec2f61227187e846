"""Pixel-granularity delta filter: accumulate incoming deltas in a residual, forward only the largest pixels.

State (persistent, channels-last): residual rows r (N*H*W, C), per-pixel magnitude m (N*H*W,) = max_c |r|, and
a candidate list of the pixels with m > 0, so that a frame costs O(changed pixels), never O(tensor).

Per call: r[idx] += Δ and m[idx] = max_c |r[idx]|; among the candidates (m > 0) exactly k = round((100 - pct)
/ 100 * max(n_candidates, count_floor)) pixels (at most all) with the largest m are chosen (count_floor: an
average candidate count, FilterConfig.count_smoothing; with `of_positions`, a percentage of all pixels:
k = min(n_candidates, round((100 - pct) / 100 * N*H*W))); k-th largest over the candidates only
(`kth_largest_nb`: a histogram of the magnitudes' float bits, then a partition of the one bin holding it), ties
broken by candidate order; those with m <= noise_floor are dropped from the choice; the chosen pixels are emitted
as a PixelDelta (sorted indices, their full residual rows) and r, m are zeroed there.
Nothing is lost: r_before + Δ == r_after + forwarded, bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from deluceva.delta.kernels._jit import grown, jit, resolve_backend
from deluceva.delta.pixels import PixelDelta


@jit
def _accumulate_nb(idx, vals, r, m, in_cand, cand, ncand):
    """r[idx] += vals; m[idx] = max |r[idx]|; pixels with m > 0 join the candidates; returns their new count."""
    ch = r.shape[1]
    for i in range(idx.shape[0]):
        p = idx[i]
        mx = np.float32(0.0)
        for c in range(ch):
            v = r[p, c] + vals[i, c]
            r[p, c] = v
            a = abs(v)
            if a > mx:
                mx = a
        m[p] = mx
        if mx > 0 and in_cand[p] == 0:
            in_cand[p] = 1
            cand[ncand] = p
            ncand += 1
    return ncand


# Below this many candidates a plain partition is faster than the 65536-bin histogram (whose zeroing alone is ~10 us)
RADIX_SELECT_MIN = 8192


@jit
def kth_largest_nb(mc, n, k):
    """The k-th largest of mc[:n] (float32, all > 0 and finite; 1 <= k <= n), exactly `np.partition`'s value.
    From RADIX_SELECT_MIN values on: a histogram of the top 16 bits of each value's bit pattern (sign, exponent and
    7 mantissa bits: monotonic in the value for non-negative floats) finds the bin holding the k-th largest, and
    only that bin's values are partitioned (118k candidates: 0.15-0.2 ms where a partition of all takes 0.4-1.2 ms)."""
    if n < RADIX_SELECT_MIN:
        return np.partition(mc[:n], n - k)[n - k]
    bits = mc[:n].view(np.uint32)
    hist = np.zeros(65536, np.int64)
    for j in range(n):
        hist[bits[j] >> 16] += 1
    above = 0  # values in bins above b
    b = 65535
    while above + hist[b] < k:
        above += hist[b]
        b -= 1
    sub = np.empty(hist[b], np.float32)
    i = 0
    for j in range(n):
        if (bits[j] >> 16) == b:
            sub[i] = mc[j]
            i += 1
    r = k - above  # the r-th largest within the bin
    return np.partition(sub, i - r)[i - r]


@jit
def _forward_count_nb(keep_frac, n, pixels, of_positions, count_floor):
    """How many of n candidates the percentage forwards: round(keep_frac x max(n, count_floor)), or of all `pixels`
    with `of_positions`, halves up; at most n."""
    k = int(np.floor(keep_frac * (pixels if of_positions else max(n, count_floor)) + 0.5))
    return min(k, n)


@jit
def _select_nb(r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, scratch, count_floor):
    """Choose, forward and clear pixels (see module doc). Returns (sorted index, rows, new candidate count, largest
    magnitude held back)."""
    fidx = np.empty(ncand, np.int64)
    out = np.empty((ncand, r.shape[1]), r.dtype)
    nf, keep, held_max = _select_into_nb(r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, scratch, fidx,
                                         out, count_floor)
    return fidx[:nf], out[:nf], keep, held_max


@jit
def _select_into_nb(r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, scratch, fidx, out, count_floor):
    """`_select_nb` writing the forwarded pixels into fidx[:nf] and their rows into out[:nf] (both at least ncand
    long): returns (nf, new candidate count, largest magnitude held back), no array to box (~1 us each)."""
    # drop candidates whose magnitude went back to exactly 0, gathering the others' magnitudes in the same pass
    mc = np.empty(ncand, np.float32)
    n = 0
    for j in range(ncand):
        p = cand[j]
        v = m[p]
        if v > 0:
            cand[n] = p
            mc[n] = v
            n += 1
        else:
            in_cand[p] = 0
    k = _forward_count_nb(keep_frac, n, m.shape[0], of_positions, count_floor)
    # chosen: mc > thr, plus the first take_eq candidates with mc == thr (ties in candidate order), minus <= floor
    thr = np.float32(-1.0)  # k >= n: every candidate
    take_eq = 0
    if k <= 0:
        thr = np.float32(np.inf)
    elif k < n:
        thr = kth_largest_nb(mc, n, k)
        take_eq = k
        for j in range(n):
            if mc[j] > thr:
                take_eq -= 1
    nf = 0  # at most k picked
    keep = 0
    held_max = np.float32(0.0)
    for j in range(n):
        p = cand[j]
        v = mc[j]
        pick = v > thr
        if not pick and v == thr and take_eq > 0:
            pick = True
            take_eq -= 1
        if pick and v > floor:
            fidx[nf] = p
            nf += 1
            in_cand[p] = 0
        else:
            cand[keep] = p
            keep += 1
            if v > held_max:
                held_max = v
    fidx = fidx[:nf]  # a view: sorted in place
    if nf * 64 > m.shape[0]:  # many: an ordered scan of a flag array beats a sort
        for j in range(nf):
            scratch[fidx[j]] = 1
        f = 0
        for p in range(m.shape[0]):
            if scratch[p] != 0:
                scratch[p] = 0
                fidx[f] = p
                f += 1
    else:
        fidx.sort()
    ch = r.shape[1]
    for j in range(nf):  # explicit loops: ~1.5x faster than row slices
        p = fidx[j]
        for c in range(ch):
            out[j, c] = r[p, c]
            r[p, c] = 0
        m[p] = 0
    return nf, keep, held_max


@jit
def _filter_into_nb(idx, vals, r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, scratch, fidx, out,
                    count_floor):
    """`_accumulate_nb` then `_select_into_nb` in one call (one dispatch per filter and frame, scalars returned):
    fidx, out must hold ncand + len(idx) rows. Returns (forwarded count, new candidate count, largest held)."""
    ncand = _accumulate_nb(idx, vals, r, m, in_cand, cand, ncand)
    return _select_into_nb(r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, scratch, fidx, out,
                           count_floor)


@jit
def _forward_direct_nb(idx, vals, r, m, in_cand, cand, ncand, keep_frac, of_positions, floor, fidx, out, fmag,
                       count_floor):
    """`_filter_into_nb` for a percentage that binds nothing: every pixel whose accumulated magnitude is above the
    floor goes out, and the new delta's rows are written once, to the output or to the residual (the two-step path
    writes them to r, reads them back and zeroes r: twice the memory traffic on busy frames).

    A row's magnitude is found first (the row then sits in L1), then the row is written where it belongs. Afterwards
    the percentage is checked: if it would hold back a pixel above the floor (k < forwarded, or an older candidate
    above the floor waits), everything is put back as `_accumulate_nb` leaves it and `ok` is False (the caller then
    selects as usual). fmag: at least len(idx) floats (the forwarded pixels' magnitudes, for the undo).
    Returns (forwarded count, new candidate count, largest magnitude held back, ok)."""
    ch = r.shape[1]
    nf = 0
    for i in range(idx.shape[0]):
        p = idx[i]
        held = in_cand[p] != 0  # r[p] holds a residual (elsewhere r is 0)
        mx = np.float32(0.0)
        if held:
            for c in range(ch):
                mx = max(mx, abs(r[p, c] + vals[i, c]))
        else:
            for c in range(ch):
                mx = max(mx, abs(vals[i, c]))
        if mx > floor:
            if held:
                for c in range(ch):
                    out[nf, c] = r[p, c] + vals[i, c]
                    r[p, c] = 0
                in_cand[p] = 2  # forwarded: leaves the candidate list below
            else:
                for c in range(ch):
                    out[nf, c] = vals[i, c]
            fidx[nf] = p
            fmag[nf] = mx
            m[p] = 0
            nf += 1
        else:
            if held:
                for c in range(ch):
                    r[p, c] = r[p, c] + vals[i, c]
            else:
                for c in range(ch):
                    r[p, c] = vals[i, c]
                if mx > 0:
                    in_cand[p] = 1
                    cand[ncand] = p
                    ncand += 1
            m[p] = mx
    # the candidates left: drop the forwarded ones and those back at exactly 0
    keep = 0
    above = 0
    held_max = np.float32(0.0)
    for j in range(ncand):
        p = cand[j]
        if in_cand[p] == 2:
            in_cand[p] = 0
            continue
        v = m[p]
        if v > 0:
            cand[keep] = p
            keep += 1
            if v > held_max:
                held_max = v
            if v > floor:
                above += 1
        else:
            in_cand[p] = 0
    n = nf + keep
    if above == 0 and _forward_count_nb(keep_frac, n, m.shape[0], of_positions, count_floor) >= nf:
        return nf, keep, held_max, True
    for j in range(nf):  # the percentage binds: back to the accumulated state
        p = fidx[j]
        for c in range(ch):
            r[p, c] = out[j, c]
        m[p] = fmag[j]
        in_cand[p] = 1
        cand[keep] = p
        keep += 1
    return 0, keep, held_max, False


class PixelFilter:
    """Stateful pixel filter for one (N, C, H, W) tensor: `__call__(Δ, pct, noise_floor)` -> forwarded Δ.

    pct: percentage of the candidate pixels held back (0 = forward every pixel with m > noise_floor).
    residual (N*H*W, C) float32 and magnitude (N*H*W,) may be given to share state with the caller (otherwise
    zeros); after changing them directly, call `resync()`. `held_max`: the largest magnitude held back by the last
    `select` (a call without new delta forwards nothing if it is <= the floor).
    """

    def __init__(
        self,
        shape: tuple[int, int, int, int],
        residual: torch.Tensor | None = None,
        magnitude: torch.Tensor | None = None,
        backend: str = "auto",
    ):
        n, c, h, w = shape
        self.shape = (n, c, h, w)
        self.backend = resolve_backend(backend)
        rows = self.pixels = n * h * w
        self.residual = residual if residual is not None else torch.zeros(rows, c, dtype=torch.float32)
        if self.residual.shape != (rows, c) or not self.residual.is_contiguous():
            raise ValueError(f"residual must be contiguous ({rows}, {c})")
        self.magnitude = magnitude if magnitude is not None else self.residual.abs().amax(1)
        self.held_max = float("inf")  # unknown until the first select
        # __call__'s output may live in buffers the next call overwrites (the network's filters: a forwarded delta
        # is used within the frame); False: every output is a new array
        self.reuse_output = False
        if self.backend == "numba":
            self._r, self._m = self.residual.numpy(), self.magnitude.numpy()
            self._in_cand = np.zeros(rows, np.uint8)
            self._scratch = np.zeros(rows, np.uint8)
            self._cand = np.empty(rows, np.int64)
            self._no_index, self._no_values = np.zeros(0, np.int64), np.zeros((0, c), np.float32)
            self._fidx, self._fout = np.empty(0, np.int64), np.empty((0, c), np.float32)
            self._fmag = np.empty(0, np.float32)
            # the last call's percentage held back nothing above the floor: try `_forward_direct_nb` first
            self._direct = True
            self._floor_key, self._floor32 = 0.0, np.float32(0.0)
        self.resync()

    def resync(self) -> None:
        """Rebuild the candidate list from the magnitudes (one full pass; after external edits of r or m)."""
        self.held_max = float("inf")  # unknown: what is held was not chosen by `select`
        start = self.magnitude.gt(0).nonzero().squeeze(1)
        if self.backend == "numba":
            self._in_cand[:] = 0
            self._ncand = int(start.numel())
            self._cand[: self._ncand] = start.numpy()
            self._in_cand[start.numpy()] = 1
        else:
            self._in_cand_t = torch.zeros(self.magnitude.numel(), dtype=torch.bool)
            self._in_cand_t[start] = True
            self._cand_t = start

    @property
    def num_candidates(self) -> int:
        """How many pixels are held back (m > 0; may count some whose m went back to 0 until the next select)."""
        return self._ncand if self.backend == "numba" else int(self._cand_t.numel())

    @property
    def candidates(self) -> torch.Tensor:
        """int64 (K,) pixels held back with m > 0, unordered (may include some whose m went back to 0)."""
        if self.backend == "numba":
            return torch.from_numpy(self._cand[: self._ncand].copy())
        return self._cand_t.clone()

    def reset(self) -> None:
        """Zero the residual and forget all candidates (e.g. after a dense re-seed)."""
        cand = self.candidates
        self.residual.index_fill_(0, cand, 0.0)
        self.magnitude.index_fill_(0, cand, 0.0)
        if self.backend == "numba":
            self._in_cand[cand.numpy()] = 0
            self._ncand = 0
        else:
            self._in_cand_t[cand] = False
            self._cand_t = cand[:0]
        self.held_max = 0.0

    def accumulate(self, delta: PixelDelta) -> None:
        """r[idx] += Δ and refresh m and the candidates there (Δ indices must be unique)."""
        if delta.active == 0:
            return
        if self.backend == "numba":
            self._ncand = _accumulate_nb(
                delta.index_np,
                delta.values_np,
                self._r,
                self._m,
                self._in_cand,
                self._cand,
                self._ncand,
            )
            return
        idx = delta.index
        self.residual.index_add_(0, idx, delta.values)
        mag = self.residual.index_select(0, idx).abs().amax(1)
        self.magnitude.index_copy_(0, idx, mag)
        new = idx[mag.gt(0) & ~self._in_cand_t.index_select(0, idx)]
        self._in_cand_t[new] = True
        self._cand_t = torch.cat([self._cand_t, new])

    def select(self, pct: float, noise_floor: float = 0.0, of_positions: bool = False, count_floor: int = 0
               ) -> PixelDelta:
        """Forward the largest (100 - pct)% of the candidates (of max(candidates, count_floor); of all pixels if
        `of_positions`; at most every candidate), minus those <= noise_floor; clear them."""
        keep_frac = min(1.0, max(0.0, (100.0 - float(pct)) / 100.0))
        if self.backend == "numba":
            if self._ncand == 0:
                self.held_max = 0.0
                return PixelDelta(np.zeros(0, np.int64), np.zeros((0, self.shape[1]), np.float32), self.shape)
            fidx, out, self._ncand, held = _select_nb(
                self._r,
                self._m,
                self._in_cand,
                self._cand,
                self._ncand,
                keep_frac,
                bool(of_positions),
                np.float32(noise_floor),
                self._scratch,
                int(count_floor),
            )
            self.held_max = float(held)
            return PixelDelta(fidx, out, self.shape)
        return self._select_torch(keep_frac, noise_floor, of_positions, count_floor)

    def __call__(self, delta: PixelDelta | None, pct: float, noise_floor: float = 0.0, of_positions: bool = False,
                 count_floor: int = 0) -> PixelDelta:
        """accumulate(delta) (None: nothing new), then select."""
        if self.backend != "numba" or (delta is None and self._ncand == 0):
            if delta is not None:
                self.accumulate(delta)
            return self.select(pct, noise_floor, of_positions, count_floor)
        keep_frac = min(1.0, max(0.0, (100.0 - pct) / 100.0))
        if delta is None:
            idx, vals, need = self._no_index, self._no_values, self._ncand
        else:
            idx, vals = delta.index_np, delta.values_np
            need = self._ncand + idx.shape[0]
        if self._fidx.shape[0] < need:  # forwarded pixels: at most the candidates after accumulating
            self._fidx, self._fout = grown(self._fidx, need, self.pixels), grown(self._fout, need, self.pixels)
        if noise_floor != self._floor_key:
            self._floor_key, self._floor32 = noise_floor, np.float32(noise_floor)
        floor32 = self._floor32
        ok = False
        if self._direct and delta is not None:
            if self._fmag.shape[0] < idx.shape[0]:
                self._fmag = grown(self._fmag, idx.shape[0], self.pixels)
            nf, self._ncand, held, ok = _forward_direct_nb(
                idx, vals, self._r, self._m, self._in_cand, self._cand, self._ncand, keep_frac, of_positions,
                floor32, self._fidx, self._fout, self._fmag, count_floor)
            if not ok:  # the new delta is accumulated: select from the candidates as usual
                idx, vals = self._no_index, self._no_values
        if not ok:
            nf, self._ncand, held = _filter_into_nb(idx, vals, self._r, self._m, self._in_cand, self._cand,
                                                    self._ncand, keep_frac, of_positions, floor32, self._scratch,
                                                    self._fidx, self._fout, count_floor)  # fmt: skip
        self.held_max = float(held)
        self._direct = held <= floor32  # nothing above the floor held back: the percentage bound nothing
        # views of buffers the next call overwrites: valid until this filter runs again (the network consumes a
        # filter's output within the frame); copied for callers that keep outputs (reuse_output False)
        fidx, fout = self._fidx[:nf], self._fout[:nf]
        if not self.reuse_output:
            fidx, fout = fidx.copy(), fout.copy()
        return PixelDelta(fidx, fout, self.shape)

    def _select_torch(self, keep_frac: float, noise_floor: float, of_positions: bool = False, count_floor: int = 0
                      ) -> PixelDelta:
        cand = self._cand_t
        mc = self.magnitude.index_select(0, cand)
        pos = mc.gt(0)
        self._in_cand_t[cand[~pos]] = False
        cand, mc = cand[pos], mc[pos]
        n = cand.numel()
        k = min(n, int(np.floor(keep_frac * (self.magnitude.numel() if of_positions else max(n, count_floor)) + 0.5)))
        chosen = torch.zeros(n, dtype=torch.bool)
        if k >= n:
            chosen[:] = True
        elif k > 0:
            chosen[torch.topk(mc, k, sorted=False).indices] = True
        chosen &= mc.gt(noise_floor)
        self.held_max = float(mc[~chosen].max()) if bool((~chosen).any()) else 0.0
        fidx, _ = torch.sort(cand[chosen])
        self._cand_t = cand[~chosen]
        self._in_cand_t[fidx] = False
        out = self.residual.index_select(0, fidx)
        self.residual.index_fill_(0, fidx, 0.0)
        self.magnitude.index_fill_(0, fidx, 0.0)
        return PixelDelta(fidx, out, self.shape)
