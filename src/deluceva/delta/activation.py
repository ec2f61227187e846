"""Elementwise non-linear units (ReLU, ReLU6, LeakyReLU, Sigmoid, SiLU, Hardswish, Hardsigmoid, Tanh, Mish, GELU, ...).

State: the full input z (4-D: channels-last rows (N*H*W, C); otherwise the tensor). Delta form at touched pixels:
z[idx] += Δ; Δy = f(z_new) - f(z_old). Any elementwise op with one varying tensor input and only scalar other
operands qualifies (e.g. `torch.pow(x, 2)`, `torch.clamp(x, 0, 1)`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx

from deluceva.delta import kernels_bridge
from deluceva.delta.base import Delta, Env, Unit, given, nonzero_rows, pixels_from_dense, to_dense
from deluceva.delta.kernels import actstep
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, register
from deluceva.delta.state import RowState
from deluceva.graph import ops

# Activations with flat regions: many touched pixels get an exactly zero output delta, worth dropping.
FLAT: frozenset = frozenset({torch.relu, F.relu6, F.hardtanh, F.hardswish, F.hardsigmoid, torch.clamp, F.threshold})


def emit(d: PixelDelta, vals: torch.Tensor | np.ndarray, shape: tuple, prune: bool) -> PixelDelta | None:
    """PixelDelta of output rows `vals` at d's pixels (all-zero rows dropped when `prune`); None when nothing is
    left."""
    if isinstance(vals, np.ndarray):
        return emit_rows(d.index_np, vals, shape, prune)
    n = d.active
    if prune and n >= 32:  # below that the check costs more than it can save downstream
        keep = nonzero_rows(vals)
        if not bool(keep.all()):
            sel = keep.nonzero().squeeze(1)
            return PixelDelta(d.index.index_select(0, sel), vals.index_select(0, sel), shape) if sel.numel() \
                else None
    return d.with_values(vals, shape) if n else None  # type: ignore[arg-type]


def emit_rows(idx: np.ndarray, vals: np.ndarray, shape: tuple, prune: bool) -> PixelDelta | None:
    """`emit` for NumPy index and rows."""
    if prune and idx.shape[0] >= 32:
        keep = np.abs(vals).max(1) > 0
        if not keep.all():
            sel = keep.nonzero()[0]
            idx, vals = idx[sel], vals[sel]
    return PixelDelta(idx, vals, shape) if idx.shape[0] else None  # type: ignore[arg-type]


def emit_all(vals: torch.Tensor, shape: tuple) -> PixelDelta | None:
    """PixelDelta of dense output rows (N*H*W, C): the rows with a non-zero entry; None when all are zero."""
    idx = kernels_bridge.nonzero_row_index(vals)
    if idx is not None:
        if idx.shape[0] == 0:
            return None
        values = vals.numpy() if idx.shape[0] == vals.shape[0] else vals.numpy().take(idx, axis=0)
        return PixelDelta(idx, values, shape)  # type: ignore[arg-type]
    sel = nonzero_rows(vals).nonzero().squeeze(1)
    if sel.numel() == 0:
        return None
    if sel.numel() == vals.shape[0]:
        return PixelDelta(sel, vals.contiguous(), shape)  # type: ignore[arg-type]
    return PixelDelta(sel, vals.index_select(0, sel), shape)  # type: ignore[arg-type]


def _scalar_like(v: Any) -> bool:
    return not isinstance(v, torch.Tensor) or v.numel() == 1


# Parameter-free activations -> the ATen function their Python wrapper calls (same kernel, no wrapper per call).
_DIRECT: dict[Callable, Callable] = {
    F.silu: torch._C._nn.silu, F.hardswish: torch._C._nn.hardswish, F.hardsigmoid: torch._C._nn.hardsigmoid,
    F.mish: torch._C._nn.mish, torch.relu: torch.relu, torch.sigmoid: torch.sigmoid, torch.tanh: torch.tanh,
}  # fmt: skip


def elementwise_fn(node: fx.Node, src: fx.Node, env: Env) -> Callable[[torch.Tensor], torch.Tensor]:
    """f(z) = node's op with `src` replaced by z and every other argument frozen to its value in `env`."""
    from deluceva.delta.base import ArgTemplate

    target = node.target
    direct = _DIRECT.get(target)  # type: ignore[arg-type]
    if direct is not None and node.args == (src,) and all(
        k == "inplace" and v is False for k, v in node.kwargs.items()
    ):
        return direct
    tmpl = ArgTemplate(node, [src], env)

    def f(z: torch.Tensor) -> torch.Tensor:
        args, kwargs = tmpl.fill((z,))
        return target(*args, **kwargs)  # type: ignore[operator]

    return f


_ACT_CODES: dict[Callable, int] = {
    F.silu: actstep.SILU, torch.relu: actstep.RELU, F.relu: actstep.RELU, F.leaky_relu: actstep.LEAKY_RELU,
    torch.sigmoid: actstep.SIGMOID, F.hardswish: actstep.HARDSWISH,
}  # fmt: skip


def activation_code(node: fx.Node, src: fx.Node) -> tuple[int, float] | None:
    """(code, parameter) of node's activation of `src` for the fused row kernel (kernels.actstep), or None when
    the kernel does not cover it (other ops, tensor or unusual arguments, in-place forms)."""
    code = _ACT_CODES.get(node.target)  # type: ignore[arg-type]
    if code is None or node.args[:1] != (src,):
        return None
    extra = list(node.args[1:])
    kwargs = {k: v for k, v in node.kwargs.items() if not (k == "inplace" and v is False)}
    alpha = 0.0
    if code == actstep.LEAKY_RELU:
        alpha = extra.pop(0) if extra else kwargs.pop("negative_slope", 0.01)
        if not isinstance(alpha, (int, float)):
            return None
    if extra or kwargs:
        return None
    return code, float(alpha)


def is_elementwise(node: fx.Node, ctx: BuildContext) -> bool:
    """One varying input used once, elementwise canonical op (or scalar pow/rdiv), scalar other operands."""
    if node.op != "call_function":
        return False
    var = ctx.var_nodes(node)
    if len(var) != 1:
        return False
    uses = [a for a in (*node.args, *node.kwargs.values()) if a is var[0]]
    if len(uses) != 1:
        return False
    if node.target in ops.ELEMENTWISE:
        ok_pos = node.args[:1] == (var[0],)
    elif node.target in (operator.pow, operator.truediv, torch.div):
        ok_pos = True  # x ** c, c ** x, c / x (x / c is linear, handled by arith first)
    else:
        return False
    others = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node) and a is not var[0]]
    tm_ok = all(
        (ctx.shape(a) is None or int(torch.Size(ctx.shape(a)).numel()) == 1) for a in others
    )
    return ok_pos and tm_ok and ctx.shape(node) == ctx.shape(var[0])


class ElementwiseUnit(Unit):
    """Δy = f(z + Δ) - f(z) at the touched pixels / elements; z is updated in place."""

    kind = "elementwise"
    has_dense = True
    break_even = 0.15

    def seed(self, env: Env) -> Any:
        src = self.var_nodes[0]
        x = env(src)
        self.f = elementwise_fn(self.node, src, env)
        self.act = activation_code(self.node, src)
        self.prune = self.node.target in FLAT
        self.state = RowState(x, self.config.acc_dtype(x.dtype))
        y = given(env, self.node)
        if y is None:
            y = self.f(x)
        self.out_shape = tuple(y.shape)
        return y

    def given_nodes(self) -> list[fx.Node]:
        return [self.node]

    def __call__(self, d: Delta) -> Delta:
        if self.state.rows:
            if not isinstance(d, PixelDelta):
                d = pixels_from_dense(d)
            dy = self.state.step_delta(d, self.f, self.config.exact, self.act)
            return emit(d, dy, self.out_shape, self.prune)
        return self.state.step_dense(to_dense(d, self.out_shape), self.f, self.config.exact)

    def dense_call(self, d: Delta) -> Delta:
        """Same Δy as `__call__`, computed on every row."""
        if not self.state.rows:
            return self(d)
        rows = d.to_rows() if isinstance(d, PixelDelta) else pixels_from_dense(d).to_rows()
        return emit_all(self.state.step_all(rows, self.f, self.config.exact), self.out_shape)


@register(*functions(*ops.ELEMENTWISE, operator.pow), accepts=is_elementwise)
def _elementwise(node: fx.Node, ctx: BuildContext) -> Unit:
    return ElementwiseUnit(node, ctx.var_nodes(node))


def fusable_activation(node: fx.Node, ctx: BuildContext) -> fx.Node | None:
    """The single user of `node` if it is an elementwise activation of it (to fuse into a conv/linear unit)."""
    users = list(node.users)
    if len(users) != 1:
        return None
    act = users[0]
    if act.op != "call_function" or act.target not in ops.ELEMENTWISE or not is_elementwise(act, ctx):
        return None
    return act if act.args[:1] == (node,) else None
