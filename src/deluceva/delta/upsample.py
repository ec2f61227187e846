"""Upsampling units: F.interpolate (nn.Upsample is canonicalised to it).

Interpolation is linear in its input: Δy = interpolate(Δx) (`LinearOpUnit`: bilinear, bicubic, non-integer nearest).
Nearest with an integer scale per axis (output = input · s): index arithmetic on the PixelDelta — every active pixel
(n, y, x) becomes the s_y·s_x pixels (n, y·s_y + i, x·s_x + j) with the same values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, Env, Unit, pixels_from_dense, to_pixels
from deluceva.delta.linop import LinearOpUnit
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, register


class NearestUpUnit(Unit):
    """Nearest upsampling by integer factors (s_y, s_x) on PixelDeltas."""

    kind = "upsample_nearest"
    seeds_shapes_only = True

    def seed(self, env: Env) -> Any:
        out = self.run(*self.materialize(env))
        x = env(self.var_nodes[0])
        _, _, h, w = x.shape
        self.h, self.w = h, w
        self.ho, self.wo = out.shape[2], out.shape[3]
        self.out_shape = tuple(out.shape)
        self.sy, self.sx = self.ho // h, self.wo // w
        self.exact = self.ho == h * self.sy and self.wo == w * self.sx
        if self.exact:
            oy = torch.arange(self.sy).view(self.sy, 1) * self.wo
            self.offsets = (oy + torch.arange(self.sx).view(1, self.sx)).reshape(-1)  # (sy*sx,)
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        if not self.exact:
            return pixels_from_dense(F.interpolate(d.to_dense(), size=(self.ho, self.wo), mode="nearest"))
        if self.sy == self.sx:
            fast = kernels_bridge.upsample_nearest(d, self.sy)
            if fast is not None:
                return fast
        hw = self.h * self.w
        b, r = d.index.div(hw, rounding_mode="floor"), d.index.remainder(hw)
        y, x = r.div(self.w, rounding_mode="floor"), r.remainder(self.w)
        base = b * (self.ho * self.wo) + y * self.sy * self.wo + x * self.sx  # (A,)
        k = self.offsets.numel()
        idx = (base.view(-1, 1) + self.offsets.view(1, -1)).reshape(-1)
        order = torch.argsort(idx)
        vals = d.values.repeat_interleave(k, dim=0).index_select(0, order)
        return PixelDelta(idx.index_select(0, order), vals, self.out_shape)  # type: ignore[arg-type]


def _first_only(node: fx.Node, ctx: BuildContext) -> bool:
    var = ctx.var_nodes(node)
    return len(var) == 1 and node.args[:1] == (var[0],)


def _nearest_int(node: fx.Node, ctx: BuildContext) -> bool:
    if not _first_only(node, ctx):
        return False
    mode = node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest")
    si, so = ctx.shape(node.args[0]), ctx.shape(node)
    if mode != "nearest" or si is None or so is None or len(si) != 4:
        return False
    return so[2] % si[2] == 0 and so[3] % si[3] == 0


@register(*functions(F.interpolate), accepts=_nearest_int)
def _nearest(node: fx.Node, ctx: BuildContext) -> Unit:
    return NearestUpUnit(node, ctx.var_nodes(node))


@register(*functions(F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest), accepts=_first_only)
def _interpolate(node: fx.Node, ctx: BuildContext) -> Unit:
    return LinearOpUnit(node, ctx.var_nodes(node))
