"""Dense units: recompute an op from its stored full inputs (fallback for anything without a cheaper delta form).

`RecomputeUnit` keeps the full value of every varying input, applies the incoming deltas to them, runs the op densely
and emits new_out - old_out. It is exact for any op. Used deliberately for ops whose delta form IS a recomputation
(softmax, normalisations over channels, ...) and as the fallback for unknown ops (those get a warning at conversion).
Inputs with a non-floating dtype flow as `Replace(new_value)` instead of a difference.
`StaticUnit` runs nodes whose value does not change between frames (shapes, constants) during the dense pass only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva.delta.base import Delta, Env, Unit, wrap
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, methods, modules, register


@dataclass
class Replace:
    """Delta of a non-floating tensor (masks, indices): the new full value."""

    value: torch.Tensor


def _own(x: Any, acc: torch.dtype | None = None) -> Any:
    """A private copy of a full value (floating tensors widened to `acc` if given); 4-D float tensors channels-last
    so that PixelDelta rows add in place."""
    if isinstance(x, torch.Tensor):
        dtype = torch.promote_types(x.dtype, acc) if acc is not None and x.is_floating_point() else x.dtype
        if x.dim() == 4 and x.is_floating_point():
            return x.to(dtype, memory_format=torch.channels_last, copy=True)
        return x.to(dtype, copy=True)
    if isinstance(x, tuple | list):
        return type(x)(_own(v, acc) for v in x)
    return x


def dtypes_of(x: Any) -> Any:
    """The dtype tree of a value (tensors -> dtype, tuples map, others None)."""
    if isinstance(x, torch.Tensor):
        return x.dtype
    if isinstance(x, tuple | list):
        return tuple(dtypes_of(v) for v in x)
    return None


def cast(x: Any, dtypes: Any) -> Any:
    """Tensors of a value cast to the dtype tree `dtypes` (no copy where already equal)."""
    if isinstance(x, torch.Tensor):
        return x if dtypes is None or x.dtype == dtypes else x.to(dtypes)
    if isinstance(x, tuple | list):
        return type(x)(cast(v, t) for v, t in zip(x, dtypes, strict=True))
    return x


def apply_delta(full: Any, d: Delta) -> Any:
    """full + d, in place where possible (full must be owned, 4-D channels-last); returns the new full value."""
    if d is None:
        return full
    if isinstance(d, Replace):
        return d.value
    if isinstance(d, PixelDelta):
        n, c, h, w = full.shape
        if full.is_contiguous(memory_format=torch.channels_last):
            full.permute(0, 2, 3, 1).view(n * h * w, c).index_add_(0, d.index, d.values.to(full.dtype))
            return full
        return full + d.to_dense()
    if isinstance(d, tuple | list):
        return type(full)(apply_delta(f, x) for f, x in zip(full, d, strict=True))
    full.add_(d)
    return full


def _storages(x: Any) -> set[int]:
    if isinstance(x, torch.Tensor):
        return {x.untyped_storage().data_ptr()}
    if isinstance(x, tuple | list):
        return set().union(*(_storages(v) for v in x)) if x else set()
    return set()


def diff(new: Any, old: Any) -> Delta:
    """Delta between two full outputs (tree-mapped over tuples)."""
    if isinstance(new, torch.Tensor):
        if not new.is_floating_point():
            return None if torch.equal(new, old) else Replace(new)
        return wrap(new - old)
    if isinstance(new, tuple | list):
        return tuple(diff(a, b) for a, b in zip(new, old, strict=True))
    return None


class RecomputeUnit(Unit):
    """Δy = op(x + Δx) - op(x), recomputed densely from the stored full inputs."""

    kind = "dense"

    def seed(self, env: Env) -> Any:
        self.tmpl = self.template(env)
        values = [env(n) for n in self.var_nodes]
        self.dtypes = [dtypes_of(v) for v in values]
        self.full = [_own(v, self.config.seed_state_dtype) for v in values]
        self.inplace = self.node.op == "call_method" and str(self.node.target).endswith("_")
        out = self.run(*self._args())
        # an output that aliases a stored input (view-like op) would change with it: keep copies then
        self.alias = bool(_storages(out) & _storages(self.full))
        self.out = _own(out) if self.alias else out
        return self.out

    def _args(self) -> tuple[tuple, dict]:
        work = [cast(f, t) for f, t in zip(self.full, self.dtypes, strict=True)]
        return self.tmpl.fill(_own(work) if self.inplace else work)

    def __call__(self, *deltas: Delta) -> Delta:
        self.full = [apply_delta(f, d) for f, d in zip(self.full, deltas, strict=True)]
        new = self.run(*self._args())
        if self.alias:
            new = _own(new)
        out, self.out = diff(new, self.out), new
        return out


class StaticUnit(Unit):
    """A node whose value is fixed for a given input shape: computed in the dense pass, never per delta frame."""

    kind = "static"

    def seed(self, env: Env) -> Any:
        if self.node.op in ("get_attr", "placeholder"):
            return self.module  # the attribute's value fetched at build / the argument's default
        return self.run(*self.materialize(env))


def _make(node: fx.Node, ctx: BuildContext) -> Unit:
    return RecomputeUnit(node, ctx.var_nodes(node), ctx.module(node))


# Ops whose delta form is a recomputation by design (no warning).
register(
    *functions(F.softmax, F.log_softmax, F.layer_norm, F.group_norm, F.normalize, torch.softmax, torch.log_softmax,
               torch.max, torch.amax, torch.min, torch.amin, torch.argmax, torch.argmin, torch.topk, torch.sort,
               F.adaptive_max_pool2d, F.instance_norm),
    *methods("softmax", "log_softmax", "max", "amax", "min", "amin", "argmax", "argmin", "topk", "sort"),
    *modules(nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d, nn.LocalResponseNorm),
)(_make)
