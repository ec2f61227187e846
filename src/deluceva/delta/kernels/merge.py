"""Merging PixelDeltas: add (union of pixels, sum of values) and channel concat (union of pixels, zero-fill).

Two inputs (the common case) are merged in one fused linear pass (numba). More inputs, or no numba: the union
of the sorted index sets (linear merges, or torch.unique) and each input's values placed by its positions.
"""

from __future__ import annotations

import numpy as np
import torch

from deluceva.delta.kernels._jit import HAVE_NUMBA, PARALLEL_MIN, jit, jit_parallel, parallel, prange
from deluceva.delta.pixels import PixelDelta

# `_merge2_par_nb` splits a merge into this many slices of a's pixels (and b's in the same index ranges), run by
# numba's thread pool, for merges of at least PARALLEL_MIN output values (pixels x channels) when threads are on
MERGE_SLICES = 16


@jit
def _union_nb(a, b):
    """Sorted union of sorted unique a, b and the positions of a's and b's entries in it."""
    out = np.empty(a.shape[0] + b.shape[0], np.int64)
    pa = np.empty(a.shape[0], np.int64)
    pb = np.empty(b.shape[0], np.int64)
    i = j = k = 0
    while i < a.shape[0] or j < b.shape[0]:
        if j >= b.shape[0] or (i < a.shape[0] and a[i] < b[j]):
            out[k] = a[i]
            pa[i] = k
            i += 1
        elif i >= a.shape[0] or b[j] < a[i]:
            out[k] = b[j]
            pb[j] = k
            j += 1
        else:
            out[k] = a[i]
            pa[i] = k
            pb[j] = k
            i += 1
            j += 1
        k += 1
    return out[:k], pa, pb


@jit
def _merge2_rows_nb(ia, va, ib, vb, concat, i, ie, j, je, idx, out, k):  # pragma: no cover - compiled
    """`_merge2_nb`'s pass over a[i:ie] and b[j:je] into idx[k:], out[k:] (zeroed); returns the next k."""
    ca, cb = va.shape[1], vb.shape[1]
    off = ca if concat else 0
    while i < ie or j < je:
        if j >= je or (i < ie and ia[i] < ib[j]):
            idx[k] = ia[i]
            out[k, :ca] = va[i]
            i += 1
        elif i >= ie or ib[j] < ia[i]:
            idx[k] = ib[j]
            out[k, off : off + cb] = vb[j]
            j += 1
        else:
            idx[k] = ia[i]
            out[k, :ca] = va[i]
            out[k, off : off + cb] += vb[j]
            i += 1
            j += 1
        k += 1
    return k


@jit
def _merge2_nb(ia, va, ib, vb, concat):
    """Two deltas merged in one linear pass: add (values summed) or concat (a's channels, then b's)."""
    width = va.shape[1] + vb.shape[1] if concat else va.shape[1]
    na, nb = ia.shape[0], ib.shape[0]
    idx = np.empty(na + nb, np.int64)
    out = np.zeros((na + nb, width), va.dtype)
    k = _merge2_rows_nb(ia, va, ib, vb, concat, 0, na, 0, nb, idx, out, 0)
    return idx[:k], out[:k]


@jit
def _concat_at_nb(idx_cat, starts, vals_flat, vstarts, chans, offs, ctot):
    """k-way merge of sorted unique index runs idx_cat[starts[j]:starts[j+1]] (part j's rows: chans[j] values each,
    row-major from vals_flat[vstarts[j]]) into sorted union rows of ctot channels, part j at channels offs[j]."""
    k = starts.shape[0] - 1
    pos = starts[:k].copy()
    total = idx_cat.shape[0]
    out_idx = np.empty(total, np.int64)
    out = np.zeros((total, ctot), vals_flat.dtype)
    n = 0
    while True:
        m = -1
        for j in range(k):
            if pos[j] < starts[j + 1]:
                v = idx_cat[pos[j]]
                if m < 0 or v < m:
                    m = v
        if m < 0:
            break
        out_idx[n] = m
        for j in range(k):
            if pos[j] < starts[j + 1] and idx_cat[pos[j]] == m:
                base = vstarts[j] + (pos[j] - starts[j]) * chans[j]
                o = offs[j]
                for c in range(chans[j]):
                    out[n, o + c] += vals_flat[base + c]
                pos[j] += 1
        n += 1
    return out_idx[:n], out[:n]


@jit
def _union_count_nb(ia, i, ie, ib, j, je):  # pragma: no cover - compiled
    """Size of the union of the sorted unique ia[i:ie] and ib[j:je]."""
    k = 0
    while i < ie or j < je:
        if j >= je or (i < ie and ia[i] < ib[j]):
            i += 1
        elif i >= ie or ib[j] < ia[i]:
            j += 1
        else:
            i += 1
            j += 1
        k += 1
    return k


@jit_parallel
def _merge2_par_nb(ia, va, ib, vb, concat):  # pragma: no cover - compiled
    """`_merge2_nb` in MERGE_SLICES parallel slices: slice s takes a's pixels s*na/S .. (s+1)*na/S and b's pixels
    in the same range of indices (a pair of equal indices stays in one slice); the slices' union sizes give each
    its place in the output. The same values as `_merge2_nb`."""
    ns = MERGE_SLICES
    na, nb = ia.shape[0], ib.shape[0]
    a0 = np.empty(ns + 1, np.int64)
    b0 = np.empty(ns + 1, np.int64)
    for s in range(ns + 1):
        a0[s] = s * na // ns
        b0[s] = nb if a0[s] >= na else np.searchsorted(ib, ia[a0[s]])
    b0[0] = 0
    counts = np.empty(ns, np.int64)
    for s in prange(ns):
        counts[s] = _union_count_nb(ia, a0[s], a0[s + 1], ib, b0[s], b0[s + 1])
    starts = np.zeros(ns + 1, np.int64)
    for s in range(ns):
        starts[s + 1] = starts[s] + counts[s]
    width = va.shape[1] + vb.shape[1] if concat else va.shape[1]
    idx = np.empty(starts[ns], np.int64)
    out = np.zeros((starts[ns], width), va.dtype)
    for s in prange(ns):
        _merge2_rows_nb(ia, va, ib, vb, concat, a0[s], a0[s + 1], b0[s], b0[s + 1], idx, out, starts[s])
    return idx, out


def _merge2(a: PixelDelta, b: PixelDelta, concat: bool) -> tuple[np.ndarray, np.ndarray]:
    """(index, values) of the add or concat of two deltas (numba): in parallel slices for large merges when the
    kernels may use threads (`_jit.parallel`), else in one pass."""
    ia, va, ib, vb = a.index_np, a.values_np, b.index_np, b.values_np
    width = va.shape[1] + vb.shape[1] if concat else va.shape[1]
    if len(ia) and len(ib) and (len(ia) + len(ib)) * width >= PARALLEL_MIN and parallel():
        return _merge2_par_nb(ia, va, ib, vb, concat)
    return _merge2_nb(ia, va, ib, vb, concat)


def concat_at(deltas: list[PixelDelta], offsets: list[int], shape: tuple[int, int, int, int]) -> PixelDelta:
    """Δ of a channel concat with the changing parts `deltas` at channel `offsets` of the output `shape` (other
    channels zero): union of the active pixels in one k-way merge pass (numba; torch.unique otherwise)."""
    ctot = shape[1]
    if HAVE_NUMBA and all(d.is_float32 for d in deltas):
        chans = [d.shape[1] for d in deltas]
        counts = [d.active for d in deltas]
        starts = np.zeros(len(deltas) + 1, np.int64)
        starts[1:] = np.cumsum(counts)
        vstarts = np.zeros(len(deltas), np.int64)
        vstarts[1:] = np.cumsum([a * c for a, c in zip(counts, chans, strict=True)])[:-1]
        idx, vals = _concat_at_nb(np.concatenate([d.index_np for d in deltas]), starts,
                                  np.concatenate([d.values_np.reshape(-1) for d in deltas]), vstarts,
                                  np.array(chans, np.int64), np.array(offsets, np.int64), ctot)  # fmt: skip
        return PixelDelta(idx, vals, shape)
    idx, inv = torch.unique(torch.cat([d.index for d in deltas]), sorted=True, return_inverse=True)
    vals = deltas[0].values.new_zeros(idx.numel(), ctot)
    start = 0
    for d, off in zip(deltas, offsets, strict=True):
        rows = inv[start : start + d.index.shape[0]]
        start += d.index.shape[0]
        vals[rows, off : off + d.values.shape[1]] += d.values
    return PixelDelta(idx, vals, shape)


def _union(indices: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Sorted union of sorted unique index tensors and each one's positions in it."""
    first = indices[0]
    if all(i.numel() == first.numel() and torch.equal(i, first) for i in indices[1:]):
        pos = torch.arange(first.numel())
        return first, [pos] * len(indices)
    if HAVE_NUMBA:
        union = indices[0].numpy()
        for i in indices[1:]:
            union, _, _ = _union_nb(union, i.numpy())
        u = torch.from_numpy(union)
    else:
        u = torch.unique(torch.cat(indices))
    return u, [torch.searchsorted(u, i) for i in indices]


def add(*deltas: PixelDelta) -> PixelDelta:
    """Δ of a sum of tensors of one shape: union of the active pixels, values summed there."""
    shape = deltas[0].shape
    if any(tuple(d.shape) != tuple(shape) for d in deltas):
        raise ValueError(f"add: shapes differ: {[d.shape for d in deltas]}")
    live = [d for d in deltas if d.active]
    if not live:
        return PixelDelta.empty(shape, deltas[0].values.dtype)
    if len(live) == 1:
        return live[0]
    if len(live) == 2 and HAVE_NUMBA:
        a, b = live
        idx, vals = _merge2(a, b, False)
        return PixelDelta(idx, vals, shape)
    index, positions = _union([d.index for d in live])
    if index.numel() == live[0].index.numel() and all(d.index.numel() == index.numel() for d in live):
        values = live[0].values.clone()  # identical pixel sets
        for d in live[1:]:
            values += d.values
        return PixelDelta(index, values, shape)
    values = live[0].values.new_zeros(index.numel(), shape[1])
    for d, pos in zip(live, positions, strict=True):
        values.index_add_(0, pos, d.values)
    return PixelDelta(index, values, shape)


def concat(*deltas: PixelDelta) -> PixelDelta:
    """Δ of torch.cat(dim=1): union of the active pixels, each part's channels zero where it was inactive."""
    n, _, h, w = deltas[0].shape
    if any((d.shape[0], d.shape[2], d.shape[3]) != (n, h, w) for d in deltas):
        raise ValueError(f"concat: spatial shapes differ: {[d.shape for d in deltas]}")
    channels = [d.shape[1] for d in deltas]
    shape = (n, sum(channels), h, w)
    if len(deltas) == 2 and HAVE_NUMBA:
        a, b = deltas
        idx, vals = _merge2(a, b, True)
        return PixelDelta(idx, vals, shape)
    index, positions = _union([d.index for d in deltas])
    if all(d.index.numel() == index.numel() for d in deltas):  # identical pixel sets (or all empty)
        return PixelDelta(index, torch.cat([d.values for d in deltas], 1), shape)
    values = deltas[0].values.new_zeros(index.numel(), shape[1])
    start = 0
    for d, c, pos in zip(deltas, channels, positions, strict=True):
        if d.index.numel():
            values[:, start : start + c].index_copy_(0, pos, d.values)
        start += c
    return PixelDelta(index, values, shape)
