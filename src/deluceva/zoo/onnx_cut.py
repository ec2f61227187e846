"""Structural analysis of an ONNX graph: which tensors carry data, where the detection heads end, what to keep.

A tensor is *dynamic* when it depends on the image input through data (not only through Shape/Size). Everything
else (initializers, Constant nodes, shape arithmetic) is known at import time for a given probe input size.
"""

from __future__ import annotations

import onnx

from deluceva.errors import ModelError

SHAPE_OPS = frozenset({"Shape", "Size"})


def dynamic_tensors(graph: onnx.GraphProto, input_name: str) -> set[str]:
    """Names of the tensors that depend on the values (not only the shape) of the input `input_name`."""
    dyn = {input_name}
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            continue
        if any(i in dyn for i in node.input if i):
            dyn.update(o for o in node.output if o)
    return dyn


def head_cut(graph: onnx.GraphProto, dynamic: set[str]) -> list[str]:
    """Tensors feeding the first Reshape on each path from the input to an output, in graph order.

    For YOLO exports these are the raw head maps (YOLOX: Concat(reg, sigmoid(obj), sigmoid(cls)); YOLOv5: the
    three head convs), after which the exporter reshapes, transposes and decodes. Reshapes followed by more
    convolutions (channel shuffles in a backbone) are part of the network, not the decode, and are passed over.
    """
    conv_below = _feeds_conv(graph)
    live = needed_tensors(graph, [o.name for o in graph.output])
    after_reshape: set[str] = set()  # dynamic tensors with a decode Reshape among their ancestors
    first: list[str] = []
    for node in graph.node:
        dyn_in = [i for i in node.input if i in dynamic]
        if not dyn_in:
            continue
        seen = any(i in after_reshape for i in dyn_in)
        if node.op_type == "Reshape" and node.output[0] not in conv_below:
            data = node.input[0]
            if data in dynamic and not seen and node.output[0] in live and data not in first:
                first.append(data)
            seen = True
        if seen:
            after_reshape.update(o for o in node.output if o)
    if not first:
        raise ModelError("cut='heads': the ONNX graph has no Reshape after the head maps (use cut=None)")
    return first


def _feeds_conv(graph: onnx.GraphProto) -> set[str]:
    """Tensors from which a Conv (or ConvTranspose/Gemm/MatMul) is reachable."""
    below: set[str] = set()
    for node in reversed(graph.node):
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") or any(o in below for o in node.output):
            below.update(i for i in node.input if i)
    return below


def needed_tensors(graph: onnx.GraphProto, outputs: list[str]) -> set[str]:
    """Every tensor the given outputs depend on (inputs of the nodes that produce them, transitively)."""
    producer = {o: n for n in graph.node for o in n.output if o}
    need: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        node = producer.get(t)
        if node is not None:
            stack.extend(i for i in node.input if i)
            for sub in _subgraph_inputs(node):
                stack.append(sub)
    return need


def _subgraph_inputs(node: onnx.NodeProto) -> list[str]:
    """Outer-scope tensors read by If/Loop/Scan bodies."""
    out: list[str] = []
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for n in g.node:
                out.extend(i for i in n.input if i)
    return out


def silu_pairs(graph: onnx.GraphProto, keep: set[str], protected: set[str]) -> tuple[dict[str, str], set[str]]:
    """Mul(a, Sigmoid(a)) patterns to emit as one F.silu, for Sigmoids used only by that Mul.

    Returns ({Mul output: a}, {Sigmoid outputs not to emit}).
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        if n.output and n.output[0] in keep:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
    sig_in = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Sigmoid" and n.output[0] in keep}
    pairs: dict[str, str] = {}
    skip: set[str] = set()
    for s, a in sig_in.items():
        users = consumers.get(s, [])
        if s in protected or len(users) != 1 or users[0].op_type != "Mul":
            continue
        mul = users[0]
        if sorted(mul.input) == sorted([a, s]) and a != s:
            pairs[mul.output[0]] = a
            skip.add(s)
    return pairs, skip
