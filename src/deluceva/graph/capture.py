"""Capture: torch.fx symbolic trace of a network plus shape propagation with an example input.

The result is the logical plan: a `torch.fx.GraphModule` whose nodes carry `meta["tensor_meta"]` (shape, dtype) from
`torch.fx.passes.shape_prop.ShapeProp`. Tracing problems become one-line `ModelError`s naming the construct.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import traceback
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deluceva.errors import ModelError


class _PathTracer(fx.Tracer):
    """A `fx.Tracer` that remembers which submodule (dotted path) is being traced, to name it in errors."""

    def __init__(self) -> None:
        super().__init__()
        self.path_stack: list[str] = []
        self.error_path: str | None = None  # innermost submodule whose forward raised

    def call_module(self, m: nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        try:
            path = self.path_of_module(m)
        except NameError:
            path = type(m).__name__
        self.path_stack.append(path)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.error_path is None:
                self.error_path = path
            raise
        finally:
            self.path_stack.pop()


def _user_frame(exc: BaseException) -> str:
    """'file:line' of the innermost traceback frame outside torch (the user's construct), or ''."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename.rsplit('/', 1)[-1]}:{f.lineno} `{(f.line or '').strip()}`"


def _defaults(module: nn.Module) -> dict[str, Any]:
    """forward() parameters after the input that have defaults (e.g. `augment=False`): traced as those constants."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}


def trace(module: nn.Module) -> fx.GraphModule:
    """Symbolically trace `module` (a GraphModule is copied as is). Raises ModelError naming what broke tracing."""
    if isinstance(module, fx.GraphModule):
        return copy.deepcopy(module)
    tracer = _PathTracer()
    try:
        graph = tracer.trace(module, concrete_args=_defaults(module) or None)
    except Exception as exc:  # noqa: BLE001 - any tracing failure becomes one clear user-facing line
        where = tracer.error_path or type(module).__name__
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if isinstance(exc, fx.proxy.TraceError) and "control flow" in msg:
            raise ModelError(
                f"cannot convert: data-dependent control flow in {where}{_user_frame(exc)} ({msg})"
            ) from None
        raise ModelError(
            f"cannot convert: torch.fx tracing failed in {where}{_user_frame(exc)}: {type(exc).__name__}: {msg}"
        ) from None
    name = type(module).__name__
    return fx.GraphModule(copy.deepcopy(tracer.root), graph, name)


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node being run (to name it in errors)."""

    current: fx.Node | None = None

    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def shape_prop(gm: fx.GraphModule, example_input: torch.Tensor) -> fx.GraphModule:
    """Record `meta["tensor_meta"]`/`meta["type"]` on every node by running `example_input` (no grad)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder" and not n.args]  # no default value
    if len(placeholders) != 1:
        raise ModelError(
            f"cannot convert: the network must take exactly one input tensor, its forward takes {len(placeholders)} "
            f"({', '.join(n.name for n in placeholders)})"
        )
    prop = _ShapeProp(gm)
    try:
        with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(example_input)
    except Exception as exc:  # noqa: BLE001
        cause = exc.__cause__ or exc
        node = prop.current
        where = f" at node '{node.name}' ({node.format_node()})" if node is not None else ""
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        raise ModelError(
            f"cannot convert: the example input {tuple(example_input.shape)} fails in the network{where}: "
            f"{type(cause).__name__}: {first}"
        ) from None
    return gm


def capture(module: nn.Module, example_input: torch.Tensor) -> fx.GraphModule:
    """Trace `module` (eval mode, copied: the caller's module is never changed) and propagate shapes."""
    gm = trace(module)
    gm.eval()
    return shape_prop(gm, example_input)
