"""Registry: which delta unit implements which canonical operator.

Each operator-family module registers factories `factory(node, ctx) -> Unit | None` under keys
("call_function", fn), ("call_method", name) or ("call_module", module type). A factory returns None when the
node's configuration has no delta form (e.g. a pooling with return_indices); the node then runs dense.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from deluceva.delta.base import FilterConfig, Unit
from deluceva.graph.passes import VARYING

Factory = Callable[[fx.Node, "BuildContext"], Unit | None]
Accepts = Callable[[fx.Node, "BuildContext"], bool]
_REGISTRY: dict[tuple[str, Any], list[tuple[Accepts | None, Factory]]] = {}
_FAMILIES = ("conv", "linear", "norm", "pool", "arith", "activation", "shape", "upsample", "pad", "dense")
_loaded = False


@dataclass
class BuildContext:
    """What a factory may look at: the graph module, filter settings, and where filters go."""

    gm: fx.GraphModule
    config: FilterConfig = field(default_factory=FilterConfig)
    filter_all: bool = False

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(node.target) if node.op == "call_module" else None  # type: ignore[arg-type]

    @staticmethod
    def varying(arg: Any) -> bool:
        return isinstance(arg, fx.Node) and bool(arg.meta.get(VARYING))

    def var_nodes(self, node: fx.Node) -> list[fx.Node]:
        return [n for n in node.all_input_nodes if self.varying(n)]

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...] | None:
        tm = node.meta.get("tensor_meta")
        return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None


def register(*keys: tuple[str, Any], accepts: Accepts | None = None):
    """Decorator: register `factory` under every key (op, target); for one key, factories are tried in
    registration order and the first whose `accepts(node, ctx)` holds (or that has no `accepts`) is used."""

    def deco(factory: Factory) -> Factory:
        for k in keys:
            _REGISTRY.setdefault(k, []).append((accepts, factory))
        return factory

    return deco


def functions(*fns: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(("call_function", f) for f in fns)


def methods(*names: str) -> tuple[tuple[str, Any], ...]:
    return tuple(("call_method", n) for n in names)


def modules(*types: type) -> tuple[tuple[str, Any], ...]:
    return tuple(("call_module", t) for t in types)


def _load() -> None:
    global _loaded
    if not _loaded:
        for fam in _FAMILIES:
            importlib.import_module(f"deluceva.delta.{fam}")
        _loaded = True


def _key(node: fx.Node, ctx: BuildContext) -> tuple[str, Any]:
    if node.op == "call_module":
        return ("call_module", type(ctx.module(node)))
    return (node.op, node.target)


def lookup(node: fx.Node, ctx: BuildContext) -> Factory | None:
    """The factory for `node`, or None when the operator (or this use of it) has no delta form."""
    _load()
    for acc, factory in _REGISTRY.get(_key(node, ctx), ()):
        if acc is None or acc(node, ctx):
            return factory
    return None
