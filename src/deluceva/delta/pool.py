"""Pooling units: average (linear), global average (sparse), max (recompute the affected windows).

- avg_pool2d: a depthwise conv with weights 1/(kh·kw) (the sparse conv op) when it is one (no ceil_mode, padding
  counted); otherwise, and for adaptive_avg_pool2d to other sizes: Δy = pool(Δx) (`LinearOpUnit`).
- adaptive_avg_pool2d to 1x1 and mean over (H, W): Δy[n] = Σ_active Δx / (H·W), an index_add over active pixels.
- max_pool2d: state = full input rows (plus one -inf row for padding) and output rows; the affected output pixels of
  the active input pixels are recomputed from their windows (gather + amax); above `DENSE_ABOVE` active fraction the
  whole map is pooled densely instead. Δy = y_new - y_old there. The fused kernel (kernels.pool) is used when present.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, Env, Unit, given, pixels_from_dense, to_pixels
from deluceva.delta.conv import make_conv_op
from deluceva.delta.linop import LinearOpUnit
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, methods, register
from deluceva.delta.state import rows_of

DENSE_ABOVE = 0.3  # active input fraction above which max-pool recomputes the whole map
USE_KERNEL_WITH_WIDE_STATE = True  # the fused float32 kernel also when state is float64 (its x rows are float32)


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _first_only_4d(node: fx.Node, ctx: BuildContext) -> bool:
    var = ctx.var_nodes(node)
    return len(var) == 1 and node.args[:1] == (var[0],) and len(ctx.shape(var[0]) or ()) == 4


class GlobalAvgUnit(Unit):
    """Spatial mean of a 4-D tensor (output (N, C, 1, 1) or (N, C)): Δy[n] = Σ over active pixels of n / (H·W)."""

    kind = "global_avg"

    def seed(self, env: Env) -> Any:
        out = self.run(*self.materialize(env))
        x = env(self.var_nodes[0])
        self.n, self.c, self.h, self.w = x.shape
        self.out_shape = tuple(out.shape)
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        hw = self.h * self.w
        batch = d.index.div(hw, rounding_mode="floor")
        s = d.values.new_zeros(self.n, self.c).index_add_(0, batch, d.values) / hw
        if len(self.out_shape) == 4:
            return PixelDelta(torch.arange(self.n), s, self.out_shape)  # type: ignore[arg-type]
        return s.view(self.out_shape)


def _adaptive_global(node: fx.Node, ctx: BuildContext) -> bool:
    if not _first_only_4d(node, ctx):
        return False
    size = node.kwargs.get("output_size", node.args[1] if len(node.args) > 1 else None)
    return size in (1, (1, 1), [1, 1])


def _spatial_mean(node: fx.Node, ctx: BuildContext) -> bool:
    if not _first_only_4d(node, ctx) or "dtype" in node.kwargs:
        return False
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if not isinstance(dim, tuple | list) or len(dim) != 2:
        return False
    return sorted(int(v) % 4 for v in dim) == [2, 3]


@register(*functions(F.adaptive_avg_pool2d), accepts=_adaptive_global)
@register(*functions(torch.mean), *methods("mean"), accepts=_spatial_mean)
def _global_avg(node: fx.Node, ctx: BuildContext) -> Unit:
    return GlobalAvgUnit(node, ctx.var_nodes(node))


class AvgPoolUnit(Unit):
    """avg_pool2d as a depthwise conv with weights 1/(kh·kw) (zero padding counted): the sparse conv op."""

    kind = "avg_pool"

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        out = self.run(args, kwargs)
        x = args[0]
        p = _avg_params(args, kwargs)
        k = _pair(p["kernel_size"])
        weight = torch.full((x.shape[1], 1, *k), 1.0 / (k[0] * k[1]), dtype=x.dtype)
        self.op = make_conv_op(weight, tuple(x.shape), tuple(out.shape), p["stride"], p["padding"], 1, x.shape[1])
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        out = self.op(d)
        return out if out.active else None


def _avg_params(args: tuple, kwargs: dict) -> dict[str, Any]:
    names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
    p = {"stride": None, "padding": 0, "ceil_mode": False, "count_include_pad": True, "divisor_override": None,
         **dict(zip(names, args, strict=False)), **kwargs}  # fmt: skip
    if p["stride"] in (None, (), []):
        p["stride"] = p["kernel_size"]
    return p


def _avg_as_conv(node: fx.Node, ctx: BuildContext) -> bool:
    """avg_pool2d equal to a conv: no ceil_mode, zeros counted (or no padding), no divisor override."""
    if not _first_only_4d(node, ctx) or any(isinstance(a, fx.Node) for a in node.args[1:]):
        return False
    p = _avg_params(node.args, dict(node.kwargs))
    pad = _pair(p["padding"])
    return not p["ceil_mode"] and p["divisor_override"] is None and (p["count_include_pad"] or pad == (0, 0))


@register(*functions(F.avg_pool2d), accepts=_avg_as_conv)
def _avg_pool_conv(node: fx.Node, ctx: BuildContext) -> Unit:
    return AvgPoolUnit(node, ctx.var_nodes(node))


@register(*functions(F.avg_pool2d, F.adaptive_avg_pool2d, F.lp_pool2d), accepts=_first_only_4d)
def _avg_pool(node: fx.Node, ctx: BuildContext) -> Unit:
    return LinearOpUnit(node, ctx.var_nodes(node))


class MaxPoolUnit(Unit):
    """max_pool2d: recompute the outputs whose windows contain an active input pixel."""

    kind = "max_pool"

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
        p = {"stride": None, "padding": 0, "dilation": 1, **dict(zip(names, args, strict=False)), **kwargs}
        k = _pair(p["kernel_size"])
        s = _pair(p["stride"] if p["stride"] not in (None, (), []) else k)
        self.k, self.s, self.pad, self.dil = k, s, _pair(p["padding"]), _pair(p["dilation"])
        self.kwargs = {kk: p[kk] for kk in ("kernel_size", "stride", "padding", "dilation", "ceil_mode") if kk in p}
        x = args[0]
        y = given(env, self.node)
        if y is None:
            y = self.run(args, kwargs)
        self.n, self.c, self.h, self.w = x.shape
        self.ho, self.wo = y.shape[2], y.shape[3]
        self.out_shape = tuple(y.shape)
        acc = self.config.acc_dtype(x.dtype)
        self.dtype = x.dtype
        self.kern = None
        if x.dtype == torch.float32 and (acc == torch.float32 or USE_KERNEL_WITH_WIDE_STATE):
            key = (tuple(x.shape), k, s, self.pad, self.dil)
            if getattr(self, "_kern_key", None) != key:
                self._kern_key = key
                self._kern = kernels_bridge.max_pool2d(tuple(x.shape), k, s, self.pad, self.dil)
            kern = self._kern
            if kern is not None and tuple(kern.out_shape) == self.out_shape:
                kern.seed(x, y)
                self.kern = kern
                return y
        self.x = torch.cat([rows_of(x, acc), torch.full((1, self.c), float("-inf"), dtype=acc)])
        self.y = rows_of(y, acc)
        self.ky = torch.arange(k[0]) * self.dil[0]
        self.kx = torch.arange(k[1]) * self.dil[1]
        return y

    def given_nodes(self) -> list[fx.Node]:
        return [self.node]

    def _affected(self, idx: torch.Tensor) -> torch.Tensor:
        """Sorted unique output pixels whose window contains one of the input pixels `idx`."""
        hw = self.h * self.w
        b, r = idx.div(hw, rounding_mode="floor"), idx.remainder(hw)
        iy, ix = r.div(self.w, rounding_mode="floor"), r.remainder(self.w)
        ny, nx = iy.unsqueeze(1) + self.pad[0] - self.ky, ix.unsqueeze(1) + self.pad[1] - self.kx  # (A, k)
        oy, ox = ny.div(self.s[0], rounding_mode="floor"), nx.div(self.s[1], rounding_mode="floor")
        vy = (ny >= 0) & (ny.remainder(self.s[0]) == 0) & (oy < self.ho)
        vx = (nx >= 0) & (nx.remainder(self.s[1]) == 0) & (ox < self.wo)
        valid = vy.unsqueeze(2) & vx.unsqueeze(1)
        flat = (b.view(-1, 1, 1) * (self.ho * self.wo) + oy.unsqueeze(2) * self.wo + ox.unsqueeze(1))[valid]
        return torch.unique(flat, sorted=True)

    def _windows(self, out: torch.Tensor) -> torch.Tensor:
        """(B, k*k) input row of every window element of the output pixels `out` (padding -> the -inf row)."""
        hw = self.ho * self.wo
        b, r = out.div(hw, rounding_mode="floor"), out.remainder(hw)
        oy, ox = r.div(self.wo, rounding_mode="floor"), r.remainder(self.wo)
        iy = (oy * self.s[0] - self.pad[0]).unsqueeze(1) + self.ky  # (B, kh)
        ix = (ox * self.s[1] - self.pad[1]).unsqueeze(1) + self.kx  # (B, kw)
        valid = ((iy >= 0) & (iy < self.h)).unsqueeze(2) & ((ix >= 0) & (ix < self.w)).unsqueeze(1)
        rows = b.view(-1, 1, 1) * (self.h * self.w) + iy.unsqueeze(2) * self.w + ix.unsqueeze(1)
        return torch.where(valid, rows, self.n * self.h * self.w).reshape(out.numel(), -1)

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        if self.kern is not None:
            out = self.kern(d)
            return out if out.active else None
        self.x.index_add_(0, d.index, d.values.to(self.x.dtype))
        if d.active_fraction > DENSE_ABOVE:
            xs = self.x[:-1].view(self.n, self.h, self.w, self.c).permute(0, 3, 1, 2)
            y_new = rows_of(F.max_pool2d(xs, **self.kwargs))
            delta = (y_new - self.y).to(self.dtype)
            self.y = y_new
            out = pixels_from_dense(delta.view(self.n, self.ho, self.wo, self.c).permute(0, 3, 1, 2))
            return out if out.active else None
        out = self._affected(d.index)
        if out.numel() == 0:
            return None
        win = self._windows(out)
        new = self.x.index_select(0, win.reshape(-1)).view(out.numel(), win.shape[1], self.c).amax(1)
        old = self.y.index_select(0, out)
        self.y.index_copy_(0, out, new)
        return PixelDelta(out, (new - old).to(self.dtype), self.out_shape)  # type: ignore[arg-type]


def _max_pool_ok(node: fx.Node, ctx: BuildContext) -> bool:
    return _first_only_4d(node, ctx) and not node.kwargs.get("return_indices", False) and len(node.args) <= 6


@register(*functions(F.max_pool2d), accepts=_max_pool_ok)
def _max_pool(node: fx.Node, ctx: BuildContext) -> Unit:
    return MaxPoolUnit(node, ctx.var_nodes(node))
