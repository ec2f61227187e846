"""ONNX -> torch.fx importer: our own, small, size-generic (no onnx2torch, no torchvision).

`import_onnx(path, probe_hw=..., cut="heads")` builds a `torch.fx.GraphModule` directly from the ONNX graph:
Conv/BatchNormalization/Gemm/MatMul become nn.Conv2d/BatchNorm/Linear modules (weights from the initializers), the
other ops torch calls (see `onnx_ops.OPS`), Mul(a, Sigmoid(a)) becomes one F.silu. Shape-only subgraphs are
evaluated once at a probe input size and never reach the torch graph; what they feed is rewritten size-generically
(resize sizes -> scale factors, reshapes -> flatten/unflatten), so the module runs at any input size a multiple of 32.

cut="heads": the network ends at the raw 4-D head maps, the tensors that feed the first Reshape on each path to an
output (YOLOX: per-level Concat(reg, sigmoid(obj), sigmoid(cls)) (1, 85, h, w); YOLOv5: the head convs
(1, 3*85, h, w)); they are returned largest map (smallest stride) first. The exporter's decode after the cut is
re-done by the family's post-processing. cut=None keeps the whole graph; if parts of it were frozen at the probe
size (e.g. YOLOv5's grid constants), `gm.meta["frozen"]` names their nodes and the module holds at that size only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import fx

from deluceva.errors import ModelError
from deluceva.zoo import onnx_layout  # noqa: F401  (registers the layout ops in OPS)
from deluceva.zoo.onnx_builder import Builder, Const, Dyn, Value
from deluceva.zoo.onnx_cut import SHAPE_OPS, dynamic_tensors, head_cut, needed_tensors, silu_pairs
from deluceva.zoo.onnx_load import attributes, default_opset, evaluate_node, load_onnx, node_label
from deluceva.zoo.onnx_ops import OPS

DEFAULT_PROBE_HW = (640, 640)


def import_onnx(
    path: str | Path | onnx.ModelProto,
    *,
    probe_hw: tuple[int, int] | None = None,
    cut: Literal["heads"] | None = "heads",
    source_name: str | None = None,
) -> fx.GraphModule:
    """Import an ONNX image model as a GraphModule `(x: float32 (N, C, H, W)) -> tuple[Tensor, ...]`.

    path: an .onnx file, or an already loaded (and checked) ModelProto; source_name names it in messages.

    probe_hw: (H, W) at which shape subgraphs are evaluated; default the model's static input size, else 640x640.
    cut: "heads" to end at the raw 4-D head maps (ordered largest first), None for the graph's own outputs.
    meta: `gm.meta` holds source, input_name, output_names (ONNX tensors), output_shapes (at the probe), probe_hw,
    frozen (names of nodes that only hold at the probe size; empty for a size-generic module).
    """
    if cut not in ("heads", None):
        raise ModelError(f"import_onnx: cut must be 'heads' or None, got {cut!r}")
    if isinstance(path, onnx.ModelProto):
        model, fname = path, source_name or (path.graph.name or "model")
    else:
        model, fname = load_onnx(path), source_name or Path(path).name
    graph = model.graph
    opset = default_opset(model)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    inp = _image_input(graph, inits, fname)
    probe_shape = _probe_shape(inp, probe_hw)

    dynamic = dynamic_tensors(graph, inp.name)
    outputs = head_cut(graph, dynamic) if cut == "heads" else [o.name for o in graph.output]
    keep = needed_tensors(graph, outputs)
    silu, skip_sigmoid = silu_pairs(graph, keep, set(outputs))

    b = Builder(opset)
    env: dict[str, Value] = {k: Const(v) for k, v in inits.items()}
    probe = torch.rand(probe_shape, generator=torch.Generator().manual_seed(0)) * 255  # only its shapes matter
    env[inp.name] = b.placeholder("x", probe)
    last_use = _last_use(graph, keep)
    for idx, node in enumerate(graph.node):
        if not any(o in keep for o in node.output):
            continue
        outs = _convert(b, node, env, silu, skip_sigmoid, opset)
        for name, v in zip(node.output, outs, strict=False):
            if name:  # pass-through ops (Identity, no-op Expand) get their own holder of the probe value
                env[name] = Dyn(v.node, v.probe) if isinstance(v, Dyn) else v
        for name in node.input:  # release probe activations nobody reads any more
            v = env.get(name)
            if isinstance(v, Dyn) and last_use.get(name, -1) <= idx and name not in outputs:
                v.probe = None

    result = [_output(env, o, cut) for o in outputs]
    order = sorted(range(len(result)), key=lambda i: -_spatial(result[i])) if cut == "heads" else range(len(result))
    b.graph.output(tuple(result[i].node for i in order))
    gm = fx.GraphModule(b.root, b.graph, class_name="OnnxNetwork")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.eval()
    gm.meta.update(
        source=fname,
        input_name=inp.name,
        output_names=[outputs[i] for i in order],
        output_shapes=[tuple(result[i].shape) for i in order],
        probe_hw=tuple(probe_shape[2:]),
        frozen=list(dict.fromkeys(b.frozen)),
    )
    return gm


def _convert(
    b: Builder, node: onnx.NodeProto, env: dict[str, Value], silu: dict[str, str], skip: set[str], opset: int
) -> list[Value | None]:
    """Values of one node's outputs: constant-folded, or emitted into the fx graph."""
    try:
        ins: list[Value | None] = [env[n] if n else None for n in node.input]
    except KeyError as e:
        raise ModelError(f"ONNX node {node_label(node)!r} reads undefined tensor {e.args[0]!r}") from None
    if node.op_type in SHAPE_OPS and isinstance(ins[0], Dyn):
        shape = np.asarray(ins[0].shape, np.int64)
        if node.op_type == "Size":
            return [Const(np.asarray(shape.prod(), np.int64), sized=True)]
        at = attributes(node)
        return [Const(shape[at.get("start", 0) : at.get("end", len(shape))], sized=True)]
    if not any(isinstance(v, Dyn) for v in ins):
        vals = evaluate_node(node, [v.value if v is not None else None for v in ins], opset)  # type: ignore[union-attr]
        sized = any(v is not None and v.sized for v in ins)  # type: ignore[union-attr]
        return [Const(v, sized) for v in vals]
    if node.output[0] in skip:
        return [None]
    if node.output[0] in silu:
        return [b.call(F.silu, env[silu[node.output[0]]])]
    handler = OPS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if handler is None:
        raise b.unsupported(node)
    return handler(b, node, ins, attributes(node))


def _last_use(graph: onnx.GraphProto, keep: set[str]) -> dict[str, int]:
    """Index of the last kept node reading each tensor."""
    last: dict[str, int] = {}
    for idx, node in enumerate(graph.node):
        if any(o in keep for o in node.output):
            for i in node.input:
                last[i] = idx
    return last


def _image_input(graph: onnx.GraphProto, inits: dict[str, np.ndarray], fname: str) -> onnx.ValueInfoProto:
    data = [i for i in graph.input if i.name not in inits]
    if len(data) != 1:
        raise ModelError(
            f"{fname}: expected one image input, the model has {len(data)}: {', '.join(i.name for i in data)}"
        )
    inp = data[0]
    tt = inp.type.tensor_type
    if tt.elem_type != onnx.TensorProto.FLOAT:
        raise ModelError(
            f"{fname}: input {inp.name!r} must be float32 (is {onnx.TensorProto.DataType.Name(tt.elem_type)})"
        )
    if len(tt.shape.dim) != 4:
        raise ModelError(f"{fname}: input {inp.name!r} must be 4-D (N, C, H, W), has rank {len(tt.shape.dim)}")
    return inp


def _probe_shape(inp: onnx.ValueInfoProto, probe_hw: tuple[int, int] | None) -> tuple[int, int, int, int]:
    dims = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in inp.type.tensor_type.shape.dim
    ]
    c = dims[1] or 3
    if probe_hw is None:
        probe_hw = (dims[2], dims[3]) if dims[2] and dims[3] else DEFAULT_PROBE_HW
    return (1, c, int(probe_hw[0]), int(probe_hw[1]))


def _output(env: dict[str, Value], name: str, cut: str | None) -> Dyn:
    v = env.get(name)
    if not isinstance(v, Dyn):
        raise ModelError(f"ONNX output {name!r} does not depend on the image input")
    if cut == "heads" and len(v.shape) != 4:
        raise ModelError(
            f"cut='heads': tensor {name!r} before the first Reshape has shape {tuple(v.shape)}, "
            "not a 4-D head map (use cut=None)"
        )
    return v


def _spatial(v: Dyn) -> int:
    return int(v.shape[-1] * v.shape[-2])
