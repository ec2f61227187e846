"""Shape units: cat, split, chunk, getitem/slice, reshape, view, permute, transpose, flatten, channel shuffle, ...

All are linear, so Δy = op(Δx). Generic case: `LinearOpUnit` on densified deltas. Sparse specialisations on
PixelDeltas (no densification): channel cat (union of active pixels, zero-filled channels), channel split/chunk and
channel slices (column slices of the values), channel shuffle (a column permutation), tuple items, and identities
(contiguous, clone, same-dtype casts).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, Env, Unit, call_target, to_pixels
from deluceva.delta.kernels._jit import HAVE_NUMBA, jit
from deluceva.delta.linop import LinearOpUnit
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, methods, register
from deluceva.graph import ops

_SINGLE_FUNCS = (
    torch.reshape, torch.flatten, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze, torch.narrow,
    torch.select, torch.t, torch.movedim, torch.swapaxes, torch.roll, torch.flip, torch.split, torch.chunk,
    torch.unbind, torch.tensor_split, F.pixel_shuffle, F.pixel_unshuffle, F.channel_shuffle, torch.sum, torch.mean,
    torch.unflatten, torch.diagonal, torch.tile, operator.getitem,
)  # fmt: skip
_SINGLE_METHODS = (
    "view", "reshape", "permute", "transpose", "flatten", "squeeze", "unsqueeze", "expand", "repeat", "narrow",
    "select", "t", "movedim", "swapaxes", "roll", "flip", "split", "chunk", "unbind", "tensor_split", "sum", "mean",
    "unflatten", "view_as", "reshape_as", "expand_as", "tile", "diagonal",
)  # fmt: skip
_IDENTITY_METHODS = ("contiguous", "clone", "detach", "float", "to", "type_as")
_MULTI_FUNCS = (torch.cat, torch.concat, torch.concatenate, torch.stack, ops.setitem)


def _first_only(node: fx.Node, ctx: BuildContext) -> bool:
    """The only varying input is the first argument (indices, sizes, `other` of *_as are constants)."""
    var = ctx.var_nodes(node)
    return len(var) == 1 and bool(node.args) and node.args[0] is var[0] and not _is_tuple_value(var[0])


def _is_tuple_value(node: fx.Node) -> bool:
    tm = node.meta.get("tensor_meta")
    return isinstance(tm, tuple | list) and not hasattr(tm, "shape")  # TensorMetadata itself is a NamedTuple


@register(*functions(*_SINGLE_FUNCS), *methods(*_SINGLE_METHODS), accepts=_first_only)
def _single(node: fx.Node, ctx: BuildContext) -> Unit:
    return _specialised(node, ctx) or LinearOpUnit(node, ctx.var_nodes(node), ctx.module(node))


def _multi_ok(node: fx.Node, ctx: BuildContext) -> bool:
    if node.target is ops.setitem:
        return len(node.args) == 3 and not ctx.varying(node.args[1])
    return bool(node.args) and all(not ctx.varying(a) for a in node.args[1:]) and all(
        not ctx.varying(v) for v in node.kwargs.values()
    )


@register(*functions(*_MULTI_FUNCS), accepts=_multi_ok)
def _multi(node: fx.Node, ctx: BuildContext) -> Unit:
    if node.target in (torch.cat, torch.concat, torch.concatenate) and _channel_dim(node, ctx, 1) == 1:
        return ChannelCatUnit(node, ctx.var_nodes(node))
    return LinearOpUnit(node, ctx.var_nodes(node), zero_static=True)


def _same_dtype(node: fx.Node, ctx: BuildContext) -> bool:
    if not _first_only(node, ctx):
        return False
    a, b = node.args[0].meta.get("tensor_meta"), node.meta.get("tensor_meta")
    return a is not None and b is not None and getattr(a, "dtype", None) == getattr(b, "dtype", 0)


@register(*methods(*_IDENTITY_METHODS), accepts=_same_dtype)
def _identity(node: fx.Node, ctx: BuildContext) -> Unit:
    return IdentityUnit(node, ctx.var_nodes(node))


@register(*methods("to", "float", "type_as", "double", "half"), accepts=_first_only)
def _cast(node: fx.Node, ctx: BuildContext) -> Unit:
    return LinearOpUnit(node, ctx.var_nodes(node))


def _tuple_item_ok(node: fx.Node, ctx: BuildContext) -> bool:
    var = ctx.var_nodes(node)
    return len(var) == 1 and node.args[0] is var[0] and _is_tuple_value(var[0]) and isinstance(node.args[1], int)


@register(*functions(operator.getitem), accepts=_tuple_item_ok)
def _tuple_item(node: fx.Node, ctx: BuildContext) -> Unit:
    return TupleItemUnit(node, ctx.var_nodes(node))


_LINEAR_TENSOR_ATTRS = ("T", "mT", "real")


def _getattr_ok(node: fx.Node, ctx: BuildContext) -> bool:
    var = ctx.var_nodes(node)
    if len(var) != 1 or node.args[0] is not var[0] or not isinstance(node.args[1], str):
        return False
    return _is_tuple_value(var[0]) or node.args[1] in _LINEAR_TENSOR_ATTRS


@register(*functions(getattr), accepts=_getattr_ok)
def _getattr(node: fx.Node, ctx: BuildContext) -> Unit:
    if _is_tuple_value(node.args[0]):
        return TupleItemUnit(node, ctx.var_nodes(node))
    return LinearOpUnit(node, ctx.var_nodes(node))


class IdentityUnit(Unit):
    """Δy = Δx (contiguous, clone, detach, same-dtype casts)."""

    kind = "identity"
    seeds_shapes_only = True

    def seed(self, env: Env) -> Any:
        return self.run(*self.materialize(env))

    def __call__(self, d: Delta) -> Delta:
        return d


class TupleItemUnit(Unit):
    """Δ(x[i]) = (Δx)[i] for tuple-valued nodes (split/chunk results; named fields like `.values` too)."""

    kind = "getitem"

    def seed(self, env: Env) -> Any:
        key = self.node.args[1]
        if isinstance(key, int):
            self.i = key
        else:  # a named field (namedtuple / torch.return_types): its position
            value = env(self.node.args[0])
            self.i = next(j for j, v in enumerate(value) if v is getattr(value, key))
        return self.run(*self.materialize(env))

    def __call__(self, d: Delta) -> Delta:
        return None if d is None else d[self.i]


def _channel_dim(node: fx.Node, ctx: BuildContext, default: int) -> int | None:
    """The op's `dim` argument normalised for 4-D inputs, or None when an input is not 4-D."""
    if node.target in (torch.cat, torch.concat, torch.concatenate, torch.stack):
        tensors = node.args[0]
        shapes = [ctx.shape(t) if isinstance(t, fx.Node) else None for t in tensors]
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    else:
        shapes = [ctx.shape(node.args[0])]
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else default)
    if not shapes or any(s is None or len(s) != 4 for s in shapes) or not isinstance(dim, int):
        return None
    return dim % 4


class ChannelCatUnit(Unit):
    """cat along channels of 4-D tensors: union of the active pixels, each input's channels at its offset."""

    kind = "cat"
    seeds_shapes_only = True

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        out = self.run(args, kwargs)
        index = {n: i for i, n in enumerate(self.var_nodes)}
        self.parts: list[tuple[int, int, int]] = []  # (var index, channel offset, channels)
        off = 0
        for item, val in zip(self.node.args[0], args[0], strict=True):
            c = val.shape[1]
            if isinstance(item, fx.Node) and item in index:
                self.parts.append((index[item], off, c))
            off += c
        self.out_shape = tuple(out.shape)
        # exactly two varying inputs, in order, making up all output channels: the fused kernel merge applies
        self.parts_cover_all = (
            len(self.parts) == 2 and self.parts[0][1] == 0 and self.parts[0][0] != self.parts[1][0]
            and self.parts[1][1] == self.parts[0][2] and sum(c for _, _, c in self.parts) == self.out_shape[1]
        )
        return out

    def __call__(self, *deltas: Delta) -> Delta:
        present = [(to_pixels(deltas[i]), off, c) for i, off, c in self.parts if deltas[i] is not None]
        present = [(d, off, c) for d, off, c in present if d is not None]
        if not present:
            return None
        ctot = self.out_shape[1]
        if len(present) == 2 and len(self.parts) == 2 and self.parts_cover_all:
            (a, _, _), (b, _, _) = present
            fast = kernels_bridge.concat([a, b])
            if fast is not None:
                return fast
        if len(present) == 1:
            d, off, c = present[0]
            src = d.values_np
            vals = np.zeros((d.active, ctot), src.dtype)
            vals[:, off : off + c] = src
            return d.with_values(vals, self.out_shape)  # type: ignore[arg-type]
        fast = kernels_bridge.concat_at([d for d, _, _ in present], [off for _, off, _ in present], self.out_shape)
        if fast is not None:
            return fast
        idx, inv = torch.unique(torch.cat([d.index for d, _, _ in present]), sorted=True, return_inverse=True)
        vals = present[0][0].values.new_zeros(idx.numel(), ctot)
        start = 0
        for d, off, c in present:
            rows = inv[start : start + d.active]
            start += d.active
            vals[rows, off : off + c] += d.values  # += : the same input may appear twice in the list
        return PixelDelta(idx, vals, self.out_shape)  # type: ignore[arg-type]


class ChannelSplitUnit(Unit):
    """split/chunk along channels of a 4-D tensor: column slices of the values, same active pixels."""

    kind = "split"

    def seed(self, env: Env) -> Any:
        out = self.run(*self.materialize(env))
        self.ranges, off = [], 0
        for o in out:
            self.ranges.append((off, off + o.shape[1], tuple(o.shape)))
            off += o.shape[1]
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        return tuple(PixelDelta(d.index, d.values[:, a:b].contiguous(), s) for a, b, s in self.ranges)


class ChannelSelectUnit(Unit):
    """A channel slice / channel permutation of a 4-D tensor: `values[:, cols]`, same active pixels."""

    kind = "channels"

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], cols_of: Any) -> None:
        super().__init__(node, var_nodes)
        self.cols_of = cols_of  # (full input, node args) -> LongTensor of source channels

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        out = self.run(args, kwargs)
        self.cols = self.cols_of(args[0], args, kwargs)
        self.out_shape = tuple(out.shape)
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        return PixelDelta(d.index, d.values.index_select(1, self.cols), self.out_shape)  # type: ignore[arg-type]


@jit
def _slice_nb(idx, vals, h, w, y0, sy, x0, sx, ho, wo):  # pragma: no cover - compiled
    """Rows of (idx, vals) inside the slice, re-indexed into the (ho, wo) output (stays sorted); one pass."""
    hw = h * w
    oi = np.empty(idx.shape[0], np.int64)
    ov = np.empty(vals.shape, vals.dtype)
    k = 0
    for i in range(idx.shape[0]):
        p = idx[i]
        b = p // hw
        r = p - b * hw
        y = r // w - y0
        x = r - (r // w) * w - x0
        if y < 0 or x < 0 or y % sy != 0 or x % sx != 0:
            continue
        oy = y // sy
        ox = x // sx
        if oy >= ho or ox >= wo:
            continue
        oi[k] = b * (ho * wo) + oy * wo + ox
        ov[k] = vals[i]
        k += 1
    return oi[:k], ov[:k]


class SpatialSliceUnit(Unit):
    """x[..., y0:y1:sy, x0:x1:sx] of a 4-D tensor (e.g. a Focus / space-to-depth stem): index arithmetic (one fused
    numba pass when available)."""

    kind = "slice"

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        out = self.run(args, kwargs)
        x = args[0]
        _, _, self.h, self.w = x.shape
        idx = _spatial_slices(args[1])
        assert idx is not None
        self.ys, self.xs = (sl.indices(n) for sl, n in zip(idx, (self.h, self.w), strict=True))
        self.out_shape = tuple(out.shape)
        return out

    def __call__(self, d: Delta) -> Delta:
        d = to_pixels(d)
        if d is None:
            return None
        (y0, _, sy), (x0, _, sx) = self.ys, self.xs  # stops: enforced by oy < ho, ox < wo
        _, _, ho, wo = self.out_shape
        if HAVE_NUMBA and d.values_np.flags.c_contiguous:
            oi, ov = _slice_nb(d.index_np, d.values_np, self.h, self.w, y0, sy, x0, sx, ho, wo)
            if oi.shape[0] == 0:
                return None
            return PixelDelta(oi, ov, self.out_shape)  # type: ignore[arg-type]
        hw = self.h * self.w
        b, r = d.index.div(hw, rounding_mode="floor"), d.index.remainder(hw)
        y, x = r.div(self.w, rounding_mode="floor") - y0, r.remainder(self.w) - x0
        keep = (y >= 0) & (x >= 0) & (y.remainder(sy) == 0) & (x.remainder(sx) == 0)
        oy, ox = y.div(sy, rounding_mode="floor"), x.div(sx, rounding_mode="floor")
        keep &= (oy < ho) & (ox < wo)
        sel = keep.nonzero().squeeze(1)
        if sel.numel() == 0:
            return None
        idx = b[sel] * (ho * wo) + oy[sel] * wo + ox[sel]
        return PixelDelta(idx, d.values.index_select(0, sel), self.out_shape)  # type: ignore[arg-type]


def _spatial_slices(idx: Any) -> tuple[slice, slice] | None:
    """(y slice, x slice) if `idx` indexes a 4-D tensor only spatially with non-negative forward slices."""
    if not isinstance(idx, tuple):
        return None
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (4 - len(idx) + 1) + idx[k + 1 :]
    if len(idx) != 4 or idx[0] != slice(None) or idx[1] != slice(None):
        return None
    for sl in idx[2:]:
        if not isinstance(sl, slice):
            return None
        if any(v is not None and (not isinstance(v, int) or v < 0) for v in (sl.start, sl.stop, sl.step)):
            return None
    return idx[2], idx[3]


class ChannelShuffleChainUnit(ChannelSelectUnit):
    """view(N, g, C/g, H, W) -> transpose(1, 2) -> [contiguous] -> view(N, C, H, W): a channel permutation.

    The chain's nodes are fused into this unit; the permutation is found at seed by running the chain on a map whose
    channel c holds the value c.
    """

    kind = "channel_shuffle"

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], chain: list[fx.Node]) -> None:
        Unit.__init__(self, node, var_nodes)
        self.fused = chain

    def _run_chain(self, x: torch.Tensor, env: Env) -> torch.Tensor:
        cur, prev = x, self.var_nodes[0]
        for n in [self.node, *self.fused]:
            cur_val, prev_node = cur, prev
            args = fx.node.map_arg(n.args, lambda a, v=cur_val, p=prev_node: v if a is p else env(a))
            kwargs = fx.node.map_arg(n.kwargs, lambda a, v=cur_val, p=prev_node: v if a is p else env(a))
            cur, prev = call_target(n, None, args, kwargs), n  # type: ignore[arg-type]
        return cur

    def seed(self, env: Env) -> Any:
        x = env(self.var_nodes[0])
        out = self._run_chain(x, env)
        n, c, h, w = x.shape
        probe = torch.arange(c, dtype=x.dtype).view(1, c, 1, 1).expand(n, c, h, w).contiguous()
        self.cols = self._run_chain(probe, env)[0, :, 0, 0].round().long()
        self.out_shape = tuple(out.shape)
        return out


def _single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].args[:1] == (node,) else None


def _shuffle_chain(node: fx.Node, ctx: BuildContext) -> list[fx.Node] | None:
    """The nodes after `node` (a 4-D -> 5-D view) forming a channel shuffle, or None."""
    src, out5 = ctx.shape(node.args[0]), ctx.shape(node)
    if src is None or out5 is None or len(src) != 4 or len(out5) != 5 or out5[0] != src[0] or out5[3:] != src[2:]:
        return None
    t = _single_user(node)
    if t is None or not (
        (t.op == "call_method" and t.target in ("transpose", "swapaxes") and sorted(t.args[1:3]) == [1, 2])
        or (t.op == "call_function" and t.target is torch.transpose and sorted(t.args[1:3]) == [1, 2])
    ):
        return None
    chain = [t]
    nxt = _single_user(t)
    if nxt is not None and nxt.op == "call_method" and nxt.target == "contiguous":
        chain.append(nxt)
        nxt = _single_user(nxt)
    if nxt is None or not (
        (nxt.op == "call_method" and nxt.target in ("view", "reshape", "flatten"))
        or (nxt.op == "call_function" and nxt.target in (torch.reshape, torch.flatten))
    ):
        return None
    if ctx.shape(nxt) != src or len(ctx.var_nodes(nxt)) != 1:
        return None
    chain.append(nxt)
    return chain


def _channel_slice_cols(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    return torch.arange(x.shape[1])[args[1][1]]


def _shuffle_cols(x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    g = kwargs.get("groups", args[1] if len(args) > 1 else None)
    c = x.shape[1]
    return torch.arange(c).view(g, c // g).t().reshape(-1)


def _is_channel_slice(idx: Any) -> bool:
    if not isinstance(idx, tuple) or len(idx) < 2 or idx[0] != slice(None):
        return False
    if not isinstance(idx[1], slice) or not all(isinstance(v, int | None) for v in (idx[1].start, idx[1].stop)):
        return False
    rest = idx[2:]
    return all(r == slice(None) for r in rest) or rest == (Ellipsis,)


def _specialised(node: fx.Node, ctx: BuildContext) -> Unit | None:
    """A sparse channel unit for this node when one applies."""
    var = ctx.var_nodes(node)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", None)
    shape = ctx.shape(var[0])
    if shape is None or len(shape) != 4:
        return None
    if name in ("view", "reshape") and (chain := _shuffle_chain(node, ctx)) is not None:
        return ChannelShuffleChainUnit(node, var, chain)
    if name in ("split", "chunk") and _channel_dim(node, ctx, 0) == 1:
        return ChannelSplitUnit(node, var)
    if node.target is operator.getitem and _is_channel_slice(node.args[1]):
        return ChannelSelectUnit(node, var, _channel_slice_cols)
    if node.target is operator.getitem and _spatial_slices(node.args[1]) is not None:
        return SpatialSliceUnit(node, var)
    if node.target is F.channel_shuffle:
        return ChannelSelectUnit(node, var, _shuffle_cols)
    return None
