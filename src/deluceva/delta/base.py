"""Delta unit base class, the delta value conventions, and argument templates.

Delta values flowing between units (one per varying graph node):
- `None`: exactly zero (nothing changed);
- `PixelDelta`: the delta of a 4-D float tensor (N, C, H, W), active pixels only (channels-last rows);
- `torch.Tensor`: a dense delta of any other tensor (same shape as the value);
- tuple/list of the above for ops returning several tensors (split, chunk).

A unit is built once from its fx node. `seed(env)` runs the op densely on full values (`env(node)` gives the full value
of any input node), stores the state the delta form needs and returns the full output. When the network seeds from
values computed elsewhere (a dense engine exporting every intermediate tensor, `DeltaNetwork.seed_from`), `given(env,
node)` returns a node's precomputed value and the unit skips computing it; `Unit.given_nodes()` names the nodes a
unit can take that way. Seeding from given values is lazy: a value only some units need in full is handed on as
a `LazyValue` (shape and dtype known, computed on first `env(node)`): a conv's activation (the next conv needs only
its input's shape, its filter the scale of the seed it keeps on re-seeds) and, on re-seeds with unchanged input
shapes, the outputs of units that `seeds_shapes_only` (add, cat, nearest upsampling, identity: their seed derives
only shapes, so it is skipped). `__call__(*deltas)` takes the deltas of the node's varying inputs (order:
`var_nodes`) and returns the output delta.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from deluceva.delta.pixels import PixelDelta

Delta = Any  # None | PixelDelta | torch.Tensor | tuple[Delta, ...]
Env = Callable[[fx.Node], Any]


class LazyValue:
    """A seeding value computed on first use: `get()` runs `fn()` once; shape and dtype: the value's."""

    __slots__ = ("fn", "shape", "dtype", "_value")

    def __init__(self, fn: Callable[[], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.fn = fn
        self.shape, self.dtype = tuple(shape), dtype
        self._value: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if self._value is None:
            self._value = self.fn()
            self.fn = None  # type: ignore[assignment]  # drop what it closed over
        return self._value


def lazy_seeding(env: Env) -> bool:
    """Whether the seeding env takes LazyValues (seeding from given values)."""
    return bool(getattr(env, "lazy", False))


def shape_of(env: Env, node: fx.Node) -> tuple[int, ...]:
    """The shape of node's seeding value without computing a lazy one."""
    lookup = getattr(env, "shape", None)
    return tuple(lookup(node) if lookup is not None else env(node).shape)


def given(env: Env, node: fx.Node | None) -> Any:
    """The precomputed full value of `node` offered by the seeding env (None: compute it; see module docs)."""
    lookup = getattr(env, "given", None)
    return None if lookup is None or node is None else lookup(node)


@dataclass
class FilterConfig:
    """Settings shared by every filter and unit of one network (the network changes filter ones between frames).

    state_dtype: dtype of accumulated full-value state (pre-activations, stored inputs, outputs). float64 keeps the
    rounding of hundreds of frames of `z += Δz` far below the float32 rounding of the dense network itself;
    float32 halves the memory traffic of state updates. filtered_state_dtype: the state dtype of states seeded while
    filtering (not `exact`; None: state_dtype always): the filters' own error dwarfs float32 accumulation rounding, and
    float32 state makes delta frames ~15% and seeds cheaper (YOLOv5n 768x448).
    percent_of: what filter_pct is a percentage of. "changes": every filter holds back that share of its granules
    with a pending delta, however few changed. "positions": of all its granules (unchanged ones count as held back),
    i.e. it forwards at most (100 - filter_pct)% of the tensor's positions, and every change while fewer changed.
    count_smoothing: with "changes", the weight per call of each filter's average candidate count. A re-seed clears
    what the filters hold, and the percentage would then hold back its share of the frame's fresh changes alone, far
    more of the real motion than in the steady state, where the count includes the small residuals that wait. So
    after a re-seed the percentage is of max(the granules pending now, the average count at the re-seed, decaying by
    (1 - count_smoothing) per call) (YOLOv5n 768x448, pets video, 50% + relative floor 0.5, re-seed every 8 frames,
    120 frames: mAP@0.5 against dense 0.72 -> 0.81). 0: always of the granules pending now.
    """

    filter_pct: float = 0.0
    granularity: str = "pixel"  # "element" | "pixel" | "tile"
    noise_floor: float = 0.0
    tile: int = 8
    state_dtype: torch.dtype = torch.float64
    input_floor: float = 0.0  # the network input's filter: pixels whose accumulated change is <= it wait (input units)
    relative_floor: float = 0.0  # each filter's floor = relative_floor * std of its input at the stream's first seed
    filtered_state_dtype: torch.dtype | None = torch.float32
    percent_of: str = "changes"  # filter_pct of what: "changes" (the granules with a pending delta) | "positions" (all)
    count_smoothing: float = 0.1  # "changes": weight per call of the average candidate count carried over re-seeds
    input_coherence: float = 0.0  # with input_floor > 0, pixels outside coherent 8x8 windows wait too (input units)

    @property
    def seed_state_dtype(self) -> torch.dtype:
        """The state dtype for states seeded now: state_dtype when exact, else filtered_state_dtype (if set)."""
        return self.state_dtype if self.exact or self.filtered_state_dtype is None else self.filtered_state_dtype

    def acc_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """Accumulation dtype for state of a tensor of `dtype` seeded now (never narrower than it; non-floats
        unchanged)."""
        return torch.promote_types(dtype, self.seed_state_dtype) if dtype.is_floating_point else dtype

    @property
    def exact(self) -> bool:
        """True when filters forward everything (0% filtered, no noise floors)."""
        return self.filter_pct <= 0.0 and self.noise_floor <= 0.0 and self.relative_floor <= 0.0


def is_pixel_shape(shape: Any) -> bool:
    return len(shape) == 4


def nonzero_rows(values: torch.Tensor) -> torch.Tensor:
    """bool (A,): rows of (A, C) with a non-zero entry (abs-amax: much faster than ne(0).any(1) on CPU)."""
    return values.abs().amax(1) > 0


def pixels_from_dense(t: torch.Tensor) -> PixelDelta:
    """PixelDelta of a dense 4-D delta (pixels with any non-zero channel), without a channels-last copy of t."""
    n, c, h, w = t.shape
    mask = t.abs().amax(1) > 0 if c > 0 else torch.zeros(n, h, w, dtype=torch.bool)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        vals = t.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
    elif n == 1:
        vals = t.reshape(c, h * w).index_select(1, idx).t().contiguous()
    else:
        vals = t.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
    return PixelDelta(idx, vals, (n, c, h, w))


def wrap(t: torch.Tensor) -> Delta:
    """A dense delta tensor -> the flowing form: PixelDelta (4-D floating, None when all zero) or the tensor itself."""
    if t.dim() == 4 and t.is_floating_point():
        d = pixels_from_dense(t)
        return d if d.active else None
    return t


def to_dense(d: Delta, shape: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense delta tensor of `shape` (zeros for None)."""
    if d is None:
        return torch.zeros(shape, dtype=dtype)
    if isinstance(d, PixelDelta):
        return d.to_dense()
    return d


def to_pixels(d: Delta) -> PixelDelta | None:
    """PixelDelta (or None) from any 4-D delta form."""
    if d is None or isinstance(d, PixelDelta):
        return d
    return wrap(d)


def active_fraction(d: Delta) -> float:
    """Fraction of active pixels (PixelDelta) or non-zero elements (dense); 0 for None."""
    if d is None:
        return 0.0
    if isinstance(d, PixelDelta):
        return d.active_fraction
    if isinstance(d, torch.Tensor):
        return float(torch.count_nonzero(d)) / max(1, d.numel())
    if isinstance(d, tuple | list):
        fr = [active_fraction(x) for x in d]
        return sum(fr) / max(1, len(fr))
    return 0.0


class Hole:
    """Placeholder for the i-th varying input inside an argument template."""

    __slots__ = ("i",)

    def __init__(self, i: int) -> None:
        self.i = i

    def __repr__(self) -> str:
        return f"Hole({self.i})"


def _has_hole(obj: Any) -> bool:
    if isinstance(obj, Hole):
        return True
    if isinstance(obj, tuple | list):
        return any(_has_hole(v) for v in obj)
    if isinstance(obj, dict):
        return any(_has_hole(v) for v in obj.values())
    return False


def _fill(obj: Any, vals: tuple) -> Any:
    if isinstance(obj, Hole):
        return vals[obj.i]
    if isinstance(obj, tuple | list) and _has_hole(obj):
        return type(obj)(_fill(v, vals) for v in obj)
    if isinstance(obj, dict) and _has_hole(obj):
        return {k: _fill(v, vals) for k, v in obj.items()}
    return obj


class ArgTemplate:
    """(args, kwargs) of a node with static inputs frozen to their seeded values and varying inputs as holes.

    `fill(vals)` rebuilds the call arguments with `vals[i]` at hole i; flat argument lists take a fast path.
    """

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], env: Env) -> None:
        index = {n: i for i, n in enumerate(var_nodes)}

        def conv(n: fx.Node) -> Any:
            return Hole(index[n]) if n in index else env(n)

        self.args: tuple = fx.node.map_arg(node.args, conv)  # type: ignore[assignment]
        self.kwargs: dict = dict(fx.node.map_arg(node.kwargs, conv))  # type: ignore[arg-type]
        self._flat_args = [(p, a.i) for p, a in enumerate(self.args) if isinstance(a, Hole)]
        self._flat_kwargs = [(k, v.i) for k, v in self.kwargs.items() if isinstance(v, Hole)]
        nested = any(_has_hole(a) and not isinstance(a, Hole) for a in self.args) or any(
            _has_hole(v) and not isinstance(v, Hole) for v in self.kwargs.values()
        )
        self._nested = nested

    def fill(self, vals: tuple | list) -> tuple[tuple, dict]:
        if self._nested:
            return _fill(self.args, tuple(vals)), _fill(self.kwargs, tuple(vals))
        args = list(self.args)
        for p, i in self._flat_args:
            args[p] = vals[i]
        if self._flat_kwargs:
            kwargs = dict(self.kwargs)
            for k, i in self._flat_kwargs:
                kwargs[k] = vals[i]
            return tuple(args), kwargs
        return tuple(args), self.kwargs

    def holes(self) -> list[tuple[tuple, int]]:
        """(path, i) of every hole; path = positions/keys from (args, kwargs) down to the hole."""
        out: list[tuple[tuple, int]] = []

        def walk(obj: Any, path: tuple) -> None:
            if isinstance(obj, Hole):
                out.append((path, obj.i))
            elif isinstance(obj, tuple | list):
                for j, v in enumerate(obj):
                    walk(v, (*path, j))
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    walk(v, (*path, k))

        walk(self.args, ("args",))
        walk(self.kwargs, ("kwargs",))
        return out


def call_target(node: fx.Node, module: Any, args: tuple, kwargs: dict) -> Any:
    """Run the node's operator on (args, kwargs): a function, a Tensor method, or the node's module."""
    if node.op == "call_function":
        return node.target(*args, **kwargs)  # type: ignore[operator]
    if node.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, node.target)(*rest, **kwargs)  # type: ignore[arg-type]
    if node.op == "call_module":
        return module(*args, **kwargs)
    raise ValueError(f"cannot call node {node.name} ({node.op})")


UNIT_MODES = ("delta", "dense", "auto")


class Unit:
    """Base of all delta units: one fx node (or a fused chain) with its state.

    Attributes the runtime reads for statistics: `name`, `kind`, `macs` (executed this frame), `dense_macs`.
    Execution mode (`mode`, set by DeltaNetwork.set_unit_modes): "delta" runs `__call__`; "dense" runs `dense_call`
    (the op computed densely on the densified delta, still emitting a delta); "auto" runs dense when the incoming
    active fraction exceeds `break_even`. Units without a cheaper dense form (`has_dense = False`) always run their
    delta form (their `dense_call` is `__call__`).
    """

    kind = "op"
    config: FilterConfig = FilterConfig()  # set per network at build
    has_dense = False
    break_even = 1.0  # incoming active fraction above which the dense form is faster (auto mode)
    measured_break_even: float | None = None  # the same from this machine's profile (plan); replaces break_even
    mode = "auto"
    seeds_shapes_only = False  # seed only derives shapes from its inputs (a lazy re-seed of the same shapes skips it)

    def __init__(self, node: fx.Node, var_nodes: list[fx.Node], module: Any = None) -> None:
        self.node = node
        self.name = node.name
        self.var_nodes = var_nodes
        self.module = module
        self.macs = 0
        self.dense_macs = 0

    def given_nodes(self) -> list[fx.Node]:
        """Nodes whose precomputed values `seed` can take instead of computing them (see `given`)."""
        return []

    def row_nodes(self) -> list[fx.Node]:
        """Given nodes (4-D) whose values `seed` only copies into channels-last state rows: a seeder may hand them as
        channels-last views (NCHW shape, NHWC memory), which makes that copy a plain memory copy."""
        return []

    def materialize(self, env: Env) -> tuple[tuple, dict]:
        """Full-value (args, kwargs) of the node."""
        return fx.node.map_arg(self.node.args, env), dict(fx.node.map_arg(self.node.kwargs, env))  # type: ignore

    def template(self, env: Env) -> ArgTemplate:
        return ArgTemplate(self.node, self.var_nodes, env)

    def run(self, args: tuple, kwargs: dict) -> Any:
        return call_target(self.node, self.module, args, kwargs)

    def seed(self, env: Env) -> Any:
        raise NotImplementedError

    def __call__(self, *deltas: Delta) -> Delta:
        raise NotImplementedError

    def dense_call(self, *deltas: Delta) -> Delta:
        """The unit's op computed densely (exact, same output delta as `__call__`); default: the delta form."""
        return self(*deltas)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"
