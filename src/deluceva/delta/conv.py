"""Conv units: conv2d (any kernel/stride/padding/dilation/groups, depthwise) and conv_transpose2d, optionally fused
with the following elementwise activation.

Sparse op (no bias): Δy = conv(Δx) at the affected output pixels. `make_conv_op` picks the implementation behind one
function boundary: the fast kernels of `deluceva.delta.kernels` when present (input-centric GEMM + scatter-add), else
exact torch fallbacks (1x1: gather-GEMM; otherwise F.conv2d on the densified delta).
Fused activation: state = pre-activation z rows (N*Ho*Wo, Cout) incl. bias; Δy = f(z + Δz) - f(z) at affected pixels.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva.delta import kernels_bridge
from deluceva.delta.activation import (
    FLAT,
    activation_code,
    elementwise_fn,
    emit,
    emit_all,
    emit_rows,
    fusable_activation,
)
from deluceva.delta.base import (
    Delta,
    Env,
    LazyValue,
    Unit,
    given,
    lazy_seeding,
    pixels_from_dense,
    shape_of,
    to_pixels,
)
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, functions, modules, register
from deluceva.delta.state import RowState

ConvOp = Callable[[PixelDelta], PixelDelta]


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


class TorchConvDelta:
    """Exact reference sparse conv: 1x1 (padding 0, groups 1) as gather-GEMM, otherwise conv of the dense delta."""

    def __init__(self, weight: torch.Tensor, dense_fn: Callable[[torch.Tensor], torch.Tensor],
                 in_shape: tuple, out_shape: tuple, stride: Any = 1, direct: bool = False) -> None:
        self.dense_fn = dense_fn
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        self.direct = direct
        self.stride = _pair(stride)
        if direct:
            self.wmat = weight.detach().reshape(weight.shape[0], -1).t().contiguous()  # (Cin, Cout)

    def __call__(self, d: PixelDelta) -> PixelDelta:
        if not self.direct:
            return pixels_from_dense(self.dense_fn(d.to_dense()))
        idx, vals = d.index, d.values
        sy, sx = self.stride
        if (sy, sx) != (1, 1):
            n, _, h, w = self.in_shape
            _, _, ho, wo = self.out_shape
            b, r = idx.div(h * w, rounding_mode="floor"), idx.remainder(h * w)
            y, x = r.div(w, rounding_mode="floor"), r.remainder(w)
            keep = ((y.remainder(sy) == 0) & (x.remainder(sx) == 0)).nonzero().squeeze(1)
            idx = b[keep] * (ho * wo) + y[keep].div(sy, rounding_mode="floor") * wo + x[keep].div(
                sx, rounding_mode="floor"
            )
            vals = vals.index_select(0, keep)
        return PixelDelta(idx, vals @ self.wmat, self.out_shape)  # type: ignore[arg-type]


def make_conv_op(weight: torch.Tensor, in_shape: tuple, out_shape: tuple, stride: Any, padding: Any, dilation: Any,
                 groups: int, padding_mode: str = "zeros") -> ConvOp:
    """The sparse delta conv2d for one input shape (kernel when available, else the torch fallback)."""
    w = weight.detach()

    def dense_fn(dx: torch.Tensor) -> torch.Tensor:
        if padding_mode != "zeros":
            pad = _pair(padding)
            dx = F.pad(dx, (pad[1], pad[1], pad[0], pad[0]), mode=padding_mode)
            return F.conv2d(dx, w, None, stride, 0, dilation, groups)
        return F.conv2d(dx, w, None, stride, padding, dilation, groups)

    numeric = not isinstance(padding, str) or padding == "valid"
    if padding_mode == "zeros" and numeric:
        op = kernels_bridge.sparse_conv2d(w, in_shape, stride, 0 if padding == "valid" else padding, dilation, groups)
        if op is not None:
            return op
    direct = (
        w.shape[2:] == (1, 1) and groups == 1 and padding_mode == "zeros" and numeric
        and (padding == "valid" or _pair(padding) == (0, 0))
    )
    return TorchConvDelta(w, dense_fn, in_shape, out_shape, stride, direct)


def make_conv_transpose_op(weight: torch.Tensor, in_shape: tuple, out_shape: tuple, stride: Any, padding: Any,
                           output_padding: Any, groups: int, dilation: Any) -> ConvOp:
    """The sparse delta conv_transpose2d for one input shape."""
    w = weight.detach()
    op = kernels_bridge.sparse_conv_transpose2d(w, in_shape, stride, padding, output_padding, groups, dilation)
    if op is not None:
        return op

    def dense_fn(dx: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(dx, w, None, stride, padding, output_padding, groups, dilation)

    return TorchConvDelta(w, dense_fn, in_shape, out_shape)


def conv_break_even(weight: torch.Tensor, groups: int, transpose: bool) -> float:
    """Incoming active fraction above which the dense form of a conv is faster than the sparse kernel.

    From the per-operator benchmark (bench/results/ops.json, 1 thread), shifted up for the dense form's extra work
    (densifying the delta, finding the non-zero output rows): depthwise ~15%, 1x1 ~40%, others ~50%; the RGB first
    conv and thin convs (Cin*K <= 150) ~10% (YOLOv5n's 6x6 RGB conv at 768x448: the gathered sparse form 3.7 ms at
    10% clustered input pixels, the dense form 4-5 ms). A profile's measured break-evens replace these.
    """
    cin_g = weight.shape[0] // groups if transpose else weight.shape[1]
    k = weight.shape[2] * weight.shape[3]
    if groups > 1 and cin_g == 1:
        return 0.15
    if k == 1:
        return 0.4
    return 0.1 if cin_g * k <= 150 else 0.5


class ConvUnit(Unit):
    """conv2d / conv_transpose2d (+ fused activation). Input: the data tensor's PixelDelta; output: PixelDelta.

    Dense form (`dense_call`): F.conv2d of the densified delta, the state updated on every row.
    """

    kind = "conv"
    filtered = True  # a filter sits in front of the data input
    has_dense = True
    _fused_small = False  # conv + activation step in one kernel call for few pixels (set at seed)

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], module: nn.Module | None,
                 act: fx.Node | None, transpose: bool) -> None:
        super().__init__(node, var_nodes, module)
        self.act_node = act
        self.transpose = transpose
        self.kind = "conv_transpose" if transpose else "conv"
        if act is not None:
            self.kind += "+" + str(getattr(act.target, "__name__", act.target))
        self.fused = [act] if act is not None else []
        self._ops: dict[tuple, ConvOp] = {}

    def _params(self, env: Env) -> dict[str, Any]:
        m = self.module
        if m is not None:
            p = {"weight": m.weight, "bias": m.bias, "stride": m.stride, "padding": m.padding,
                 "dilation": m.dilation, "groups": m.groups, "padding_mode": getattr(m, "padding_mode", "zeros")}
            if self.transpose:
                p["output_padding"] = m.output_padding
            return p
        args, kwargs = self.materialize(env)
        names = (["input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation"]
                 if self.transpose else ["input", "weight", "bias", "stride", "padding", "dilation", "groups"])
        p = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0,
             "padding_mode": "zeros"}
        p.update(dict(zip(names, args, strict=False)))
        p.update(kwargs)
        return p

    def _dense_forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, p: dict[str, Any]
                       ) -> torch.Tensor:
        """The op on full values: z (N, Cout, Ho, Wo)."""
        if self.module is not None and not self.transpose:
            return self.module._conv_forward(x, w, b)
        if self.transpose:
            op_args = (p["stride"], p["padding"], p["output_padding"], p["groups"], p["dilation"])
            return F.conv_transpose2d(x, w, b, *op_args)
        return F.conv2d(x, w, b, p["stride"], p["padding"], p["dilation"], p["groups"])

    def seed(self, env: Env) -> Any:
        z = given(env, self.node)
        src = self.var_nodes[0]
        # a given pre-activation needs only the input's shape (module convs: the weights are attributes)
        x = env(src) if z is None or self.module is None else None
        p = self._params(env)
        self.p = p
        w = p["weight"].detach()
        b = p["bias"].detach() if p["bias"] is not None else None
        if z is None:
            z = self._dense_forward(x, w, b, p)
        in_shape, out_shape = shape_of(env, src), tuple(z.shape)
        key = (in_shape, out_shape)
        if key not in self._ops:
            if self.transpose:
                self._ops[key] = make_conv_transpose_op(
                    w, in_shape, out_shape, p["stride"], p["padding"], p["output_padding"], p["groups"],
                    p["dilation"],
                )
            else:
                self._ops[key] = make_conv_op(
                    w, in_shape, out_shape, p["stride"], p["padding"], p["dilation"], p["groups"], p["padding_mode"]
                )
        self.op = self._ops[key]
        self._dense_fn = getattr(self.op, "dense", None) or self.op.dense_fn
        self.break_even = conv_break_even(w, int(p["groups"]), self.transpose)
        self.out_shape = out_shape
        k = w.shape[2] * w.shape[3]
        if self.transpose:  # weight (Cin, Cout/g, kh, kw): each input pixel feeds k*Cout/g outputs per channel
            self.macs_per_pixel = w.shape[0] * k * w.shape[1]
            self.dense_macs = in_shape[0] * in_shape[2] * in_shape[3] * self.macs_per_pixel
        else:
            self.macs_per_pixel = w.shape[1] * k * w.shape[0]
            self.dense_macs = out_shape[0] * out_shape[2] * out_shape[3] * self.macs_per_pixel
        if self.act_node is None:
            return z
        self.f = elementwise_fn(self.act_node, self.node, env)
        self.act = activation_code(self.act_node, self.node)
        self.prune = self.act_node.target in FLAT
        self.state = RowState(z, self.config.acc_dtype(z.dtype), adopt=True)  # z: given or computed here
        # conv + activation in one kernel call for few pixels (kernels' scatter convs, fused activation codes)
        self._fused_small = (self.act is not None and hasattr(self.op, "run_small_act")
                             and self.state.z_np is not None and z.dtype == torch.float32)
        y = given(env, self.act_node)
        if y is None and lazy_seeding(env):  # the next convs need only its shape: computed when a unit needs it
            return LazyValue(functools.partial(self.f, z), z.shape, z.dtype)
        return self.f(z) if y is None else y

    def given_nodes(self) -> list[fx.Node]:
        return [self.node]  # the activation is computed from it when needed (LazyValue)

    def row_nodes(self) -> list[fx.Node]:
        return [self.node] if self.act_node is not None else []  # without activation z is also the unit's output

    def __call__(self, d: Delta) -> Delta:
        if not isinstance(d, PixelDelta):
            d = to_pixels(d)
            if d is None:
                self.macs = 0
                return None
        self.macs = d.active * self.macs_per_pixel
        if self._fused_small:
            st = self.state
            r = self.op.run_small_act(d, st.z_np, self.act[0], self.act[1], self.config.exact)
            if r is not None:
                return emit_rows(r[0], r[1], self.out_shape, self.prune)
        dz = self.op(d)
        if dz.active == 0:
            return None
        if self.act_node is None:
            return dz
        return emit(dz, self.state.step_delta(dz, self.f, self.config.exact, self.act), dz.shape, self.prune)

    def dense_call(self, d: Delta) -> Delta:
        """Same Δy as `__call__`, computed as a dense conv of the densified delta."""
        d = to_pixels(d)
        if d is None:
            self.macs = 0
            return None
        self.macs = self.dense_macs
        dz = self._dense_fn(d.to_dense())  # channels-last in and out (the kernels' dense conv)
        n, c, h, w = dz.shape
        rows = dz.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if self.act_node is None:
            return emit_all(rows, self.out_shape)
        if self._fused_small and not self.config.exact and rows.dtype == torch.float32:
            # the state and f only where the output delta is non-zero: one numba pass over the rows
            idx, dy = kernels_bridge.step_act_rows(self.state.z_np, rows, self.act)
            return emit_rows(idx, dy, self.out_shape, self.prune)
        return emit_all(self.state.step_all(rows, self.f, self.config.exact), self.out_shape)


def _static_params(node: fx.Node, ctx: BuildContext) -> bool:
    """Only the data input varies (weights/bias are constants) and the data input is 4-D."""
    var = ctx.var_nodes(node)
    return len(var) == 1 and node.args[:1] == (var[0],) and len(ctx.shape(var[0]) or ()) == 4


@register(*modules(nn.Conv2d), *functions(F.conv2d), accepts=_static_params)
def _conv(node: fx.Node, ctx: BuildContext) -> Unit:
    act = fusable_activation(node, ctx)
    return ConvUnit(node, ctx.var_nodes(node), ctx.module(node), act, transpose=False)


def _transpose_ok(node: fx.Node, ctx: BuildContext) -> bool:
    return _static_params(node, ctx) and "output_size" not in node.kwargs and len(node.args) <= 1 + (
        0 if node.op == "call_module" else 7
    )


@register(*modules(nn.ConvTranspose2d), *functions(F.conv_transpose2d), accepts=_transpose_ok)
def _conv_transpose(node: fx.Node, ctx: BuildContext) -> Unit:
    act = fusable_activation(node, ctx)
    return ConvUnit(node, ctx.var_nodes(node), ctx.module(node), act, transpose=True)
