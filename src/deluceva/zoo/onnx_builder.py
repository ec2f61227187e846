"""The state of one ONNX -> torch.fx import: the fx Graph being built, its parameters, and a probe run.

Every ONNX tensor is either a `Const` (known at import time: weights, constants, shape arithmetic evaluated at the
probe input size) or a `Dyn` (depends on the image data: an fx Node plus its value on the probe input, from which the
op handlers read shapes). Emitting an op both adds the fx node and runs the op on the probe values.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from torch import fx, nn

from deluceva.errors import ModelError
from deluceva.zoo.onnx_load import node_label


@dataclass
class Const:
    """A tensor known at import time. `sized`: derived from the probe input's size (Shape/Size of a data tensor)."""

    value: np.ndarray
    sized: bool = False


@dataclass
class Dyn:
    """A data tensor: its fx node and its value (or tuple of values) on the probe input."""

    node: fx.Node
    probe: Any

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.probe.shape)

    @property
    def ndim(self) -> int:
        return self.probe.dim()


Value = Const | Dyn


def _sanitize(name: str) -> str:
    s = re.sub(r"\W+", "_", name).strip("_") or "op"
    return f"m_{s}" if s[0].isdigit() else s


class Builder:
    """Accumulates the fx graph, the root module's submodules/buffers, and notes on size-frozen values."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.frozen: list[str] = []  # ONNX nodes whose torch form only holds at the probe input size
        self._names: set[str] = set()

    # ----- naming and errors
    def unique(self, name: str) -> str:
        base = _sanitize(name)
        cand, k = base, 1
        while cand in self._names or hasattr(self.root, cand):
            k += 1
            cand = f"{base}_{k}"
        self._names.add(cand)
        return cand

    @staticmethod
    def unsupported(node: onnx.NodeProto, why: str = "") -> ModelError:
        extra = f": {why}" if why else ""
        return ModelError(f"ONNX op {node.op_type} (node {node_label(node)!r}) is not supported{extra}")

    def freeze(self, node: onnx.NodeProto) -> None:
        """Record that `node` uses values computed for the probe size only."""
        self.frozen.append(node_label(node))

    # ----- inputs
    def const(self, v: Value | None, node: onnx.NodeProto, what: str) -> np.ndarray:
        """The import-time value of input `what`; data-dependent inputs are not supported there."""
        if v is None:
            raise self.unsupported(node, f"missing input {what}")
        if isinstance(v, Dyn):
            raise self.unsupported(node, f"input {what} must be a constant, not computed from the image")
        return v.value

    def placeholder(self, name: str, probe: torch.Tensor) -> Dyn:
        return Dyn(self.graph.placeholder(self.unique(name)), probe)

    # ----- emitting
    def operand(self, v: Value, node: onnx.NodeProto, ndim: int) -> Dyn | float | int:
        """A Const used as a tensor operand: a Python scalar if it broadcasts as one, else a buffer."""
        if isinstance(v, Dyn):
            return v
        if v.value.size == 1 and v.value.ndim <= ndim:
            if v.sized:
                self.freeze(node)
            x = v.value.reshape(()).item()
            return float(x) if v.value.dtype.kind == "f" else int(x)
        return self.buffer(v, node)

    def buffer(self, v: Const, node: onnx.NodeProto) -> Dyn:
        """Register a constant array as a buffer of the root module and read it with get_attr."""
        if v.sized:
            self.freeze(node)
        arr = v.value
        if arr.dtype.kind == "f":
            arr = arr.astype(np.float32)
        t = torch.from_numpy(np.ascontiguousarray(arr).copy())
        name = self.unique(f"{node_label(node)}_const")
        self.root.register_buffer(name, t)
        return Dyn(self.graph.get_attr(name), t)

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Dyn:
        """Emit call_function(fn, args, kwargs) and evaluate it on the probe values."""
        node = self.graph.call_function(fn, _nodes(args), _nodes(kwargs))
        with torch.no_grad():
            probe = fn(*_probes(args), **_probes(kwargs))
        return Dyn(node, probe)

    def method(self, name: str, x: Dyn, *args: Any) -> Dyn:
        """Emit call_method(name) on x."""
        node = self.graph.call_method(name, (x.node, *_nodes(args)))
        with torch.no_grad():
            probe = getattr(x.probe, name)(*_probes(args))
        return Dyn(node, probe)

    def module(self, onnx_node: onnx.NodeProto, mod: nn.Module, x: Dyn) -> Dyn:
        """Add `mod` as a submodule named after the ONNX node and emit call_module on x."""
        name = self.unique(node_label(onnx_node))
        mod.eval()
        self.root.add_module(name, mod)
        node = self.graph.call_module(name, (x.node,))
        with torch.no_grad():
            probe = mod(x.probe)
        return Dyn(node, probe)


def _nodes(a: Any) -> Any:
    return fx.node.map_aggregate(a, lambda v: v.node if isinstance(v, Dyn) else v)


def _probes(a: Any) -> Any:
    if isinstance(a, Dyn):
        return a.probe
    if isinstance(a, tuple):
        return tuple(_probes(v) for v in a)
    if isinstance(a, list):
        return [_probes(v) for v in a]
    if isinstance(a, dict):
        return {k: _probes(v) for k, v in a.items()}
    return a
