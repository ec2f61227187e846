"""Linear units (nn.Linear / F.linear with constant weights), optionally fused with the following activation.

Δy = Δx @ Wᵀ (no bias) over the last dimension. Inputs flow as dense deltas (or a PixelDelta when the input is 4-D,
which is densified). Fused activation: state = full pre-activation z; Δy = f(z + Δz) - f(z).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva.delta.activation import activation_code, elementwise_fn, fusable_activation
from deluceva.delta.base import Delta, Env, Unit, pixels_from_dense, to_dense, wrap
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, modules, register
from deluceva.delta.state import RowState


class LinearUnit(Unit):
    """nn.Linear / F.linear (+ fused activation)."""

    kind = "linear"
    filtered = True

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], module: nn.Module | None,
                 act: fx.Node | None) -> None:
        super().__init__(node, var_nodes, module)
        self.act_node = act
        self.fused = [act] if act is not None else []
        if act is not None:
            self.kind += "+" + str(getattr(act.target, "__name__", act.target))

    def seed(self, env: Env) -> Any:
        x = env(self.var_nodes[0])
        if self.module is not None:
            w, b = self.module.weight, self.module.bias
        else:
            args, kwargs = self.materialize(env)
            w = kwargs.get("weight", args[1] if len(args) > 1 else None)
            b = kwargs.get("bias", args[2] if len(args) > 2 else None)
        self.w = w.detach()
        z = F.linear(x, self.w, None if b is None else b.detach())
        self.in_shape, self.out_shape = tuple(x.shape), tuple(z.shape)
        rows = max(1, x.numel() // max(1, x.shape[-1]))
        self.dense_macs = rows * self.w.shape[0] * self.w.shape[1]
        if self.act_node is None:
            return z
        self.f = elementwise_fn(self.act_node, self.node, env)
        self.act = activation_code(self.act_node, self.node)
        self.state = RowState(z, self.config.acc_dtype(z.dtype))
        return self.f(z)

    def __call__(self, d: Delta) -> Delta:
        if d is None:
            self.macs = 0
            return None
        dx = to_dense(d, self.in_shape)
        self.macs = int(torch.count_nonzero(dx)) * self.w.shape[0]
        dz = F.linear(dx, self.w)
        if self.act_node is None:
            return wrap(dz)
        if self.state.rows:
            pd = pixels_from_dense(dz)
            if not pd.active:
                return None
            dy = self.state.step(pd.index, pd.values, self.f, self.config.exact, self.act)
            return PixelDelta(pd.index, dy, pd.shape)
        return self.state.step_dense(dz, self.f, self.config.exact)


def _static_weights(node: fx.Node, ctx: BuildContext) -> bool:
    var = ctx.var_nodes(node)
    return len(var) == 1 and node.args[:1] == (var[0],)


@register(*modules(nn.Linear), *functions(F.linear), accepts=_static_weights)
def _linear(node: fx.Node, ctx: BuildContext) -> Unit:
    return LinearUnit(node, ctx.var_nodes(node), ctx.module(node), fusable_activation(node, ctx))
