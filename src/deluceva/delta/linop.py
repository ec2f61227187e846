"""Generic unit for ops that are linear in their varying inputs: Δy = op(Δx) on densified deltas.

Covers reshape/view/permute/transpose/flatten/indexing, bilinear interpolation, average pooling, padding (constant
0), sums and means, cat/stack, ... — exact and simple; the families register sparse specialisations (channel cat,
split, nearest upsample, global average pool) where those are cheaper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from deluceva.delta.base import Delta, Env, Hole, Unit, to_dense, wrap

_VIEW_AS_RESHAPE = {"view": "reshape", "view_as": "reshape_as"}


def _zero_tensors(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor) and obj.is_floating_point():
        return torch.zeros_like(obj)
    if isinstance(obj, tuple | list):
        return type(obj)(_zero_tensors(v) for v in obj)
    return obj


def wrap_tree(out: Any) -> Delta:
    """Dense op output -> flowing delta form (tuples map elementwise)."""
    if isinstance(out, torch.Tensor):
        return wrap(out)
    if isinstance(out, tuple | list):
        return tuple(wrap_tree(v) for v in out)
    return None


class LinearOpUnit(Unit):
    """Δy = op(Δx_1, ..., Δx_k) with the op's constant arguments unchanged.

    zero_static: static floating tensors among the operands are part of the linear combination (cat, stack, setitem
    values) and count as zero deltas. overrides: kwargs replaced for the delta call (e.g. pad value=0).
    """

    kind = "linear_op"

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], module: Any = None, *, zero_static: bool = False,
                 overrides: dict[str, Any] | None = None) -> None:
        super().__init__(node, var_nodes, module)
        self.zero_static = zero_static
        self.overrides = overrides or {}

    def seed(self, env: Env) -> Any:
        tmpl = self.template(env)
        if self.zero_static:
            tmpl.args = _zero_tensors(tmpl.args)
            tmpl.kwargs = {k: (v if isinstance(v, Hole) else _zero_tensors(v)) for k, v in tmpl.kwargs.items()}
        tmpl.kwargs.update(self.overrides)
        self.tmpl = tmpl
        self.in_shapes = [tuple(env(n).shape) for n in self.var_nodes]
        self.in_dtypes = [env(n).dtype for n in self.var_nodes]
        return self.run(*self.materialize(env))

    def __call__(self, *deltas: Delta) -> Delta:
        dense = [to_dense(d, s, t) for d, s, t in zip(deltas, self.in_shapes, self.in_dtypes, strict=True)]
        args, kwargs = self.tmpl.fill(dense)
        if self.node.op == "call_method" and self.node.target in _VIEW_AS_RESHAPE:
            # densified deltas are channels-last: views may not exist, reshape has the same values
            self_obj, *rest = args
            return wrap_tree(getattr(self_obj, _VIEW_AS_RESHAPE[self.node.target])(*rest, **kwargs))
        return wrap_tree(self.run(args, kwargs))
