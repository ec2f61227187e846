"""Graph passes: small functions GraphModule -> GraphModule that bring a captured network into canonical form.

Each pass rewrites the graph of the GraphModule it is given (the conversion owns that copy) and returns it, recompiled.
Order (`canonical_passes`): functionalize in-place ops, drop identities, canonicalise aliases, fold BatchNorm into
convs, fuse `x * sigmoid(x)` -> silu. After shape propagation: `mark_varying`, then `mark_dense`.
"""

from __future__ import annotations

import inspect
import operator
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from deluceva.graph import ops

VARYING = "deluceva.varying"  # node.meta key: the node's tensor value changes from frame to frame
DENSE = "deluceva.dense"  # node.meta key: no delta form, the node is recomputed densely


class DenseFallbackWarning(UserWarning):
    """An operator without a delta form runs densely (correct, but no speed-up there)."""


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]


def _free_name(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while True:
        try:
            gm.get_submodule(name)
        except AttributeError:
            return name
        i += 1
        name = f"{base}{i}"


def _redirect_later_users(gm: fx.GraphModule, mutated: fx.Node, new: fx.Node) -> None:
    """Users of `mutated` that come after `new` in the graph (and the output) read `new` instead: they would have
    seen the value mutated in place."""
    seen = False
    for n in gm.graph.nodes:
        if n is new:
            seen = True
        elif seen and mutated in n.all_input_nodes:
            n.replace_input_with(mutated, new)


def functionalize_inplace(gm: fx.GraphModule) -> fx.GraphModule:
    """`x.add_(y)`, `torch.relu_(x)`, `operator.setitem(x, i, v)` -> out-of-place ops; later users of x use the result.

    In-place ops whose out-of-place form is unknown are left alone (they run dense, on copies). Modules and functions
    with `inplace=True` are handled the same way by `canonicalize`.
    """
    for node in list(gm.graph.nodes):
        target = None
        if node.op == "call_method" and node.target.endswith("_") and not node.target.startswith("_"):
            name = node.target[:-1]
            if hasattr(torch.Tensor, name) and name not in ("copy", "set", "resize", "fill", "zero"):
                target = ("call_method", name)
        elif node.op == "call_function" and node.target in ops.FUNCTION_ALIASES and node.target.__name__.endswith("_"):
            target = ("call_function", ops.FUNCTION_ALIASES[node.target])
        elif node.op == "call_function" and node.target is operator.setitem:
            target = ("call_function", ops.setitem)
        if target is None or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        mutated = node.args[0]
        with gm.graph.inserting_after(node):
            new = gm.graph.create_node(target[0], target[1], node.args, node.kwargs, name=node.name + "_f")
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        _redirect_later_users(gm, mutated, new)
    return _finish(gm)


def remove_identities(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop nn.Identity / Dropout modules and dropout functions (inference)."""
    for node in list(gm.graph.nodes):
        mod = _module(gm, node)
        if (mod is not None and isinstance(mod, ops.IDENTITY_MODULES)) or (
            node.op == "call_function" and node.target in ops.IDENTITY_FUNCTIONS
        ):
            if node.args and isinstance(node.args[0], fx.Node):
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    return _finish(gm)


def _without_inplace(fn: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Bind (args, kwargs) to `fn`'s signature and drop its `inplace` argument: ((input,), other kwargs)."""
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return args, {k: v for k, v in kwargs.items() if k != "inplace"}
    params = dict(bound.arguments)
    params.pop("inplace", None)
    first = next(iter(params))
    x = params.pop(first)
    return (x,), params


def _inplace_arg(fn: Callable, args: tuple, kwargs: dict) -> bool:
    """Whether a call of `fn` passes inplace=True (positionally or by keyword)."""
    if kwargs.get("inplace") is True:
        return True
    try:
        return inspect.signature(fn).bind(*args, **kwargs).arguments.get("inplace") is True
    except (TypeError, ValueError):
        return False


def canonicalize(gm: fx.GraphModule) -> fx.GraphModule:
    """Activation / pooling / upsample / pad / flatten / softmax modules, methods and function aliases -> the canonical
    `call_function` forms of `graph.ops` (`inplace` arguments dropped)."""
    graph = gm.graph
    for node in list(graph.nodes):
        new_target, args, kwargs = None, node.args, dict(node.kwargs)
        mod = _module(gm, node)
        inplace = bool(getattr(mod, "inplace", False)) or (
            node.op == "call_function" and _inplace_arg(node.target, node.args, node.kwargs)
        )
        if mod is not None and type(mod) in ops.MODULE_TO_FUNCTION:
            new_target, extra = ops.MODULE_TO_FUNCTION[type(mod)](mod)
            args, kwargs = node.args[:1], {**extra}
        elif node.op == "call_method" and node.target in ops.METHOD_ALIASES:
            new_target = ops.METHOD_ALIASES[node.target]
        elif node.op == "call_function" and node.target in ops.FUNCTION_ALIASES:
            new_target = ops.FUNCTION_ALIASES[node.target]
            args, kwargs = _without_inplace(node.target, args, kwargs)
        elif node.op == "call_function" and node.target in ops.INPLACE_PARAM:
            new_target = node.target
            args, kwargs = _without_inplace(node.target, args, kwargs)
        if new_target is None:
            continue
        with graph.inserting_after(node):
            new = graph.create_node("call_function", new_target, tuple(args), kwargs, name=node.name + "_c")
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        if inplace and args and isinstance(args[0], fx.Node):
            _redirect_later_users(gm, args[0], new)
    return _finish(gm)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """conv -> BatchNorm2d (eval statistics, the conv output used only by the BN) -> one conv with folded weights."""
    for node in list(gm.graph.nodes):
        bn = _module(gm, node)
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or not node.args:
            continue
        src = node.args[0]
        conv = _module(gm, src) if isinstance(src, fx.Node) else None
        if not isinstance(conv, nn.Conv2d | nn.ConvTranspose2d) or len(src.users) != 1:
            continue
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval(), transpose=isinstance(conv, nn.ConvTranspose2d))
        name = _free_name(gm, f"{src.target}_bnfold")
        gm.add_submodule(name, fused)
        src.target = name
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    return _finish(gm)


_MUL = (operator.mul, torch.mul)
_GATE_TO_ACT = {torch.sigmoid: F.silu, F.hardsigmoid: F.hardswish}


def fuse_gated_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """`x * sigmoid(x)` (either order, ONNX-style SiLU) -> silu(x); `x * hardsigmoid(x)` -> hardswish(x)."""
    for node in list(gm.graph.nodes):
        is_mul = (node.op == "call_function" and node.target in _MUL) or (
            node.op == "call_method" and node.target == "mul"
        )
        if not is_mul or len(node.args) != 2 or node.kwargs:
            continue
        for x, gate in (node.args, node.args[::-1]):
            if (
                isinstance(gate, fx.Node)
                and gate.op == "call_function"
                and gate.target in _GATE_TO_ACT
                and gate.args == (x,)
                and all(k == "inplace" and v is False for k, v in gate.kwargs.items())
            ):
                with gm.graph.inserting_after(node):
                    new = gm.graph.call_function(_GATE_TO_ACT[gate.target], (x,))
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
                break
    return _finish(gm)


def canonical_passes(gm: fx.GraphModule) -> fx.GraphModule:
    """All rewriting passes in order (before shape propagation)."""
    for p in (functionalize_inplace, remove_identities, canonicalize, fold_batchnorm, fuse_gated_activations):
        gm = p(gm)
    return gm


def _value_independent(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ops.VALUE_INDEPENDENT_FUNCTIONS) or (
        node.op == "call_method" and node.target in ops.VALUE_INDEPENDENT_METHODS
    )


def mark_varying(gm: fx.GraphModule) -> fx.GraphModule:
    """meta[VARYING] = the node holds a tensor whose values depend on the input's values (needs shape metadata).

    Shapes, sizes and constants (get_attr, `torch.arange(x.shape[2])`, zeros_like) are static per input shape.
    """
    first = True
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            var, first = first, False  # the input; later placeholders carry defaults (constants)
        elif node.op in ("get_attr", "output") or _value_independent(node):
            var = False
        else:
            var = "tensor_meta" in node.meta and any(n.meta.get(VARYING) for n in node.all_input_nodes)
        node.meta[VARYING] = var
    return gm


def mark_dense(gm: fx.GraphModule, has_delta_form: Callable[[fx.Node], bool]) -> fx.GraphModule:
    """meta[DENSE] = True on varying nodes without a delta form; warn once per operator, naming its nodes."""
    nodes = list(gm.graph.nodes)
    missing: dict[str, list[str]] = {}
    for i, node in enumerate(nodes):
        dense = bool(node.meta.get(VARYING)) and node.op != "placeholder" and not has_delta_form(node)
        node.meta[DENSE] = dense
        if dense:
            missing.setdefault(ops.describe_target(node), []).append(f"'{node.name}' (#{i} of {len(nodes)})")
    for op, where in missing.items():
        warnings.warn(
            f"deluceva: {op} has no delta form; it runs dense (recomputed every frame) at node "
            f"{', '.join(where)}",
            DenseFallbackWarning,
            stacklevel=3,
        )
    return gm
