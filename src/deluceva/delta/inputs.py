"""The network input's delta with a noise floor: changes are held back until they exceed the floor.

State: the input applied so far `x_applied` (N, C, H, W). Per frame: a = x - x_applied; forward every pixel whose
max-over-channels |a| exceeds `floor` (all channels of it), and set x_applied = x there. What is held back is exactly
x - x_applied, so nothing is dropped: a pixel drifting slowly is forwarded once its accumulated change exceeds the
floor. floor = 0 forwards every changed pixel (exact). With a coherence threshold, a pixel over the floor also
waits unless its change is part of a spatially coherent one (a window of 8 x 8 pixels whose mean change exceeds the
threshold): a keyframe's requantisation noise (every 10th frame of the person video: half the pixels change by 2+
grey levels, 1% by 13+) averages out, a moving object does not. One pass over the input (fused numba kernels for
contiguous float32 inputs, vectorised torch otherwise), no per-pixel Python loops.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from deluceva.delta.kernels._jit import HAVE_NUMBA, index_scratch, jit, work_array
from deluceva.delta.pixels import PixelDelta


@jit
def _list_over_floor_nb(xb, ab, floor, scratch, cnt, offset):  # pragma: no cover - compiled
    """Append offset + q to scratch (from position cnt) for the pixels q with max_c |xb - ab| > floor (xb, ab:
    (C, P) float32; 3 channels side by side); returns the new count."""
    c, p = xb.shape
    if c == 3:
        x0, x1, x2, a0, a1, a2 = xb[0], xb[1], xb[2], ab[0], ab[1], ab[2]
        for q in range(p):
            if max(abs(x0[q] - a0[q]), abs(x1[q] - a1[q]), abs(x2[q] - a2[q])) > floor:
                scratch[cnt] = offset + q
                cnt += 1
    else:
        for q in range(p):
            m = abs(xb[0, q] - ab[0, q])
            for ch in range(1, c):
                m = max(m, abs(xb[ch, q] - ab[ch, q]))
            if m > floor:
                scratch[cnt] = offset + q
                cnt += 1
    return cnt


@jit
def _take_and_apply_nb(x, a, scratch, cnt):  # pragma: no cover - compiled
    """(idx (A,), vals (A, C)) of the first cnt pixels listed in scratch (flat n * P + q), a = x there."""
    c, p = x.shape[1], x.shape[2]
    idx = scratch[:cnt].copy()
    vals = np.empty((cnt, c), x.dtype)
    for i in range(cnt):
        b = idx[i] // p
        q = idx[i] - b * p
        for ch in range(c):
            xv = x[b, ch, q]
            vals[i, ch] = xv - a[b, ch, q]
            a[b, ch, q] = xv
    return idx, vals


@jit
def _input_delta_nb(x, a, floor, scratch):  # pragma: no cover - compiled
    """x, a: (N, C, P) float32; returns (idx (A,), vals (A, C)) of the pixels with max_c |x - a| > floor, and sets
    a = x there. One read pass over x and a; scratch (N*P,) work."""
    cnt = 0
    for b in range(x.shape[0]):
        cnt = _list_over_floor_nb(x[b], a[b], floor, scratch, cnt, b * x.shape[2])
    return _take_and_apply_nb(x, a, scratch, cnt)


@jit
def _cell_sums_nb(xb, ab, h, w, cell, bands, sums):  # pragma: no cover - compiled
    """sums[ch, cy, cx] = the sum of the changes xb - ab ((C, H*W) float32) over each cell of cell x cell pixels
    in the bands of cell rows flagged in `bands` (0 elsewhere): per band, column sums (a vectorisable loop along
    the row), then its cells' sums."""
    hc, wc = sums.shape[1], sums.shape[2]
    col = np.empty(w, np.float32)
    for ch in range(xb.shape[0]):
        xc, ac = xb[ch], ab[ch]
        for cy in range(hc):
            if not bands[cy]:
                sums[ch, cy, :] = 0.0
                continue
            col[:] = 0.0
            for y in range(cy * cell, min(h, (cy + 1) * cell)):
                row = y * w
                for xx in range(w):
                    col[xx] += xc[row + xx] - ac[row + xx]
            for cx in range(wc):
                acc = 0.0
                for xx in range(cx * cell, min(w, (cx + 1) * cell)):
                    acc += col[xx]
                sums[ch, cy, cx] = acc


@jit
def _coherent_cells_nb(sums, h, w, cell, coherence, ok):  # pragma: no cover - compiled
    """ok[i, j] = whether some window of 2 x 2 cells holding cell (i, j) (top-left cells i < max(1, Hc - 1),
    j < max(1, Wc - 1); clipped at the border) has a mean change above `coherence` in some channel."""
    c, hc, wc = sums.shape
    ok[:, :] = False
    for i in range(max(1, hc - 1)):
        i1 = min(i + 1, hc - 1)
        rows = min(h, (i1 + 1) * cell) - i * cell
        for j in range(max(1, wc - 1)):
            j1 = min(j + 1, wc - 1)
            limit = coherence * rows * (min(w, (j1 + 1) * cell) - j * cell)
            for ch in range(c):
                s = sums[ch, i, j]
                if i1 != i:
                    s += sums[ch, i1, j]
                if j1 != j:
                    s += sums[ch, i, j1]
                    if i1 != i:
                        s += sums[ch, i1, j1]
                if abs(s) > limit:
                    ok[i, j] = ok[i1, j] = ok[i, j1] = ok[i1, j1] = True
                    break


@jit
def _input_delta_coherent_nb(x, a, h, w, floor, coherence, cell, scratch, sums, ok):  # pragma: no cover
    """As `_input_delta_nb`, forwarding only the pixels over `floor` that lie in a coherent cell
    (`_coherent_cells_nb`). The cells' sums take a second pass, over the bands of cell rows around the pixels over
    the floor only.
    x, a: (N, C, H*W) float32; sums (C, Hc, Wc) float64 and ok (Hc, Wc) bool work arrays."""
    n, c, p = x.shape
    bands = np.empty(sums.shape[1], np.bool_)
    cnt = 0
    for b in range(n):
        start = cnt
        xb, ab = x[b], a[b]
        cnt = _list_over_floor_nb(xb, ab, floor, scratch, cnt, b * p)
        if cnt == start:
            continue
        bands[:] = False  # the bands of cell rows a window holding a pixel over the floor covers
        for k in range(start, cnt):
            cy = (scratch[k] - b * p) // w // cell
            bands[max(0, cy - 1):cy + 2] = True
        _cell_sums_nb(xb, ab, h, w, cell, bands, sums)
        _coherent_cells_nb(sums, h, w, cell, coherence, ok)
        kept = start
        for k in range(start, cnt):
            q = scratch[k] - b * p
            if ok[(q // w) // cell, (q % w) // cell]:
                scratch[kept] = scratch[k]
                kept += 1
        cnt = kept
    return _take_and_apply_nb(x, a, scratch, cnt)


COHERENCE_CELL = 4  # pixels: coherence windows are 2 x 2 cells (8 x 8 pixels), on a grid of 4
COHERENT_IDLE_CAP = 0.03  # InputMirror.unchanged: more pixels over the floor than this share is a busy frame
# Coherence applies only where the input floor is at least this share of it: under a low floor (e.g. 3-6 grey
# levels: YOLOX-Nano's before session 26 raised it to its first filter's behind the Focus slices) most pixels are
# over it, the held ones are tested again every frame (person video, 300 frames, all units delta: +10 ms per frame
# in the input pass, mAP 0.88 -> 0.72)
COHERENCE_MIN_FLOOR = 0.75


def effective_coherence(floor: float, coherence: float) -> float:
    """The coherence an input floor takes (same units): `coherence` when floor >= COHERENCE_MIN_FLOOR x it, else 0."""
    return coherence if coherence > 0.0 and floor >= COHERENCE_MIN_FLOOR * coherence else 0.0


def coherent_mask(d: torch.Tensor, coherence: float, cell: int = COHERENCE_CELL) -> torch.Tensor:
    """(N, H, W) bool: the pixels of a change d (N, C, H, W) lying in a window of 2 x 2 cells (cell x cell pixels,
    windows on the cells' grid, clipped at the border) whose mean change exceeds `coherence` in some channel.
    Codec noise (a keyframe's requantisation: independent signs, block by block) averages out over such a window;
    a moving object's change does not. Vectorised torch; the reference of the compiled kernel."""
    n, c, h, w = d.shape
    hc, wc = -(-h // cell), -(-w // cell)
    pad = (0, wc * cell - w, 0, hc * cell - h)
    sums = F.pad(d.double(), pad).reshape(n, c, hc, cell, wc, cell).sum((3, 5))
    counts = F.pad(torch.ones(1, 1, h, w, dtype=torch.float64), pad).reshape(1, 1, hc, cell, wc, cell).sum((3, 5))

    def pairs(t: torch.Tensor, dim: int) -> torch.Tensor:  # windows of 2 cells along dim (one cell if only one)
        size = t.shape[dim]
        if size == 1:
            return t
        return t.narrow(dim, 0, size - 1) + t.narrow(dim, 1, size - 1)

    win = pairs(pairs(sums, 2), 3)
    hit = (win.abs() > coherence * pairs(pairs(counts, 2), 3)).any(1)  # (N, Hw, Ww)
    ok = torch.zeros(n, hc, wc, dtype=torch.bool)
    hw, ww = hit.shape[1], hit.shape[2]
    for di in (0, 1):
        for dj in (0, 1):
            i1, j1 = min(hc, di + hw), min(wc, dj + ww)
            ok[:, di:i1, dj:j1] |= hit[:, : i1 - di, : j1 - dj]
    return ok.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :h, :w]


def input_delta(x: torch.Tensor, applied: torch.Tensor, floor: float, coherence: float = 0.0
                ) -> PixelDelta | None:
    """PixelDelta of x (N, C, H, W) against `applied` (updated in place at the forwarded pixels); None if none.

    The floor compares in x's dtype (as `tensor > floor` does in torch). coherence > 0 (input units) forwards only
    the pixels over the floor that lie in a coherent window (`coherent_mask`); the rest wait, as under the floor."""
    n, c, h, w = x.shape
    if (HAVE_NUMBA and x.dtype == torch.float32 and applied.dtype == torch.float32 and c > 0
            and x.is_contiguous() and applied.is_contiguous()):
        xs, As = x.detach().numpy().reshape(n, c, h * w), applied.numpy().reshape(n, c, h * w)
        if coherence > 0.0:
            hc, wc = -(-h // COHERENCE_CELL), -(-w // COHERENCE_CELL)
            idx, vals = _input_delta_coherent_nb(xs, As, h, w, np.float32(floor), float(coherence), COHERENCE_CELL,
                                                 index_scratch(n * h * w), work_array((c, hc, wc), np.float64),
                                                 work_array((hc, wc), np.bool_))
        else:
            idx, vals = _input_delta_nb(xs, As, np.float32(floor), index_scratch(n * h * w))
        if idx.shape[0] == 0:
            return None
        return PixelDelta(idx, vals, (n, c, h, w))
    d = x - applied
    mask = d.abs().amax(1) > floor  # (N, H, W)
    if coherence > 0.0:
        mask &= coherent_mask(d, coherence)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    if n == 1:
        vals = d.view(c, h * w).index_select(1, idx).t().contiguous()
        applied.view(c, h * w).index_copy_(1, idx, x.reshape(c, h * w).index_select(1, idx))
    else:
        vals = d.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        flat = applied.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a copy for NCHW: write back below
        flat.index_copy_(0, idx, rows)
        applied.copy_(flat.view(n, h, w, c).permute(0, 3, 1, 2))
    return PixelDelta(idx, vals, (n, c, h, w))


@jit
def _max_absdiff_over_nb(u, a, limit):  # pragma: no cover - compiled
    """Whether some |u - a| (uint8 (h, w*c) rows) exceeds `limit`; stops at the first row that has one."""
    h, w = u.shape
    for i in range(h):
        m = 0
        for j in range(w):
            d = abs(np.int16(u[i, j]) - np.int16(a[i, j]))
            m = max(m, d)
        if m > limit:
            return True
    return False


@jit
def _coherent_change_nb(u, a, limit, coherence, top, left, canvas_h, canvas_w, cell, cap, scratch
                        ):  # pragma: no cover - compiled
    """Whether some pixel of the uint8 image u (h, w, c) changed by more than `limit` against a in a coherent cell
    of the canvas (the image at (top, left) of a canvas_h x canvas_w canvas whose padding never changes): a cell
    some window of 2 x 2 cells holding it has a mean change above `coherence` grey levels in
    (`_coherent_cells_nb` on the canvas, its sums exact integers). More than `cap` pixels over `limit`: True
    at once (a busy frame is not idle: this check is for codec noise). scratch: (h * w,) int64 work."""
    h, w, c = u.shape
    hc, wc = -(-canvas_h // cell), -(-canvas_w // cell)
    u2, a2 = u.reshape(h, w * c), a.reshape(h, w * c)  # rows of interleaved channels
    bands = np.zeros(hc, np.bool_)
    cnt = 0
    for y in range(h):
        uy, ay = u2[y], a2[y]
        over = False
        for j in range(w * c):
            if abs(np.int16(uy[j]) - np.int16(ay[j])) > limit:
                over = True
                break
        if not over:
            continue
        for x in range(w):
            m = 0
            for ch in range(c):
                m = max(m, abs(np.int16(uy[x * c + ch]) - np.int16(ay[x * c + ch])))
            if m > limit:
                if cnt == cap:
                    return True
                scratch[cnt] = y * w + x
                cnt += 1
        cy = (y + top) // cell
        bands[max(0, cy - 1):cy + 2] = True
    if cnt == 0:
        return False
    sums = np.zeros((c, hc, wc), np.float64)
    col = np.empty(w * c, np.int32)
    for cy in range(hc):
        if not bands[cy]:
            continue
        col[:] = 0
        for y in range(max(0, cy * cell - top), min(h, (cy + 1) * cell - top)):
            uy, ay = u2[y], a2[y]
            for j in range(w * c):
                col[j] += np.int32(uy[j]) - np.int32(ay[j])
        for x in range(w):
            cx = (x + left) // cell
            for ch in range(c):
                sums[ch, cy, cx] += col[x * c + ch]
    ok = np.empty((hc, wc), np.bool_)
    _coherent_cells_nb(sums, canvas_h, canvas_w, cell, coherence, ok)
    for k in range(cnt):
        y, x = scratch[k] // w, scratch[k] % w
        if ok[(y + top) // cell, (x + left) // cell]:
            return True
    return False


@jit
def _change_histogram_nb(u, a, step, hist):  # pragma: no cover - compiled
    """hist[v] = number of sampled pixels (every `step`-th row and column) whose largest channel change |u - a| is
    v grey levels (uint8 (H, W, C) images)."""
    hist[:] = 0
    h, w, c = u.shape
    for i in range(0, h, step):
        for j in range(0, w, step):
            m = 0
            for k in range(c):
                m = max(m, abs(np.int16(u[i, j, k]) - np.int16(a[i, j, k])))
            hist[m] += 1


@jit
def _mirror_update_nb(a, u, idx, top, left, canvas_w, canvas_hw):  # pragma: no cover - compiled
    """a[y, x] = u[y, x] at the image pixels of canvas pixel indices idx (batch 1; pad pixels skipped)."""
    h, w = a.shape[0], a.shape[1]
    for k in range(idx.shape[0]):
        q = idx[k] % canvas_hw
        y = q // canvas_w - top
        x = q % canvas_w - left
        if 0 <= y < h and 0 <= x < w:
            a[y, x, :] = u[y, x, :]


class InputMirror:
    """uint8 copy of the input the delta network has applied so far, over the image a detector's `fit` places on the
    canvas (batch 1): finds frames that change no pixel beyond the input floor without building the float input.

    `unchanged(img, floor_grey, coherence_grey)` is conservative: True only if every |img - mirror| <=
    `margin(floor_grey)` grey levels, under the input floor by at least half a grey level (0 when the floor is 0:
    only an identical image), or (coherence_grey > 0) no pixel over that lies in a coherent cell, so the float
    comparison of `input_delta` would forward nothing either. Keep it in step: `seeded(img)` after a
    dense frame (the network applied the whole input), `applied(img, index)` after a delta frame (index: the
    forwarded canvas pixels, `PixelDelta.index_np` of the input delta), `invalidate()` when the network's input state
    is unknown, or `previous(img)` after a frame the dense engine ran: the image is then only the reference of
    `typical_change` (the next frame's change against this one), not an applied input.
    """

    def __init__(self, top: int, left: int, canvas_hw: tuple[int, int]) -> None:
        self.top, self.left = top, left
        self.canvas_hw = canvas_hw
        self.image: np.ndarray | None = None
        self.is_applied = False  # `image` is the network's applied input (not only the previous frame)
        self._held = False  # `image` holds a frame (`forget` drops it and keeps the buffer)
        self._hist = np.zeros(256, np.int64)  # typical_change's histogram of the last image compared
        self._hist_fresh = False  # that histogram compares the current reference image with the last one given

    @staticmethod
    def margin(floor_grey: float) -> int:
        """Largest whole change in grey levels surely at or under an input floor of `floor_grey` grey levels."""
        return max(0, math.ceil(floor_grey - 0.5) - 1)

    def _comparable(self, img: np.ndarray) -> bool:
        """Whether the kernels can compare `img` with the mirror (one is held, same shape, uint8)."""
        a = self.image
        return a is not None and self._held and a.shape == img.shape and img.dtype == np.uint8 and HAVE_NUMBA

    def unchanged(self, img: np.ndarray, floor_grey: float, coherence_grey: float = 0.0) -> bool:
        if not self.is_applied or not self._comparable(img):
            return False
        a = self.image
        h = img.shape[0]
        limit = self.margin(floor_grey)
        img = np.ascontiguousarray(img)
        if not _max_absdiff_over_nb(img.reshape(h, -1), a.reshape(h, -1), limit):
            return True
        if coherence_grey <= 0.0 or img.ndim != 3:
            return False
        # pixels over the floor: unchanged still when none lies in a coherent cell (the float test's coherence,
        # 0.1% lower: its float sums' rounding can only make it forward less than the integer sums show)
        ch, cw = self.canvas_hw
        npix = img.shape[0] * img.shape[1]
        return not _coherent_change_nb(img, a, limit, coherence_grey * (1 - 1e-3), self.top, self.left, ch, cw,
                                       COHERENCE_CELL, int(COHERENT_IDLE_CAP * npix), index_scratch(npix))

    def typical_change(self, img: np.ndarray, step: int = 4) -> int | None:
        """Median over the image's pixels (every `step`-th row and column: ~0.1 ms at 768x432) of the largest
        channel change |img - mirror| in grey levels, or None when there is no mirror to compare with."""
        if not self._comparable(img) or img.ndim != 3:
            return None
        hist = self._hist
        _change_histogram_nb(img, self.image, step, hist)
        self._hist_fresh = step == 4
        cum = np.cumsum(hist)
        return int(np.searchsorted(cum, (cum[-1] + 1) // 2))

    def activity(self, floor_grey: float) -> float | None:
        """After `typical_change(img)` against a `previous` frame (a stay on the dense engine): the guard's input
        activity of img from the same histogram (`plan.guard.activity` on the canvas: the share of pixels sampled
        every 4th row and column whose largest channel change exceeds `floor_grey`, the canvas's never-changing
        padding counted as unchanged), without a pass of its own; None otherwise."""
        if not self._hist_fresh or self.is_applied or self.image is None:
            return None
        ch, cw = self.canvas_hw
        above = int(self._hist[int(math.floor(floor_grey)) + 1:].sum())
        return above / (-(-ch // 4) * -(-cw // 4)) if above else 0.0

    def change_shares(self, floors_grey: tuple[float, ...]) -> list[float] | None:
        """`activity` at each of `floors_grey` from the same histogram; None when `activity` is."""
        shares = [self.activity(f) for f in floors_grey]
        return None if None in shares else shares  # type: ignore[return-value]

    def seeded(self, img: np.ndarray) -> None:
        a = self.image
        if img.dtype != np.uint8:
            self.image = None
        elif a is not None and a.shape == img.shape:
            np.copyto(a, img)  # into the buffer held: a new 1 MB array per frame costs its page faults (~0.1 ms)
        else:
            self.image = np.array(img, dtype=np.uint8, copy=True)
        self.is_applied = self._held = self.image is not None
        self._hist_fresh = False

    def previous(self, img: np.ndarray, owned: bool = False) -> None:
        """The dense engine ran `img`: keep it as the reference of `typical_change` only, a copy (~0.2 ms) unless
        `owned` (nobody else holds or writes it: e.g. `fit`'s resized image, not the caller's frame)."""
        if owned and img.dtype == np.uint8:
            self.image = img  # (the next `seeded` copies into it)
            self._held = True
        else:
            self.seeded(img)
        self.is_applied = False
        self._hist_fresh = False

    def applied(self, img: np.ndarray, index: np.ndarray | None) -> None:
        a = self.image
        self._hist_fresh = False
        if a is None or a.shape != img.shape or not self.is_applied:
            self.invalidate()
            return
        if index is not None and index.shape[0]:
            _mirror_update_nb(a, np.ascontiguousarray(img), index, self.top, self.left, self.canvas_hw[1],
                              self.canvas_hw[0] * self.canvas_hw[1])

    def forget(self) -> None:
        """Nothing will be compared with the mirror's image (a stay on the dense engine that measures no frame):
        drop it, keeping its buffer (the next `seeded` or `previous` copies into it)."""
        self.is_applied = self._hist_fresh = False
        self._held = False

    def invalidate(self) -> None:
        self.image = None
        self.is_applied = self._hist_fresh = False


def warm_up_mirror() -> None:
    """Load InputMirror's compiled kernels on a tiny image (each costs 5-25 ms on its first call in a process, and
    the coherent idle check's first call was paid by a real frame): a seed, a change of 4 pixels (under the
    coherence, so the whole coherent check runs), the change histogram and an update."""
    if not HAVE_NUMBA:
        return
    img = np.random.default_rng(0).integers(0, 200, (16, 16, 3), dtype=np.uint8)
    mirror = InputMirror(0, 0, (16, 16))
    mirror.seeded(img)
    changed = img.copy()
    changed[:2, :2] += 40
    mirror.unchanged(changed, 3.0, 5.0)
    mirror.typical_change(changed)
    mirror.applied(changed, np.arange(4, dtype=np.int64))
