"""Filters: hold back the smallest deltas in a residual, forward the rest (DESIGN.md "Delta operator unit").

State per filter: residual r (4-D inputs: channels-last rows (N*H*W, C); other inputs: the flat tensor) and the
per-pixel magnitude m = max over channels of |r| (0 = nothing pending there). Per frame: a = r + incoming delta
(only touched pixels change); among the granules with non-zero a, forward the largest (100 - filter_pct)% and never
one whose magnitude is <= noise_floor; the rest stays in r. With FilterConfig.percent_of "positions" the
percentage is of all granules: the largest (100 - filter_pct)% of them, every candidate while fewer changed.
Granularity (FilterConfig.granularity): "element" (every value), "pixel" (all channels of one position; the
default), "tile" (T x T pixels). The threshold is the k-th smallest candidate magnitude (`torch.kthvalue`, a
selection, no sort). Nothing is ever dropped: r_before + Δ = r_after + forwarded. With filter_pct = 0 and
noise_floor = 0 and nothing pending, the incoming delta passes through untouched.
"""

from __future__ import annotations

from typing import Any

import torch

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, FilterConfig, LazyValue, pixels_from_dense, to_dense
from deluceva.delta.pixels import PixelDelta


def select_forward(mags: torch.Tensor, pct: float, noise_floor: float, total: int | None = None,
                   count_floor: int = 0) -> torch.Tensor:
    """bool mask over candidate magnitudes (all > 0): the largest (100 - pct)% and > noise_floor. total: the
    percentage is of that many granules (all positions; the candidates are some of them), not of the candidates;
    count_floor: without total, the percentage is of at least that many (see `held_count`)."""
    n = mags.numel()
    hold = held_count(pct, n, total, count_floor)
    if hold <= 0:
        keep = torch.ones(n, dtype=torch.bool)
    elif hold >= n:
        keep = torch.zeros(n, dtype=torch.bool)
    else:
        thr = torch.kthvalue(mags, hold).values
        keep = mags > thr
        need = (n - hold) - int(keep.sum())
        if need > 0:  # ties at the threshold (quantised inputs): forward just enough of them, in index order
            keep[(mags == thr).nonzero().squeeze(1)[:need]] = True
    if noise_floor > 0:
        keep &= mags > noise_floor
    return keep


def held_count(pct: float, n: int, total: int | None = None, count_floor: int = 0) -> int:
    """How many of n candidates `select_forward` holds back by the percentage alone (of n, or of `total`
    granules: then n minus the (100 - pct)% of total it forwards, at least 0). count_floor: without total, a
    percentage of max(n, count_floor) (FilterConfig.count_smoothing's average count)."""
    p = min(100.0, max(0.0, pct)) / 100.0
    if total is None and count_floor > n:
        total = count_floor
    if total is None:
        return int(round(p * n))
    return max(0, n - int(round((1.0 - p) * total)))


def holds_all(pct: float, n: int, total: int | None = None, count_floor: int = 0) -> bool:
    """Whether `select_forward` at `pct` holds back every one of n candidates (by the percentage alone)."""
    return held_count(pct, n, total, count_floor) >= n


class _Stats:
    candidates = 0  # granules with a non-zero accumulated delta this frame
    count_ref = 0.0  # average candidate count over earlier calls (FilterConfig.count_smoothing)
    seed_floor = 0.0  # the percentage is of at least this many candidates: count_ref at the last seed, decaying
    forwarded = 0  # granules forwarded
    granules = 1  # granules in the tensor
    pending = False
    held_max = float("inf")  # largest magnitude the last call held back (inf: not tracked)
    config: FilterConfig

    def quiet(self) -> bool:
        """Whether a call without new delta would forward nothing and change nothing: nothing pending, the
        percentage holds back every pending granule (the granules left after the last call), or every pending
        granule is at or under the floor."""
        return (not self.pending or holds_all(self.config.filter_pct, self.candidates - self.forwarded, self._total(),
                                              self._count_floor())
                or self.held_max <= self._floor())

    def _floor(self) -> float:
        """Magnitudes at or under it are never forwarded."""
        return self.config.noise_floor

    @property
    def floor(self) -> float:
        """Magnitudes at or under it are never forwarded (this frame's config; fixed between seeds)."""
        return self._floor()

    @property
    def _of_positions(self) -> bool:
        """Whether filter_pct is a percentage of all granules (FilterConfig.percent_of), not of the candidates."""
        return self.config.percent_of == "positions"

    def _total(self) -> int | None:
        """The granule count the percentage is of, None: of the candidates."""
        return self.granules if self._of_positions else None

    def _count_floor(self) -> int:
        """With a percentage of the candidates: it is of at least this many (the average count before the last
        re-seed, decaying; see FilterConfig.count_smoothing)."""
        return int(self.seed_floor)

    def _carry_count(self) -> None:
        """At a seed: the percentage is of at least the average candidate count so far, decaying from now."""
        self.seed_floor = self.count_ref

    def __call__(self, d: Delta) -> Delta:
        """The forwarded part of the incoming delta d plus what was held (None: nothing forwarded); updates the
        average candidate count and decays the count floor."""
        out = self._filter(d)
        a = self.config.count_smoothing
        if a > 0.0:
            self.count_ref += a * (self.candidates - self.count_ref)
            self.seed_floor *= 1.0 - a
        return out

    def skip(self) -> None:
        """Stand for a call without new delta when `quiet()`: the pending granules stay candidates, none forwarded."""
        self.candidates = self.candidates - self.forwarded if self.pending else 0
        self.forwarded = 0

    @property
    def held_back(self) -> float:
        """Fraction of candidate granules held back this frame."""
        return (self.candidates - self.forwarded) / self.candidates if self.candidates else 0.0

    @property
    def forwarded_fraction(self) -> float:
        """Fraction of candidate granules forwarded this frame."""
        return self.forwarded / self.candidates if self.candidates else 0.0


class PixelFilter(_Stats):
    """Filter for a 4-D input flowing as PixelDelta (granularity element / pixel / tile).

    Floor (magnitudes <= it never forwarded): max(noise_floor, relative_floor * scale), scale: the std of the input
    at the stream's first seed (re-seeds of the same shape keep it: the floors do not jump between seeding cycles,
    and a re-seed needs no input value, see deluceva.delta.base.LazyValue; `DeltaNetwork` clears it on `reset` and
    every RESCALE_FRAMES frames).
    """

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.pending = False
        self.scale: float | None = None
        self.shape: tuple[int, ...] | None = None
        self._held_as = config.granularity  # the granularity of the last selection (what `candidates` counts)

    def _floor(self) -> float:
        cfg = self.config
        return max(cfg.noise_floor, cfg.relative_floor * self.scale)

    def seed(self, x: torch.Tensor | LazyValue) -> None:
        """Seed on the input's full value x (a LazyValue is computed only when the scale is measured)."""
        n, c, h, w = x.shape
        same = self.shape == (n, c, h, w) and self.dtype == x.dtype
        keep_scale = same and self.scale is not None
        kf = getattr(self, "_kf", None)
        if kf and same:
            # a re-seed of the same tensor: keep the buffers and the kernel, clear only what is held (the kernel's
            # candidate list); rebuilding them costs a full zeroing and scan of r and m in the next delta frame
            kf.reset()
        else:
            self._r: torch.Tensor | None = None  # allocated on first use: at 0% with nothing pending never needed
            self._m: torch.Tensor | None = None
            self._kf: Any = None  # the kernel pixel filter sharing r and m (None: not built yet; False: unavailable)
            self.tile_id: torch.Tensor | None = None
        self.shape = (n, c, h, w)
        self.dtype = x.dtype
        if not keep_scale:  # measured once per stream (DeltaNetwork.RESCALE_FRAMES): the full std, ~15 ms per
            # YOLOv5n seed at 768x448 (a sample's estimate depends on the memory layout and is ~10% off)
            self.scale = float((x.get() if type(x) is LazyValue else x).std())
        self._carry_count()
        self.pending = False
        self.held_max = 0.0

    @property
    def r(self) -> torch.Tensor:
        """Residual rows (N*H*W, C)."""
        if self._r is None:
            n, c, h, w = self.shape
            self._r = torch.zeros(n * h * w, c, dtype=self.dtype)
        return self._r

    @r.setter
    def r(self, value: torch.Tensor) -> None:
        self._r = value

    @property
    def m(self) -> torch.Tensor:
        """Per-pixel magnitude max_c |r| (N*H*W,)."""
        if self._m is None:
            n, _, h, w = self.shape
            self._m = torch.zeros(n * h * w, dtype=self.dtype)
        return self._m

    @m.setter
    def m(self, value: torch.Tensor) -> None:
        self._m = value

    def _tiles(self) -> torch.Tensor:
        t = max(1, int(self.config.tile))
        if self.tile_id is None or self._tile != t:
            n, _, h, w = self.shape
            self._tile = t
            th, tw = -(-h // t), -(-w // t)
            ys = torch.arange(h).div(t, rounding_mode="floor").view(1, h, 1)
            xs = torch.arange(w).div(t, rounding_mode="floor").view(1, 1, w)
            ns = torch.arange(n).view(n, 1, 1)
            self.tile_id = (ns * (th * tw) + ys * tw + xs).reshape(-1)
            self.num_tiles = n * th * tw
        return self.tile_id

    def quiet(self) -> bool:
        if not self.pending:
            return True
        if self.config.granularity != self._held_as:  # granules counted differently: run the filter
            return False
        if self._kf:  # the kernel forwards round((100 - pct)% of its candidates), rounding halves up
            n = self._kf.num_candidates
            keep = min(1.0, max(0.0, (100.0 - self.config.filter_pct) / 100.0))
            total = self._total()  # the kernel set granules = m.numel() when it ran
            basis = max(n, self._count_floor()) if total is None else total
            return min(n, int(keep * basis + 0.5)) == 0 or self.held_max <= self._floor()
        return super().quiet()

    def skip(self) -> None:
        if self.pending and self._kf:
            self.candidates, self.forwarded = self._kf.num_candidates, 0
        else:
            super().skip()

    def _kernel(self) -> Any:
        if self._kf is None:
            self._kf = kernels_bridge.pixel_filter(self.r, self.m, self.shape) or False
            if self._kf:
                self._kf.reuse_output = True  # the unit behind consumes the forwarded delta within the frame
        return self._kf or None

    def _filter(self, d: Delta) -> PixelDelta | None:
        cfg = self.config
        if d is None and not self.pending:
            self.candidates = self.forwarded = 0
            return None
        pct = cfg.filter_pct
        floor = max(cfg.noise_floor, cfg.relative_floor * self.scale)  # self._floor(), inlined: once per unit
        if pct <= 0.0 and floor <= 0.0 and not self.pending:
            if not isinstance(d, PixelDelta):
                d = pixels_from_dense(d)
            self.granules = d.num_pixels
            self.candidates = self.forwarded = d.active
            return d if d.active else None
        gran = self._held_as = cfg.granularity
        if gran == "pixel":
            kf = self._kf
            if kf is None:
                kf = self._kernel()
            if kf:
                return self._kernel_select(kf, d, pct, floor)
        self._kf = None  # the torch paths below change r and m behind the kernel's candidate list
        if d is not None:
            if not isinstance(d, PixelDelta):
                d = pixels_from_dense(d)
            rows = self.r.index_select(0, d.index) + d.values
            self.r.index_copy_(0, d.index, rows)
            self.m.index_copy_(0, d.index, rows.abs().amax(1))
        cand = self.m.nonzero().squeeze(1)
        gran = cfg.granularity
        if gran == "element":
            out = self._select_elements(cand, pct, floor)
        elif gran == "tile":
            out = self._select_tiles(cand, pct, floor)
        else:
            self.granules = self.m.numel()
            mags = self.m.index_select(0, cand)
            keep = select_forward(mags, pct, floor, self._total(), self._count_floor())
            self.held_max = float(mags[~keep].max()) if bool((~keep).any()) else 0.0
            fwd = cand[keep]
            self.candidates, self.forwarded = int(cand.numel()), int(fwd.numel())
            out = self._emit(fwd)
        return out

    def _kernel_select(self, kf: Any, d: Delta, pct: float, floor: float) -> PixelDelta | None:
        if d is not None and not isinstance(d, PixelDelta):
            d = pixels_from_dense(d)
        out = kf(d, pct, floor, self.config.percent_of == "positions", self._count_floor())
        self.held_max = kf.held_max
        remaining = kf.num_candidates
        self.granules = kf.pixels
        n = out.active
        self.forwarded = n
        self.candidates = n + remaining
        self.pending = remaining > 0
        return out if n else None

    def _emit(self, fwd: torch.Tensor) -> PixelDelta | None:
        """Forward whole rows `fwd` (sorted) and clear them."""
        self.pending = self.forwarded < self.candidates
        if fwd.numel() == 0:
            return None
        vals = self.r.index_select(0, fwd)
        self.r.index_fill_(0, fwd, 0.0)
        self.m.index_fill_(0, fwd, 0.0)
        return PixelDelta(fwd, vals, self.shape)

    def _select_tiles(self, cand: torch.Tensor, pct: float, floor: float) -> PixelDelta | None:
        self.held_max = float("inf")  # not tracked for tiles
        tid = self._tiles().index_select(0, cand)
        tmag = torch.zeros(self.num_tiles, dtype=self.m.dtype)
        tmag.scatter_reduce_(0, tid, self.m.index_select(0, cand), "amax", include_self=True)
        tiles = tmag.nonzero().squeeze(1)
        self.granules = self.num_tiles
        keep = select_forward(tmag.index_select(0, tiles), pct, floor, self._total(), self._count_floor())
        keep_tile = torch.zeros(self.num_tiles, dtype=torch.bool)
        keep_tile[tiles[keep]] = True
        fwd = cand[keep_tile.index_select(0, tid)]
        self.candidates, self.forwarded = int(tiles.numel()), int(keep.sum())
        out = self._emit(fwd)
        self.pending = bool(self.m.any()) if self.forwarded < self.candidates else False
        return out

    def _select_elements(self, cand: torch.Tensor, pct: float, floor: float) -> PixelDelta | None:
        self.held_max = float("inf")  # not tracked for elements
        rows = self.r.index_select(0, cand)
        mag = rows.abs()
        nz = mag > 0
        self.granules = self.r.numel()
        keep_nz = select_forward(mag[nz], pct, floor, self._total(), self._count_floor())
        keep = torch.zeros_like(nz)
        keep[nz] = keep_nz
        self.candidates, self.forwarded = int(keep_nz.numel()), int(keep_nz.sum())
        fwd_row = keep.any(1)
        fwd = cand[fwd_row]
        kept = keep[fwd_row]
        vals = rows[fwd_row] * kept
        rest = rows * ~keep
        self.r.index_copy_(0, cand, rest)
        self.m.index_copy_(0, cand, rest.abs().amax(1))
        self.pending = self.forwarded < self.candidates
        return PixelDelta(fwd, vals, self.shape) if fwd.numel() else None


class DenseFilter(_Stats):
    """Element-granularity filter for non-4-D inputs flowing as dense delta tensors (e.g. a linear head's input)."""

    def __init__(self, config: FilterConfig) -> None:
        self.config = config
        self.pending = False

    def seed(self, x: torch.Tensor | LazyValue) -> None:
        """Seed on the input's full value x (only its shape and dtype are read)."""
        self.r = torch.zeros(x.shape, dtype=x.dtype)
        self.granules = x.numel()
        self.pending = False
        self._carry_count()

    def _filter(self, d: Delta) -> torch.Tensor | None:
        cfg = self.config
        if d is None and not self.pending:
            self.candidates = self.forwarded = 0
            return None
        if cfg.exact and not self.pending:
            self.candidates = self.forwarded = 0 if d is None else int(torch.count_nonzero(d))
            return d
        if d is not None:
            self.r = self.r + to_dense(d, self.r.shape, self.r.dtype)
        flat = self.r.reshape(-1)
        cand = flat.nonzero().squeeze(1)
        keep = select_forward(flat.index_select(0, cand).abs(), cfg.filter_pct, cfg.noise_floor, self._total(),
                              self._count_floor())
        fwd = cand[keep]
        self.candidates, self.forwarded = int(cand.numel()), int(fwd.numel())
        self.pending = self.forwarded < self.candidates
        if fwd.numel() == 0:
            return None
        out = torch.zeros_like(flat)
        out[fwd] = flat[fwd]
        flat[fwd] = 0
        return out.view(self.r.shape)


def make_filter(shape: tuple[int, ...] | None, config: FilterConfig) -> PixelFilter | DenseFilter:
    """The filter kind for an input of `shape` (4-D -> PixelFilter)."""
    return PixelFilter(config) if shape is not None and len(shape) == 4 else DenseFilter(config)
