"""Reading an ONNX file (with one-line errors) and evaluating nodes whose inputs are all known at import time.

Constant evaluation covers the shape-only subgraphs (Shape -> Gather -> Cast -> Mul -> Concat -> ...) that exporters
emit to compute sizes: they are run once here, with onnx's reference evaluator, and never reach the torch graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from deluceva.errors import ModelError


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read and check an ONNX file; anything that is not a usable ONNX model raises ModelError (one line)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"ONNX model not found: {p}")
    try:
        model = onnx.load(str(p))
    except Exception as e:  # protobuf DecodeError, truncated file, missing external data, ...
        raise ModelError(f"{p.name}: not a valid ONNX model (cannot parse it: {type(e).__name__})") from None
    if not model.graph.node or not model.graph.input or not model.opset_import:
        raise ModelError(f"{p.name}: not a valid ONNX model (no graph, inputs or opset)")
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{p.name}: not a valid ONNX model ({first})") from None
    return model


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ('' / 'ai.onnx') operator set."""
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return int(o.version)
    raise ModelError("ONNX model does not import the default operator set")


def attributes(node: onnx.NodeProto) -> dict[str, Any]:
    """Node attributes as Python values (strings decoded)."""
    out: dict[str, Any] = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in messages: its name, else its first output."""
    return node.name or (node.output[0] if node.output else "?")


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    at = attributes(node)
    if "value" in at:
        return numpy_helper.to_array(at["value"])
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if key in at:
            return np.asarray(at[key], dtype=dtype)
    raise ModelError(f"ONNX Constant node {node_label(node)!r}: unsupported value attribute {sorted(at)}")


def evaluate_node(node: onnx.NodeProto, inputs: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Outputs of `node` applied to constant `inputs` (None = optional input left out)."""
    if node.op_type == "Constant":
        return [_constant_value(node)]
    names = [n for n, v in zip(node.input, inputs, strict=True) if n and v is not None]
    feeds = {n: v for n, v in zip(node.input, inputs, strict=True) if n and v is not None}
    vinfo = [
        helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(np.asarray(feeds[n]).dtype), None)
        for n in dict.fromkeys(names)
    ]
    outs = [helper.make_tensor_value_info(o, onnx.TensorProto.UNDEFINED, None) for o in node.output if o]
    graph = helper.make_graph([node], "const", vinfo, outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    try:
        res = ReferenceEvaluator(model).run(None, {n: np.asarray(v) for n, v in feeds.items()})
    except Exception as e:
        raise ModelError(
            f"ONNX node {node_label(node)!r} ({node.op_type}): cannot evaluate its constant inputs ({e})"
        ) from None
    return [np.asarray(r) for r in res]
