"""ONNX layout operators on data tensors (concat, reshape, slice, split, pad, ...) -> size-generic torch calls.

Reshapes become flatten/unflatten around the dims they keep (batch and spatial dims stay symbolic), slice ends past
a dim's end become open, no-op expands vanish. Handlers register in `onnx_ops.OPS`.
"""

from __future__ import annotations

import math
import operator

import numpy as np
import onnx
import torch
import torch.nn.functional as F

from deluceva.zoo.onnx_builder import Builder, Const, Dyn
from deluceva.zoo.onnx_ops import Attrs, Ins, Outs, data_input, int_list, op, optional_input


@op("Concat")
def _concat(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    dyn = next(v for v in ins if isinstance(v, Dyn))
    parts = [b.buffer(v, node) if isinstance(v, Const) else v for v in ins if v is not None]
    return [b.call(torch.cat, parts, dim=int(at["axis"]) % dyn.ndim)]


def _resolve_target(shape_in: tuple[int, ...], target: list[int], allowzero: bool) -> list[int]:
    t = [shape_in[i] if (v == 0 and not allowzero) else v for i, v in enumerate(target)]
    if -1 in t:
        known = math.prod(v for v in t if v != -1)
        t[t.index(-1)] = math.prod(shape_in) // max(known, 1)
    return t


def _reshape_generic(b: Builder, x: Dyn, t: list[int]) -> Dyn:
    """x.reshape(t) as flatten/unflatten of the dims that change, keeping the common leading/trailing dims.

    Dims kept unchanged at the front and back (batch, spatial sizes) stay symbolic, so the op holds at other input
    sizes; of the changed middle, a flatten keeps its size generic and an unflatten gets -1 at its largest part.
    """
    s = list(x.shape)
    if s == t:
        return x
    p = 0
    while p < min(len(s), len(t)) and s[p] == t[p]:
        p += 1
    q = 0
    while q < min(len(s), len(t)) - p and s[len(s) - 1 - q] == t[len(t) - 1 - q]:
        q += 1
    ms, mt = s[p : len(s) - q], t[p : len(t) - q]
    y = x
    if len(ms) == 0:
        y = b.call(torch.unsqueeze, y, p)
    elif len(ms) > 1:
        y = b.call(torch.flatten, y, p, p + len(ms) - 1)
    if len(mt) == 0:
        y = b.call(torch.squeeze, y, p)
    elif len(mt) > 1:
        sizes = list(mt)
        sizes[int(np.argmax(sizes))] = -1
        y = b.call(torch.unflatten, y, p, tuple(sizes))
    return y


@op("Reshape")
def _reshape(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    t = _resolve_target(x.shape, int_list(b.const(ins[1], node, "shape")), bool(at.get("allowzero", 0)))
    if math.prod(t) != math.prod(x.shape):
        raise b.unsupported(node, f"cannot reshape {x.shape} to {t}")
    return [_reshape_generic(b, x, t)]


@op("Flatten")
def _flatten(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    axis = int(at.get("axis", 1)) % (x.ndim + 1)
    if axis == 0:
        return [b.call(torch.unsqueeze, b.call(torch.flatten, x), 0)]
    y = b.call(torch.flatten, x, axis) if axis < x.ndim else b.call(torch.unsqueeze, x, -1)
    return [b.call(torch.flatten, y, 0, axis - 1) if axis > 1 else y]


@op("Transpose")
def _transpose(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    perm = tuple(at.get("perm", list(range(x.ndim))[::-1]))
    return [b.call(torch.permute, x, perm)]


def _axes(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs, idx: int) -> list[int] | None:
    if "axes" in at:
        return list(at["axes"])
    v = optional_input(ins, idx)
    return int_list(b.const(v, node, "axes")) if v is not None else None


@op("Unsqueeze")
def _unsqueeze(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    axes = _axes(b, node, ins, at, 1) or []
    out_rank = x.ndim + len(axes)
    y = x
    for a in sorted(a % out_rank for a in axes):
        y = b.call(torch.unsqueeze, y, a)
    return [y]


@op("Squeeze")
def _squeeze(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    axes = _axes(b, node, ins, at, 1)
    if axes is None:
        axes = [i for i, s in enumerate(x.shape) if s == 1]
    return [b.call(torch.squeeze, x, tuple(a % x.ndim for a in axes))]


@op("Slice")
def _slice(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    if b.opset < 10:
        starts, ends = list(at["starts"]), list(at["ends"])
        axes = list(at.get("axes", range(len(starts))))
        steps = [1] * len(starts)
        sized = False
    else:
        starts, ends = int_list(b.const(ins[1], node, "starts")), int_list(b.const(ins[2], node, "ends"))
        axes = _axes(b, node, ins, {}, 3) or list(range(len(starts)))
        st = optional_input(ins, 4)
        steps = int_list(b.const(st, node, "steps")) if st is not None else [1] * len(starts)
        sized = any(getattr(v, "sized", False) for v in ins[1:])
    index: list[slice] = [slice(None)] * x.ndim
    for s, e, a, k in zip(starts, ends, axes, steps, strict=True):
        a %= x.ndim
        n = x.shape[a]
        if k < 1:
            raise b.unsupported(node, f"step {k} (only positive steps)")
        start = None if s == 0 or s <= -n else s
        stop = None if e >= n else e
        if sized:  # express positions relative to the end so they follow the input size
            start = start - n if (start is not None and start > 0) else start
            stop = stop - n if (stop is not None and stop > 0) else stop
        index[a] = slice(start, stop, None if k == 1 else k)
    return [b.call(operator.getitem, x, tuple(index))]


@op("Split")
def _split(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    axis = int(at.get("axis", 0)) % x.ndim
    n_out = len(node.output)
    if "split" in at:
        sizes = list(at["split"])
    elif optional_input(ins, 1) is not None:
        sizes = int_list(b.const(ins[1], node, "split"))
    else:
        dim = x.shape[axis]
        chunk = -(-dim // n_out)
        sizes = [min(chunk, dim - i * chunk) for i in range(n_out)]
        if axis >= 2:
            b.freeze(node)
    parts = b.call(torch.split, x, sizes, axis)
    return [b.call(operator.getitem, parts, i) for i in range(n_out)]


@op("Pad")
def _pad(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    if b.opset < 11:
        pads, value = list(at["pads"]), float(at.get("value", 0.0))
    else:
        pads = int_list(b.const(ins[1], node, "pads"))
        cv = optional_input(ins, 2)
        value = float(b.const(cv, node, "constant_value").reshape(-1)[0]) if cv is not None else 0.0
        if optional_input(ins, 3) is not None:
            raise b.unsupported(node, "the axes input")
    r = x.ndim
    begin, end = pads[:r], pads[r:]
    torch_pads: list[int] = []
    for d in reversed(range(r)):
        torch_pads += [begin[d], end[d]]
    while len(torch_pads) > 2 and torch_pads[-1] == 0 and torch_pads[-2] == 0:
        torch_pads = torch_pads[:-2]
    mode = at.get("mode", "constant")
    if mode == "constant":
        return [b.call(F.pad, x, tuple(torch_pads), "constant", value)]
    tmode = {"reflect": "reflect", "edge": "replicate"}.get(mode)
    if tmode is None:
        raise b.unsupported(node, f"pad mode {mode!r}")
    return [b.call(F.pad, x, tuple(torch_pads), tmode)]


@op("Identity", "Dropout")
def _identity(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    if len(node.output) > 1 and node.output[1]:
        raise b.unsupported(node, "the mask output")
    return [ins[0]]


_DTYPES = {1: torch.float32, 10: torch.float16, 11: torch.float64, 7: torch.int64, 6: torch.int32, 9: torch.bool}


@op("Cast")
def _cast(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    dtype = _DTYPES.get(int(at["to"]))
    if dtype is None:
        raise b.unsupported(node, f"cast to ONNX type {at['to']}")
    return [x if x.probe.dtype == dtype else b.method("to", x, dtype)]


@op("Expand")
def _expand(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    out = tuple(np.broadcast_shapes(x.shape, tuple(int_list(b.const(ins[1], node, "shape")))))
    if out == x.shape:
        return [x]
    if getattr(ins[1], "sized", False):
        b.freeze(node)
    return [b.method("expand", x, out)]


@op("Gather")
def _gather(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    x = data_input(b, node, ins[0])
    idx = b.const(ins[1], node, "indices")
    axis = int(at.get("axis", 0)) % x.ndim
    if idx.ndim == 0:
        return [b.call(torch.select, x, axis, int(idx))]
    if idx.ndim != 1:
        raise b.unsupported(node, "indices of rank > 1")
    return [b.call(torch.index_select, x, axis, b.buffer(Const(idx.astype(np.int64) % x.shape[axis]), node))]


@op("ScatterND")
def _scatter_nd(b: Builder, node: onnx.NodeProto, ins: Ins, at: Attrs) -> Outs:
    data, upd = data_input(b, node, ins[0], "data"), data_input(b, node, ins[2], "updates")
    if at.get("reduction", "none") != "none":
        raise b.unsupported(node, f"reduction {at['reduction']!r}")
    iv = ins[1]
    idx = b.const(iv, node, "indices").astype(np.int64)
    cols = tuple(b.buffer(Const(np.ascontiguousarray(idx[..., k]), iv.sized), node) for k in range(idx.shape[-1]))
    return [b.call(torch.index_put, data, cols, upd)]
