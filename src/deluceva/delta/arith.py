"""Arithmetic units: add, sub, neg, mul / div by constants, and mul of two changing inputs.

- add/sub (alpha too): Δy = Δa ± alpha·Δb; PixelDeltas of equal shape merge by union of active pixels; broadcasting
  operands are expanded densely.
- mul/div by a constant c (scalar, per-channel, or any broadcastable tensor): Δy = Δx·c (Δx / c).
- mul of two changing inputs: d(ab) = a·Δb + Δa·b + Δa·Δb = a_old·Δb + Δa·b_new, from the stored full inputs. When
  only a 4-D input changes and the other is a per-channel scale (squeeze-excite), only its active pixels are touched.
- div of two changing inputs: recomputed (`RecomputeUnit`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, Env, Unit, to_dense, to_pixels, wrap
from deluceva.delta.dense import RecomputeUnit, _own, apply_delta
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, methods, register

_ADD = (*functions(operator.add, torch.add), *methods("add"))
_SUB = (*functions(operator.sub, torch.sub, torch.subtract), *methods("sub", "subtract"))
_MUL = (*functions(operator.mul, torch.mul, torch.multiply), *methods("mul", "multiply"))
_DIV = (*functions(operator.truediv, torch.div, torch.true_divide, torch.divide), *methods("div", "true_divide"))
_NEG = (*functions(operator.neg, torch.neg, torch.negative), *methods("neg", "negative"))


def _operands(node: fx.Node) -> tuple[Any, Any]:
    a = node.args[0] if node.args else node.kwargs.get("input")
    b = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    return a, b


def _name(node: fx.Node) -> str:
    return node.target if node.op == "call_method" else node.target.__name__  # type: ignore[return-value]


def _binary_ok(node: fx.Node, ctx: BuildContext) -> bool:
    a, b = _operands(node)
    extra = {k for k in node.kwargs if k not in ("input", "other", "alpha")}
    return (
        not extra
        and not ctx.varying(node.kwargs.get("alpha"))
        and (ctx.varying(a) or ctx.varying(b))
        and ctx.shape(node) is not None
        and not (node.target in (torch.div,) and "rounding_mode" in node.kwargs)
    )


class _Scale:
    """Multiply (or divide) deltas by a constant c: scalar, per-channel (4-D), or broadcast dense."""

    def __init__(self, c: Any, var_shape: tuple, out_shape: tuple, divide: bool) -> None:
        self.divide = divide
        self.mode = "dense"
        self.out_shape = tuple(out_shape)
        self.var_shape = tuple(var_shape)
        if self.var_shape != self.out_shape:  # the varying operand broadcasts: expand densely
            self.c = c
        elif not isinstance(c, torch.Tensor) or c.numel() == 1:
            self.mode, self.c = "scalar", (c.item() if isinstance(c, torch.Tensor) else c)
        elif len(out_shape) == 4 and c.dim() <= 4:
            cs = (1,) * (4 - c.dim()) + tuple(c.shape)
            if cs[0] == 1 and cs[2] == 1 and cs[3] == 1:
                self.mode, self.c = "channel", c.reshape(-1).expand(out_shape[1]).contiguous()
        if self.mode == "dense" and self.var_shape == self.out_shape:
            self.c = c

    def __call__(self, d: Delta) -> Delta:
        if d is None:
            return None
        if self.mode != "dense" and isinstance(d, PixelDelta):
            v = d.values / self.c if self.divide else d.values * self.c
            return PixelDelta(d.index, v, self.out_shape)  # type: ignore[arg-type]
        dd = to_dense(d, self.var_shape)
        out = dd / self.c if self.divide else dd * self.c
        if tuple(out.shape) != tuple(self.out_shape):
            out = out.expand(self.out_shape)
        return wrap(out)


class AddUnit(Unit):
    """Δy = sa·Δa + sb·Δb (sa = 1 or -1 for rsub-like static first operand, sb = ±alpha)."""

    kind = "add"
    seeds_shapes_only = True

    def seed(self, env: Env) -> Any:
        a, b = _operands(self.node)
        out = self.run(*self.materialize(env))
        alpha = self.node.kwargs.get("alpha", 1)
        sub = _name(self.node) in ("sub", "subtract")
        index = {n: i for i, n in enumerate(self.var_nodes)}
        self.terms: list[tuple[int, _Scale | None]] = []
        self.out_shape = tuple(out.shape)
        for arg, sign in ((a, 1), (b, -alpha if sub else alpha)):
            if isinstance(arg, fx.Node) and arg in index:
                shape = tuple(env(arg).shape)
                scale = None if (sign == 1 and shape == self.out_shape) else _Scale(sign, shape, self.out_shape, False)
                self.terms.append((index[arg], scale))
        return out

    def __call__(self, *deltas: Delta) -> Delta:
        parts = []
        for i, scale in self.terms:
            d = deltas[i]
            if d is not None:
                parts.append(d if scale is None else scale(d))
        parts = [p for p in parts if p is not None]
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        if all(isinstance(p, PixelDelta) for p in parts):
            return merge_add(parts)
        total = to_dense(parts[0], self.out_shape)
        for p in parts[1:]:
            total = total + to_dense(p, self.out_shape)
        return wrap(total)


def merge_add(parts: list[PixelDelta]) -> PixelDelta:
    """Sum of PixelDeltas of one shape: union of their pixels."""
    fast = kernels_bridge.merge_add(parts)
    if fast is not None:
        return fast
    idx, inv = torch.unique(torch.cat([p.index for p in parts]), sorted=True, return_inverse=True)
    vals = parts[0].values.new_zeros(idx.numel(), parts[0].values.shape[1])
    vals.index_add_(0, inv, torch.cat([p.values for p in parts]))
    return PixelDelta(idx, vals, parts[0].shape)


@register(*_ADD, *_SUB, accepts=_binary_ok)
def _add(node: fx.Node, ctx: BuildContext) -> Unit:
    return AddUnit(node, ctx.var_nodes(node))


class ScaleUnit(Unit):
    """Δy = Δx · c or Δx / c for a constant c (mul/div by a static operand, neg)."""

    kind = "scale"

    def seed(self, env: Env) -> Any:
        out = self.run(*self.materialize(env))
        name = _name(self.node)
        x = env(self.var_nodes[0])
        if name in ("neg", "negative"):
            c, divide = -1.0, False
        else:
            a, b = _operands(self.node)
            other = b if a is self.var_nodes[0] else a
            c = env(other) if isinstance(other, fx.Node) else other
            divide = name in ("truediv", "div", "true_divide", "divide")
        self.scale = _Scale(c, tuple(x.shape), tuple(out.shape), divide)
        return out

    def __call__(self, d: Delta) -> Delta:
        return self.scale(d)


def _scale_ok(node: fx.Node, ctx: BuildContext) -> bool:
    if not _binary_ok(node, ctx) or "alpha" in node.kwargs:
        return False
    a, b = _operands(node)
    if ctx.varying(a) and ctx.varying(b):
        return False
    if _name(node) in ("truediv", "div", "true_divide", "divide"):
        return ctx.varying(a)  # x / c is linear; c / x is elementwise (activation.py)
    return True


@register(*_MUL, *_DIV, accepts=_scale_ok)
def _scale(node: fx.Node, ctx: BuildContext) -> Unit:
    return ScaleUnit(node, ctx.var_nodes(node))


@register(*_NEG, accepts=lambda node, ctx: len(ctx.var_nodes(node)) == 1)
def _neg(node: fx.Node, ctx: BuildContext) -> Unit:
    return ScaleUnit(node, ctx.var_nodes(node))


class ProductUnit(Unit):
    """y = a·b with both changing: Δy = a_old·Δb + Δa·b_new from stored full a, b."""

    kind = "mul"

    def seed(self, env: Env) -> Any:
        a, b = _operands(self.node)
        self.same = a is b
        out = self.run(*self.materialize(env))
        acc = self.config.seed_state_dtype
        self.a, self.b = _own(env(a), acc), _own(env(b), acc)
        self.dtype = out.dtype
        self.out_shape = tuple(out.shape)
        self.chan_b = self._per_channel(self.a, self.b)
        self.chan_a = self._per_channel(self.b, self.a)
        return out

    def _per_channel(self, big: torch.Tensor, small: torch.Tensor) -> bool:
        """big is the 4-D output-shaped operand and small a (N|1, C, 1, 1) scale."""
        return (
            big.dim() == 4 and tuple(big.shape) == self.out_shape and small.dim() == 4
            and small.shape[2] == small.shape[3] == 1 and small.shape[1] == big.shape[1]
        )

    def _rows_scale(self, d: PixelDelta, big: torch.Tensor, small: torch.Tensor) -> PixelDelta:
        n, c, h, w = big.shape
        s = small.reshape(small.shape[0], c)
        batch = d.index.div(h * w, rounding_mode="floor") if small.shape[0] > 1 else torch.zeros_like(d.index)
        vals = d.values * s.index_select(0, batch)
        return PixelDelta(d.index, vals.to(self.dtype), d.shape)

    def __call__(self, *deltas: Delta) -> Delta:
        if self.same:
            da = db = deltas[0]
        else:
            da, db = deltas
        if db is None and self.chan_b and da is not None:
            da = to_pixels(da)
            self.a = apply_delta(self.a, da)
            return self._rows_scale(da, self.a, self.b)
        if da is None and self.chan_a and db is not None:
            db = to_pixels(db)
            self.b = apply_delta(self.b, db)
            return self._rows_scale(db, self.b, self.a)
        a_old = self.a.clone() if db is not None else self.a
        self.a = apply_delta(self.a, da)
        self.b = apply_delta(self.b, db) if not self.same else self.a
        out = None
        if db is not None:
            out = a_old * to_dense(db, self.b.shape)
        if da is not None:
            term = to_dense(da, self.a.shape) * self.b
            out = term if out is None else out + term
        if out is None:
            return None
        if tuple(out.shape) != self.out_shape:
            out = out.expand(self.out_shape)
        return wrap(out.to(self.dtype))


def _product_ok(node: fx.Node, ctx: BuildContext) -> bool:
    a, b = _operands(node)
    return _binary_ok(node, ctx) and ctx.varying(a) and ctx.varying(b) and "alpha" not in node.kwargs


@register(*_MUL, accepts=_product_ok)
def _product(node: fx.Node, ctx: BuildContext) -> Unit:
    return ProductUnit(node, ctx.var_nodes(node))


@register(*_DIV, accepts=_product_ok)
def _quotient(node: fx.Node, ctx: BuildContext) -> Unit:
    return RecomputeUnit(node, ctx.var_nodes(node))
