"""Standalone BatchNorm (not folded into a conv) with running statistics: an affine map per channel.

y = (x - mean) / sqrt(var + eps) * gamma + beta  ->  Δy = Δx * gamma / sqrt(var + eps) (per channel, no shift).
LayerNorm / GroupNorm normalise over channels and are recomputed (dense.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva.delta.arith import _Scale
from deluceva.delta.base import Delta, Env, Unit
from deluceva.delta.registry import BuildContext, functions, modules, register


class BatchNormUnit(Unit):
    """Δy = Δx · s, s = gamma / sqrt(running_var + eps) along dim 1."""

    kind = "batchnorm"

    def seed(self, env: Env) -> Any:
        args, kwargs = self.materialize(env)
        out = self.run(args, kwargs)
        x = args[0]
        if self.module is not None:
            m = self.module
            var, weight, eps = m.running_var, m.weight, m.eps
        else:
            names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
            p = {"weight": None, "eps": 1e-5, **dict(zip(names, args, strict=False)), **kwargs}
            var, weight, eps = p["running_var"], p["weight"], p["eps"]
        s = torch.rsqrt(var.detach() + eps)
        if weight is not None:
            s = s * weight.detach()
        shape = [1] * x.dim()
        shape[1] = -1
        self.scale = _Scale(s.view(shape), tuple(x.shape), tuple(out.shape), False)
        return out

    def __call__(self, d: Delta) -> Delta:
        return self.scale(d)


def _eval_stats(node: fx.Node, ctx: BuildContext) -> bool:
    if len(ctx.var_nodes(node)) != 1 or node.args[:1] != tuple(ctx.var_nodes(node)):
        return False
    m = ctx.module(node)
    if m is not None:
        return m.running_var is not None and not m.training
    training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
    return training is False


@register(*modules(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), *functions(F.batch_norm), accepts=_eval_stats)
def _batchnorm(node: fx.Node, ctx: BuildContext) -> Unit:
    return BatchNormUnit(node, ctx.var_nodes(node), ctx.module(node))
