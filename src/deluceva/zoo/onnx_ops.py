"""ONNX compute operators on data tensors -> torch modules/calls in the fx graph; the op table `OPS`.

Each handler takes the builder, the ONNX node, its input values (Const | Dyn | None) and its attributes, and returns
the output values. Sizes are never read from the probe into the graph when a size-generic form exists (resizes become
scale factors); where a value only holds at the probe size, the node is recorded in `Builder.frozen`.
Here: elementwise ops, conv / linear / batch norm, pooling, resize. Layout ops are in `onnx_layout`.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from deluceva.zoo.onnx_builder import Builder, Const, Dyn, Value

Ins = list[Value | None]  # a node's inputs, None where an optional input is left out
Attrs = dict[str, Any]  # a node's attributes
Outs = list[Value]
Handler = Callable[[Builder, onnx.NodeProto, Ins, Attrs], Outs]
OPS: dict[str, Handler] = {}


def op(*names: str) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        for n in names:
            OPS[n] = fn
        return fn

    return deco


def data_input(b: Builder, node: onnx.NodeProto, v: Value | None, what: str = "X") -> Dyn:
    if not isinstance(v, Dyn):
        raise b.unsupported(node, f"input {what} must be computed from the image")
    return v


def optional_input(ins: list[Value | None], i: int) -> Value | None:
    """Optional input i (None when absent or given as an empty tensor name)."""
    return ins[i] if len(ins) > i else None


def int_list(a: np.ndarray) -> list[int]:
    return [int(v) for v in np.asarray(a).reshape(-1)]


# ---------------------------------------------------------------- elementwise
_UNARY: dict[str, Callable[..., Any]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Exp": torch.exp,
    "HardSwish": F.hardswish,
    "Neg": torch.neg,
    "Sqrt": torch.sqrt,
    "Abs": torch.abs,
    "Softplus": F.softplus,
}


@op(*_UNARY)
def _unary(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    return [b.call(_UNARY[node.op_type], data_input(b, node, ins[0]))]


@op("LeakyRelu")
def _leaky(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    return [b.call(F.leaky_relu, data_input(b, node, ins[0]), float(at.get("alpha", 0.01)))]


@op("Elu")
def _elu(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    return [b.call(F.elu, data_input(b, node, ins[0]), float(at.get("alpha", 1.0)))]


@op("Clip")
def _clip(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    if b.opset < 11:
        lo, hi = at.get("min", -math.inf), at.get("max", math.inf)
    else:
        lo_v, hi_v = optional_input(ins, 1), optional_input(ins, 2)
        lo = float(b.const(lo_v, node, "min")) if lo_v is not None else -math.inf
        hi = float(b.const(hi_v, node, "max")) if hi_v is not None else math.inf
    if lo == 0.0 and hi == 6.0:
        return [b.call(F.relu6, x)]
    if lo == 0.0 and hi == math.inf:
        return [b.call(F.relu, x)]
    return [b.call(torch.clamp, x, None if lo == -math.inf else lo, None if hi == math.inf else hi)]


@op("HardSigmoid")
def _hardsigmoid(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    alpha, beta = float(at.get("alpha", 0.2)), float(at.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return [b.call(F.hardsigmoid, x)]
    y = b.call(operator.add, b.call(operator.mul, x, alpha), beta)
    return [b.call(torch.clamp, y, 0.0, 1.0)]


_BINARY = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


@op(*_BINARY)
def _binary(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    a, c = ins[0], ins[1]
    ndim = max(v.ndim if isinstance(v, Dyn) else v.value.ndim for v in (a, c))
    return [b.call(_BINARY[node.op_type], b.operand(a, node, ndim), b.operand(c, node, ndim))]


@op("Pow")
def _pow(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    return [b.call(torch.pow, x, b.operand(ins[1], node, x.ndim))]


@op("Softmax")
def _softmax(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    axis = int(at.get("axis", -1 if b.opset >= 13 else 1)) % x.ndim
    if b.opset >= 13 or axis == x.ndim - 1:
        return [b.call(F.softmax, x, dim=axis)]
    # opset < 13: softmax over all dims from `axis` on, flattened
    flat = b.call(torch.flatten, x, axis)
    y = b.call(F.softmax, flat, dim=axis)
    b.freeze(node)
    return [b.call(torch.unflatten, y, axis, x.shape[axis:])]


# ---------------------------------------------------------------- conv / linear / norm
def _pads_2d(b: Builder, node: onnx.NodeProto, at: Attrs, in_hw, k, strides, dil) -> list[int]:
    """[top, left, bottom, right] from pads or auto_pad (computed at the probe size for SAME)."""
    auto = at.get("auto_pad", "NOTSET")
    if auto in ("NOTSET", ""):
        p = list(at.get("pads", [0, 0, 0, 0]))
        if len(p) != 4:
            raise b.unsupported(node, "only 2-D spatial ops")
        return p
    if auto == "VALID":
        return [0, 0, 0, 0]
    total = [
        max((math.ceil(i / s) - 1) * s + (kk - 1) * d + 1 - i, 0)
        for i, s, kk, d in zip(in_hw, strides, k, dil, strict=True)
    ]
    lo = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
    if any(s > 1 for s in strides):
        b.freeze(node)
    return [lo[0], lo[1], total[0] - lo[0], total[1] - lo[1]]


def _pad_input(b: Builder, x: Dyn, pads: list[int], value: float) -> tuple[Dyn, tuple[int, int]]:
    """Symmetric pads stay in the op's padding; asymmetric ones become an explicit F.pad."""
    t, left, bot, r = pads
    if t == bot and left == r:
        return x, (t, left)
    return b.call(F.pad, x, (left, r, t, bot), "constant", value), (0, 0)


@op("Conv")
def _conv(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    w = b.const(ins[1], node, "W").astype(np.float32)
    bias_v = optional_input(ins, 2)
    bias = b.const(bias_v, node, "B").astype(np.float32) if bias_v is not None else None
    if w.ndim != 4 or x.ndim != 4:
        raise b.unsupported(node, "only 2-D convolutions (4-D input and weight)")
    k = tuple(w.shape[2:])
    strides = tuple(at.get("strides", [1, 1]))
    dil = tuple(at.get("dilations", [1, 1]))
    group = int(at.get("group", 1))
    x, padding = _pad_input(b, x, _pads_2d(b, node, at, x.shape[2:], k, strides, dil), 0.0)
    conv = nn.Conv2d(w.shape[1] * group, w.shape[0], k, strides, padding, dil, group, bias=bias is not None)
    conv.weight.data = torch.from_numpy(w.copy())
    if bias is not None:
        conv.bias.data = torch.from_numpy(bias.copy())
    return [b.module(node, conv, x)]


@op("BatchNormalization")
def _batchnorm(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    scale, bias, mean, var = (
        b.const(ins[i], node, n).astype(np.float32) for i, n in ((1, "scale"), (2, "B"), (3, "mean"), (4, "var"))
    )
    cls = nn.BatchNorm2d if x.ndim == 4 else nn.BatchNorm1d
    bn = cls(len(scale), eps=float(at.get("epsilon", 1e-5)))
    for t, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
        t.data = torch.from_numpy(v.copy())
    return [b.module(node, bn, x)]


def _linear(b: Builder, node: onnx.NodeProto, x: Dyn, weight: np.ndarray, bias: np.ndarray | None) -> Dyn:
    """nn.Linear with weight (out, in)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    lin.weight.data = torch.from_numpy(np.ascontiguousarray(weight, np.float32))
    if bias is not None:
        lin.bias.data = torch.from_numpy(np.ascontiguousarray(bias, np.float32))
    return b.module(node, lin, x)


@op("Gemm")
def _gemm(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    a = data_input(b, node, ins[0], "A")
    if at.get("transA", 0):
        a = b.call(torch.transpose, a, 0, 1)
    bm = b.const(ins[1], node, "B").astype(np.float32)
    weight = float(at.get("alpha", 1.0)) * (bm if at.get("transB", 0) else bm.T)
    c_v = optional_input(ins, 2)
    bias = None
    if c_v is not None:
        c = float(at.get("beta", 1.0)) * b.const(c_v, node, "C").astype(np.float32)
        bias = np.broadcast_to(c.reshape(-1) if c.size in (1, weight.shape[0]) else c, (weight.shape[0],)).copy()
    return [_linear(b, node, a, weight, bias)]


@op("MatMul")
def _matmul(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    a, m = ins[0], ins[1]
    if isinstance(a, Dyn) and isinstance(m, Const) and m.value.ndim == 2:
        return [_linear(b, node, a, m.value.astype(np.float32).T, None)]
    return [b.call(torch.matmul, b.operand(a, node, 2), b.operand(m, node, 2))]


# ---------------------------------------------------------------- pooling / resize
@op("MaxPool")
def _maxpool(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    if len(node.output) > 1 and node.output[1]:
        raise b.unsupported(node, "the Indices output")
    k = tuple(at["kernel_shape"])
    if len(k) != 2:
        raise b.unsupported(node, "only 2-D pooling")
    strides = tuple(at.get("strides", [1, 1]))
    dil = tuple(at.get("dilations", [1, 1]))
    x, padding = _pad_input(b, x, _pads_2d(b, node, at, x.shape[2:], k, strides, dil), -math.inf)
    return [b.call(F.max_pool2d, x, k, strides, padding, dil, bool(at.get("ceil_mode", 0)))]


@op("AveragePool")
def _avgpool(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    k = tuple(at["kernel_shape"])
    if len(k) != 2 or tuple(at.get("dilations", [1, 1])) != (1, 1):
        raise b.unsupported(node, "only 2-D, undilated average pooling")
    strides = tuple(at.get("strides", [1, 1]))
    include = bool(at.get("count_include_pad", 0))
    pads = _pads_2d(b, node, at, x.shape[2:], k, strides, (1, 1))
    if (pads[0] != pads[2] or pads[1] != pads[3]) and not include:
        raise b.unsupported(node, "asymmetric pads with count_include_pad=0")
    x, padding = _pad_input(b, x, pads, 0.0)
    return [b.call(F.avg_pool2d, x, k, strides, padding, bool(at.get("ceil_mode", 0)), include)]


@op("GlobalAveragePool")
def _gap(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    return [b.call(F.adaptive_avg_pool2d, data_input(b, node, ins[0]), 1)]


@op("GlobalMaxPool")
def _gmp(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    return [b.call(F.adaptive_max_pool2d, data_input(b, node, ins[0]), 1)]


def _scale_float(s: float) -> float:
    return float(round(s)) if abs(s - round(s)) < 1e-6 else float(s)


@op("Resize", "Upsample")
def _resize(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    if x.ndim != 4:
        raise b.unsupported(node, "only 4-D (N, C, H, W) inputs")
    mode = at.get("mode", "nearest")
    if node.op_type == "Upsample" or b.opset < 11:
        ctm, nearest = "asymmetric", "floor"
        scales = np.asarray(at["scales"]) if "scales" in at else b.const(ins[1], node, "scales")
        sized = False
    else:
        ctm = at.get("coordinate_transformation_mode", "half_pixel")
        nearest = at.get("nearest_mode", "round_prefer_floor")
        sc, sz = optional_input(ins, 2), optional_input(ins, 3)
        if sz is not None and b.const(sz, node, "sizes").size:
            sizes = b.const(sz, node, "sizes").astype(np.float64)
            scales = sizes / np.asarray(x.shape, np.float64)
            # sizes computed from the input's shape (k * in) become the scale factor k; other ratios hold at the
            # probe size only
            sized = not all(s == round(s) or (1 / s) == round(1 / s) for s in scales)
        else:
            scales, sized = b.const(sc, node, "scales"), bool(getattr(sc, "sized", False))
    scales = [float(s) for s in np.asarray(scales, np.float64).reshape(-1)]
    if len(scales) != 4 or scales[0] != 1.0 or scales[1] != 1.0:
        raise b.unsupported(node, f"scales {scales} (only spatial resizing of 4-D maps)")
    if sized:
        b.freeze(node)
    sf = (_scale_float(scales[2]), _scale_float(scales[3]))
    integer_up = all(s >= 1 and s == round(s) for s in sf)
    if mode == "nearest":
        if (ctm == "asymmetric" and nearest == "floor") or integer_up:
            tmode = "nearest"
        elif ctm in ("half_pixel", "pytorch_half_pixel") and nearest == "round_prefer_ceil":
            tmode = "nearest-exact"
        else:
            raise b.unsupported(node, f"nearest resize with {ctm}/{nearest} at scale {sf}")
        return [b.call(F.interpolate, x, scale_factor=sf, mode=tmode)]
    if mode in ("linear", "cubic"):
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise b.unsupported(node, f"{mode} resize with coordinate_transformation_mode={ctm}")
        tmode = "bilinear" if mode == "linear" else "bicubic"
        return [b.call(F.interpolate, x, scale_factor=sf, mode=tmode, align_corners=ctm == "align_corners")]
    raise b.unsupported(node, f"resize mode {mode!r}")
