"""Padding units: F.pad (ZeroPad2d / ConstantPad2d / ReflectionPad2d / ReplicationPad2d are canonicalised to it).

Padding is affine: Δy = pad(Δx) with the constant 0 (reflect/replicate/circular pad the delta the same way).
Constant spatial padding of a 4-D tensor (non-negative, 4 values) is index arithmetic on the PixelDelta.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import fx

from deluceva.delta.base import Delta, Env, Unit, to_dense, to_pixels, wrap
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, register


class PadUnit(Unit):
    """Δy = pad(Δx, value=0); sparse index shift for non-negative constant spatial padding of 4-D tensors."""

    kind = "pad"

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        names = ["input", "pad", "mode", "value"]
        p = {"mode": "constant", "value": None, **dict(zip(names, args, strict=False)), **kwargs}
        out = self.run(args, kwargs)
        x = args[0]
        self.pad, self.mode = tuple(p["pad"]), p["mode"]
        self.in_shape, self.out_shape = tuple(x.shape), tuple(out.shape)
        self.sparse = x.dim() == 4 and self.mode == "constant" and len(self.pad) == 4 and min(self.pad) >= 0
        return out

    def __call__(self, d: Delta) -> Delta:
        if d is None:
            return None
        if not self.sparse:
            dx = to_dense(d, self.in_shape)
            if self.mode == "constant":
                return wrap(F.pad(dx, self.pad, mode="constant", value=0.0))
            return wrap(F.pad(dx, self.pad, mode=self.mode))
        d = to_pixels(d)
        if d is None:
            return None
        left, _, top, _ = self.pad
        _, _, h, w = self.in_shape
        _, _, ho, wo = self.out_shape
        b, r = d.index.div(h * w, rounding_mode="floor"), d.index.remainder(h * w)
        y, x = r.div(w, rounding_mode="floor"), r.remainder(w)
        idx = b * (ho * wo) + (y + top) * wo + (x + left)
        return PixelDelta(idx, d.values, self.out_shape)  # type: ignore[arg-type]


@register(*functions(F.pad), accepts=lambda node, ctx: ctx.var_nodes(node)[:1] == list(node.args[:1])
          and len(ctx.var_nodes(node)) == 1)
def _pad(node: fx.Node, ctx: BuildContext) -> Unit:
    return PadUnit(node, ctx.var_nodes(node))
