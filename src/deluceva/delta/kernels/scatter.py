"""Input-centric sparse conv compute: per-phase-class GEMM, one scatter-add pass, collect of the touched rows.

For active input pixels (index (A,), values (A, Cin)) and a PhasePlan:
1. split the pixels by stride phase class (counting sort) and gather their values class by class;
2. one GEMM per class, values (A_c, Cin) @ W_c (Cin, T_c*Cout), into one flat contribution buffer;
3. one scatter-add pass in pixel order (good locality) of every (pixel, reachable tap) contribution into a
   persistent zeroed output buffer (N*Ho*Wo, Cout), remembering the touched rows;
4. collect: the touched rows in sorted order, re-zeroing only those rows (no full-tensor pass per frame).
Depthwise convs skip the GEMM: the scatter multiplies vals[i, c] * w[t, c] itself. The numba kernels are the fast
path; the torch back end (index_add_ + unique) is the fallback without numba.
"""

from __future__ import annotations

import numpy as np
import torch

from deluceva.delta.kernels._jit import NUMPY_GEMM_MAX_MACS, grown, jit, resolve_backend
from deluceva.delta.kernels.actstep import step_act_nb
from deluceva.delta.kernels.phases import PhasePlan
from deluceva.delta.pixels import Array, PixelDelta


@jit
def _split_nb(pix, h, w, mul_y, mul_x, div_y, div_x, ntaps, cout):
    """Group pixels by phase class. Returns perm (M,) of the pixels with taps in class order, counts (ncls,),
    start (A,) offset of each pixel's (T_c, Cout) contributions in the flat buffer (-1: no taps), total floats."""
    ncls = ntaps.shape[0]
    a = pix.shape[0]
    hw = h * w
    cls = np.empty(a, np.int64)
    counts = np.zeros(ncls, np.int64)
    for i in range(a):
        r = pix[i] % hw
        y = r // w
        x = r - y * w
        c = ((y * mul_y) % div_y) * div_x + (x * mul_x) % div_x
        cls[i] = c
        counts[c] += 1
    pos = np.zeros(ncls, np.int64)  # next slot in perm per class
    base = np.zeros(ncls, np.int64)  # next float offset per class
    m = 0
    total = 0
    for c in range(ncls):
        if ntaps[c] > 0:
            pos[c] = m
            base[c] = total
            m += counts[c]
            total += counts[c] * ntaps[c] * cout
    perm = np.empty(m, np.int64)
    start = np.empty(a, np.int64)
    for i in range(a):
        c = cls[i]
        if ntaps[c] == 0:
            start[i] = -1
            continue
        perm[pos[c]] = i
        pos[c] += 1
        start[i] = base[c]
        base[c] += ntaps[c] * cout
    return perm, counts, start, total


@jit
def _scatter_nb(pix, start, contrib, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                rel_x, buf, mark, touched, nt):  # fmt: skip
    """buf[o(pixel i, tap t)] += contrib[start[i] + t*C : +C]; returns the new number of touched rows."""
    hw = h * w
    ohw = ho * wo
    ch = buf.shape[1]
    for i in range(pix.shape[0]):
        s = start[i]
        if s < 0:
            continue
        p = pix[i]
        n = p // hw
        r = p - n * hw
        y = r // w
        x = r - y * w
        c = ((y * mul_y) % div_y) * div_x + (x * mul_x) % div_x
        by = (y * mul_y + off0_y[c]) // div_y
        bx = (x * mul_x + off0_x[c]) // div_x
        ob = n * ohw
        for t in range(ntaps[c]):
            oy = by + rel_y[c, t]
            ox = bx + rel_x[c, t]
            if oy < 0 or oy >= ho or ox < 0 or ox >= wo:
                continue
            o = ob + oy * wo + ox
            if mark[o] == 0:
                mark[o] = 1
                touched[nt] = o
                nt += 1
            src = s + t * ch
            for k in range(ch):
                buf[o, k] += contrib[src + k]
    return nt


@jit
def _scatter_dw_nb(pix, vals, wdw, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                   rel_x, buf, mark, touched, nt):  # fmt: skip
    """Depthwise: buf[o(pixel i, tap t), k] += vals[i, k] * wdw[class, t, k]; returns the new touched count."""
    hw = h * w
    ohw = ho * wo
    ch = buf.shape[1]
    for i in range(pix.shape[0]):
        p = pix[i]
        n = p // hw
        r = p - n * hw
        y = r // w
        x = r - y * w
        c = ((y * mul_y) % div_y) * div_x + (x * mul_x) % div_x
        by = (y * mul_y + off0_y[c]) // div_y
        bx = (x * mul_x + off0_x[c]) // div_x
        ob = n * ohw
        for t in range(ntaps[c]):
            oy = by + rel_y[c, t]
            ox = bx + rel_x[c, t]
            if oy < 0 or oy >= ho or ox < 0 or ox >= wo:
                continue
            o = ob + oy * wo + ox
            if mark[o] == 0:
                mark[o] = 1
                touched[nt] = o
                nt += 1
            for k in range(ch):
                buf[o, k] += vals[i, k] * wdw[c, t, k]
    return nt


@jit
def sorted_marked_nb(touched, nt, mark):
    """The nt rows marked in `mark` (listed unordered in touched[:nt]) in ascending order: a scan of `mark` when
    that beats a sort. Leaves the marks set."""
    total = mark.shape[0]
    if nt * 64 > total:
        idx = np.empty(nt, np.int64)
        j = 0
        for o in range(total):
            if mark[o] != 0:
                idx[j] = o
                j += 1
        return idx
    return np.sort(touched[:nt])


@jit
def reach_nb(pix, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y, rel_x, mark, touched):
    """Sorted unique output pixels reachable from pix (uses and clears `mark`)."""
    hw = h * w
    ohw = ho * wo
    nt = 0
    for i in range(pix.shape[0]):
        p = pix[i]
        n = p // hw
        r = p - n * hw
        y = r // w
        x = r - y * w
        c = ((y * mul_y) % div_y) * div_x + (x * mul_x) % div_x
        by = (y * mul_y + off0_y[c]) // div_y
        bx = (x * mul_x + off0_x[c]) // div_x
        for t in range(ntaps[c]):
            oy = by + rel_y[c, t]
            ox = bx + rel_x[c, t]
            if oy < 0 or oy >= ho or ox < 0 or ox >= wo:
                continue
            o = n * ohw + oy * wo + ox
            if mark[o] == 0:
                mark[o] = 1
                touched[nt] = o
                nt += 1
    out = sorted_marked_nb(touched, nt, mark)
    for j in range(nt):
        mark[out[j]] = 0
    return out


@jit
def _collect_nb(touched, nt, buf, mark):
    """Sorted touched indices and their rows; re-zeroes those rows and marks."""
    idx = sorted_marked_nb(touched, nt, mark)
    out = np.empty((nt, buf.shape[1]), buf.dtype)
    for j in range(nt):
        o = idx[j]
        mark[o] = 0
        out[j, :] = buf[o, :]
        buf[o, :] = 0
    return idx, out


@jit
def _scatter_collect_nb(pix, start, contrib, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                        rel_x, buf, mark, touched):  # fmt: skip
    """`_scatter_nb` then `_collect_nb` in one call: (sorted touched index, their rows)."""
    nt = _scatter_nb(pix, start, contrib, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                     rel_x, buf, mark, touched, 0)
    return _collect_nb(touched, nt, buf, mark)


@jit
def _scatter_dw_collect_nb(pix, vals, wdw, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                           rel_x, buf, mark, touched):  # fmt: skip
    """`_scatter_dw_nb` then `_collect_nb` in one call."""
    nt = _scatter_dw_nb(pix, vals, wdw, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y,
                        rel_x, buf, mark, touched, 0)
    return _collect_nb(touched, nt, buf, mark)


@jit
def _small_conv_nb(pix, vals, wtab, geo, ntaps, off0, rel, buf, mark, touched):
    """Whole sparse conv of a few active pixels in one call (no split, no GEMM call, no contribution buffer):
    buf[o(pixel i, tap t), :] += vals[i, k] * wtab[class, t, k, :] for every input channel k, then the collect.
    geo: int64 (8,) = h, w, ho, wo, mul_y, mul_x, div_y, div_x; off0 (2, ncls); rel (2, ncls, Tmax).
    Returns (sorted touched index, their rows)."""
    h, w, ho, wo, mul_y, mul_x, div_y, div_x = geo[0], geo[1], geo[2], geo[3], geo[4], geo[5], geo[6], geo[7]
    hw = h * w
    ohw = ho * wo
    cin = vals.shape[1]
    ch = buf.shape[1]
    acc = np.zeros(ch, np.float32)
    nt = 0
    for i in range(pix.shape[0]):
        p = pix[i]
        n = p // hw
        r = p - n * hw
        y = r // w
        x = r - y * w
        c = ((y * mul_y) % div_y) * div_x + (x * mul_x) % div_x
        by = (y * mul_y + off0[0, c]) // div_y
        bx = (x * mul_x + off0[1, c]) // div_x
        ob = n * ohw
        for t in range(ntaps[c]):
            oy = by + rel[0, c, t]
            ox = bx + rel[1, c, t]
            if oy < 0 or oy >= ho or ox < 0 or ox >= wo:
                continue
            o = ob + oy * wo + ox
            if mark[o] == 0:
                mark[o] = 1
                touched[nt] = o
                nt += 1
            acc[:] = 0
            wt = wtab[c, t]
            for k in range(cin):
                v = vals[i, k]
                for j in range(ch):
                    acc[j] += v * wt[k, j]
            row = buf[o]
            for j in range(ch):
                row[j] += acc[j]
    return _collect_nb(touched, nt, buf, mark)


@jit
def _small_conv_act_nb(pix, vals, wtab, geo, ntaps, off0, rel, buf, mark, touched, z, code, alpha, precise,
                       out_idx, out_rows):  # fmt: skip
    """`_small_conv_nb`, then the fused activation step on its output rows (`actstep.step_act_nb`: z[idx] += Δz,
    Δy = f(z_new) - f(z_old)): a conv + activation unit on few pixels in one call. Writes the output index and Δy
    into out_idx, out_rows (at least len(pix) * Tmax rows) and returns their count (no array to box)."""
    idx, dz = _small_conv_nb(pix, vals, wtab, geo, ntaps, off0, rel, buf, mark, touched)
    dy = step_act_nb(z, idx, dz, code, alpha, precise)
    n = idx.shape[0]
    out_idx[:n] = idx
    out_rows[:n] = dy
    return n


@jit
def _dw_act_nb(pix, vals, wdw, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x, rel_y, rel_x, buf,
               mark, touched, z, code, alpha, precise, out_idx, out_rows):  # fmt: skip
    """Depthwise conv (`_scatter_dw_nb` + collect) then the fused activation step, in one call; writes the output
    index and Δy into out_idx, out_rows (at least len(pix) * Tmax rows) and returns their count."""
    idx, dz = _scatter_dw_collect_nb(pix, vals, wdw, h, w, ho, wo, mul_y, mul_x, div_y, div_x, ntaps, off0_y, off0_x,
                                     rel_y, rel_x, buf, mark, touched)  # fmt: skip
    nt = idx.shape[0]
    out_idx[:nt] = idx
    out_rows[:nt] = step_act_nb(z, idx, dz, code, alpha, precise)
    return nt


# Convs of up to SMALL_CONV_MACS_PER_COUT * Cout multiply-adds (active pixels x Cin x most taps x Cout; 4x that with
# stride phases, whose split path makes one GEMM per phase) run in `_small_conv_nb`: one call, where split + GEMM +
# scatter cost ~15-30 us of calls. Its loops reach ~4 GMAC/s at 16 output channels, ~12 from 64 (BLAS ~35), so the
# cross-over grows with Cout (measured on YOLOv5n's 3x3 convs, 1 thread: 16 ch ~30 pixels, 64 ch ~8-16, 128 ch ~8,
# stride 2: 64 ch ~128, 256 ch ~40).
SMALL_CONV_MACS_PER_COUT = 1 << 12


# A depthwise conv + activation on up to this many active pixels runs in one call (`_dw_act_nb`; its arithmetic is
# K*K*C per pixel, so the call overheads it saves matter up to a few thousand pixels)
DW_ACT_MAX_PIXELS = 4096


class ScatterConv:
    """Input-centric sparse conv for one PhasePlan: `__call__(index (A,), values (A, Cin)) -> (index, rows)`.

    wtap: (G, cg, K*K, og) weight per group, input channel, kernel tap (ky-major) and output channel.
    rows: N * Ho * Wo. The output index is sorted, unique: every output pixel reachable from an active input.
    """

    def __init__(self, plan: PhasePlan, wtap: torch.Tensor, rows: int, backend: str = "auto"):
        self.plan = plan
        self.backend = resolve_backend(backend)
        g, cg, _, og = wtap.shape
        self.groups, self.cout = g, g * og
        self.depthwise = g > 1 and cg == 1 and og == 1
        self.rows = rows
        self.weights: list[torch.Tensor | None] = []  # per class: (cg, T*og) | (G, cg, T*og) | depthwise (T, C)
        for c in range(plan.classes):
            t = int(plan.ntaps[c])
            if t == 0:
                self.weights.append(None)
                continue
            w = wtap[:, :, torch.from_numpy(plan.tap[c, :t]), :]  # (G, cg, T, og)
            if self.depthwise:
                self.weights.append(w[:, 0, :, 0].t().contiguous())
            elif g == 1:
                self.weights.append(w[0].reshape(cg, t * og).contiguous())
            else:
                self.weights.append(w.reshape(g, cg, t * og).contiguous())
        if self.depthwise:  # (ncls, Tmax, C) for the fused kernel
            wdw = torch.zeros(plan.classes, plan.tap.shape[1], self.cout)
            for c, wc in enumerate(self.weights):
                if wc is not None:
                    wdw[c, : wc.shape[0]] = wc
            self._wdw = wdw.numpy()
        extra = 1 if self.backend == "torch" else 0  # torch: a dummy row absorbs unreachable taps
        self.buf = torch.zeros(rows + extra, self.cout)
        if self.backend == "numba":
            self._buf = self.buf.numpy()
            self._mark = np.zeros(rows, np.uint8)
            self._touched = np.empty(rows, np.int64)
            self._flat = torch.empty(0)
            self._flat_np = self._flat.numpy()
            # per-call constants, prepared once: kernel arguments and the classes with taps (class, weight, floats)
            self._geo = self._geometry()
            self._split_args = (*plan.in_hw, *plan.mul, *plan.div, plan.ntaps, self.cout)
            self._cin = cg * g
            self._small_tmax = int(plan.ntaps.max())  # output pixels per active input pixel, at most
            self._act_idx, self._act_rows = np.empty(0, np.int64), np.empty((0, self.cout), np.float32)
            self._small = None
            self._small_macs = self._cin * self._small_tmax * self.cout  # at most, per active pixel
            self._small_limit = SMALL_CONV_MACS_PER_COUT * self.cout * (4 if plan.classes > 1 else 1)
            if g == 1 and not self.depthwise:  # per class and tap a (Cin, Cout) matrix, for `_small_conv_nb`
                wtab = np.zeros((plan.classes, plan.tap.shape[1], cg, self.cout), np.float32)
                for c, wc in enumerate(self.weights):
                    if wc is not None:
                        t = int(plan.ntaps[c])
                        wtab[c, :t] = wc.reshape(cg, t, self.cout).permute(1, 0, 2).numpy()
                geo = np.array([*plan.in_hw, *plan.out_hw, *plan.mul, *plan.div], np.int64)
                self._small = (wtab, geo, plan.ntaps, np.stack([plan.off0_y, plan.off0_x]),
                               np.stack([plan.rel_y, plan.rel_x]))
            self._classes = [(c, wc, int(plan.ntaps[c]) * self.cout, wc.numpy()) for c, wc in enumerate(self.weights)
                             if wc is not None]

    def __call__(self, pix: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backend == "numba":
            idx, out = self.run_numba(PixelDelta(pix, vals, (0, 0, 0, 0)))
            return torch.from_numpy(idx), torch.from_numpy(out)
        return self._run_torch(pix, vals)

    def run(self, delta: PixelDelta) -> tuple[Array, Array]:
        """(index, rows) of the output delta for an input PixelDelta (NumPy arrays on the numba path)."""
        if self.backend == "numba":
            return self.run_numba(delta)
        return self._run_torch(delta.index, delta.values)

    # ------------------------------------------------------------------------------------------------ numba
    def _geometry(self) -> tuple:
        p = self.plan
        return (*p.in_hw, *p.out_hw, *p.mul, *p.div, p.ntaps, p.off0_y, p.off0_x, p.rel_y, p.rel_x)

    def _flat_buffer(self, total: int) -> tuple[torch.Tensor, np.ndarray]:
        """The contribution buffer (at least `total` floats) as a tensor and the same memory as a NumPy array."""
        if self._flat.numel() < total:
            self._flat = torch.empty(max(total, int(1.25 * self._flat.numel())))
            self._flat_np = self._flat.numpy()
        return self._flat, self._flat_np

    def run_small_act(self, delta: PixelDelta, z: np.ndarray, code: int, alpha: float, precise: bool
                      ) -> tuple[np.ndarray, np.ndarray] | None:
        """Conv then activation step on state rows z (see `_small_conv_act_nb`) when the delta is small enough for
        the one-call kernel, else None (nothing done). The result is a view of buffers the next call overwrites
        (the network consumes a unit's output within the frame)."""
        a = delta.active
        if self.depthwise:
            if a > DW_ACT_MAX_PIXELS:
                return None
        elif self._small is None or a * self._small_macs > self._small_limit:
            return None
        need = a * self._small_tmax
        if self._act_idx.shape[0] < need:
            self._act_idx = grown(self._act_idx, need, self.rows)
            self._act_rows = grown(self._act_rows, need, self.rows)
        if self.depthwise:
            n = _dw_act_nb(delta.index_np, delta.values_np, self._wdw, *self._geo, self._buf, self._mark,
                           self._touched, z, code, alpha, precise, self._act_idx, self._act_rows)  # fmt: skip
        else:
            n = _small_conv_act_nb(delta.index_np, delta.values_np, *self._small, self._buf, self._mark,
                                   self._touched, z, code, alpha, precise, self._act_idx, self._act_rows)  # fmt: skip
        return self._act_idx[:n], self._act_rows[:n]

    def run_numba(self, delta: PixelDelta) -> tuple[np.ndarray, np.ndarray]:
        """Numba path: sorted output index (A',) and rows (A', Cout), both NumPy."""
        pix_np = delta.index_np
        if self._small is not None and delta.active * self._small_macs <= self._small_limit:
            return _small_conv_nb(pix_np, delta.values_np, *self._small, self._buf, self._mark, self._touched)
        if self.depthwise:
            return _scatter_dw_collect_nb(pix_np, delta.values_np, self._wdw, *self._geo, self._buf, self._mark,
                                          self._touched)  # fmt: skip
        perm, counts, start, total = _split_nb(pix_np, *self._split_args)
        flat, flat_np = self._flat_buffer(total)
        # small products in NumPy: no tensor round trip, ~1 us of call overhead instead of ~4 (single-threaded in
        # OpenBLAS at these sizes); larger ones in torch's GEMM
        small = self.groups == 1 and total * self._cin <= NUMPY_GEMM_MAX_MACS
        if len(counts) == 1:  # one phase class (stride 1): every pixel, in order
            if total:
                a, wc, wc_np = delta.active, self._classes[0][1], self._classes[0][3]
                if small:
                    np.matmul(delta.values_np, wc_np, out=flat_np[:total].reshape(a, -1))
                else:
                    self._gemm(delta.values, wc, flat[:total].view(a, -1))
        else:
            vals_np = delta.values_np[perm]
            vals = None if small else torch.from_numpy(vals_np)
            counts = counts.tolist()
            pos, off = 0, 0
            for c, wc, per, wc_np in self._classes:
                n = counts[c]
                if n == 0:
                    continue
                size = n * per
                if vals is None:
                    np.matmul(vals_np[pos : pos + n], wc_np, out=flat_np[off : off + size].reshape(n, -1))
                else:
                    self._gemm(vals[pos : pos + n], wc, flat[off : off + size].view(n, -1))
                pos, off = pos + n, off + size
        return _scatter_collect_nb(pix_np, start, flat_np, *self._geo, self._buf, self._mark,
                                   self._touched)  # fmt: skip

    def _gemm(self, v: torch.Tensor, wc: torch.Tensor, out: torch.Tensor) -> None:
        """out (n, T*Cout) = contributions of values v (n, Cin); grouped: channel order (T, G, og)."""
        if self.groups == 1:
            torch.mm(v, wc, out=out)
            return
        g, n = self.groups, v.shape[0]
        res = torch.bmm(v.view(n, g, wc.shape[1]).transpose(0, 1), wc)  # (G, n, T*og)
        out.view(n, -1, g, self.cout // g).copy_(res.view(g, n, -1, self.cout // g).permute(1, 2, 0, 3))

    # ------------------------------------------------------------------------------------------------ torch
    def _run_torch(self, pix: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        targets = []
        for c, sel, tgt in class_targets(self.plan, pix, self.rows):
            wc = self.weights[c]
            if wc is None:
                continue
            v = vals.index_select(0, sel)
            if self.depthwise:
                contrib = v.unsqueeze(1) * wc.unsqueeze(0)
            else:
                contrib = torch.empty(sel.numel(), tgt.shape[1] * self.cout)
                self._gemm(v, wc, contrib)
            self.buf.index_add_(0, tgt.reshape(-1), contrib.reshape(-1, self.cout))
            targets.append(tgt.reshape(-1))
        if not targets:
            return torch.zeros(0, dtype=torch.int64), self.buf.new_zeros(0, self.cout)
        idx = torch.unique(torch.cat(targets))
        if idx[-1] == self.rows:  # drop the dummy row
            idx = idx[:-1]
        self.buf[self.rows].zero_()
        out = self.buf.index_select(0, idx)
        self.buf.index_fill_(0, idx, 0.0)
        return idx, out


def class_targets(plan: PhasePlan, pix: torch.Tensor, dummy: int):
    """Torch: per phase class c with taps and pixels, yield (c, sel (A_c,) positions in pix, targets (A_c, T_c)
    output rows, `dummy` where a tap falls outside the output)."""
    h, w = plan.in_hw
    ho, wo = plan.out_hw
    n, r = pix.div(h * w, rounding_mode="floor"), pix.remainder(h * w)
    y, x = r.div(w, rounding_mode="floor"), r.remainder(w)
    cls = (y * plan.mul[0]).remainder(plan.div[0]) * plan.div[1] + (x * plan.mul[1]).remainder(plan.div[1])
    for c in range(plan.classes):
        t = int(plan.ntaps[c])
        sel = (cls == c).nonzero().squeeze(1) if plan.classes > 1 else torch.arange(pix.numel())
        if t == 0 or sel.numel() == 0:
            continue
        oy = (y[sel, None] * plan.mul[0] + torch.from_numpy(plan.off_y[c, :t])).div(plan.div[0], rounding_mode="floor")
        ox = (x[sel, None] * plan.mul[1] + torch.from_numpy(plan.off_x[c, :t])).div(plan.div[1], rounding_mode="floor")
        valid = (oy >= 0) & (oy < ho) & (ox >= 0) & (ox < wo)
        yield c, sel, torch.where(valid, n[sel, None] * (ho * wo) + oy * wo + ox, dummy)


def reachable(plan: PhasePlan, pix: torch.Tensor) -> torch.Tensor:
    """Sorted unique output pixels reachable from input pixels pix through the plan's taps (torch)."""
    parts = [tgt.reshape(-1) for _, _, tgt in class_targets(plan, pix, -1)]
    if not parts:
        return torch.zeros(0, dtype=torch.int64)
    idx = torch.unique(torch.cat(parts))
    return idx[1:] if idx[0] < 0 else idx
