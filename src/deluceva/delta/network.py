"""DeltaNetwork: the converted, stateful network — a flat program of delta units compiled from the fx graph.

Build (once): one unit per graph node (static nodes -> StaticUnit, nodes without a delta form -> RecomputeUnit,
conv/linear + their single-user activation fused into one unit), argument slots precomputed, a filter in front of
every conv / conv_transpose / linear input (or every unit input with `filter_all`).
Run: the first call, the first call after reset()/refresh() and any input shape/dtype change run DENSE: every unit
seeds its state from full values (`Unit.seed`). Other calls form Δx = x - x_applied and run only the varying units'
delta forms in order (`Unit.__call__`), skipping units whose inputs all have a zero delta; outputs are kept as full
tensors and updated by their deltas.
Idle frames: when nothing is forwarded at the input and no filter would forward anything (nothing pending, or the
percentage holds back all it has), the frame skips the unit loop and returns the previous outputs (`last_changed`
False, `last_skipped` True). Outputs are kept per graph output as a channels-last tensor in the working dtype (plus
accumulated rows when those are wider), rewritten only at the pixels a delta touches; every call returns fresh
copies of them.
Input: Δx is taken against the input applied so far; with an input floor > 0 (`input_floor`: the configured one or
the input filters' floor) pixels whose accumulated change is below the floor wait (delta.inputs).
Per-unit modes (`set_unit_modes`): "delta", "dense" (the unit's dense form, e.g.
F.conv2d of the densified delta, still emitting a delta) or "auto" (dense above the unit's break-even fraction).
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import fx, nn

from deluceva.delta import kernels_bridge
from deluceva.delta.base import (
    UNIT_MODES,
    Delta,
    FilterConfig,
    LazyValue,
    Unit,
    active_fraction,
    pixels_from_dense,
    to_dense,
)
from deluceva.delta.dense import RecomputeUnit, Replace, StaticUnit
from deluceva.delta.filter import DenseFilter, PixelFilter, make_filter
from deluceva.delta.inputs import effective_coherence, input_delta
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.registry import BuildContext, lookup
from deluceva.delta.shape import ChannelCatUnit, IdentityUnit, SpatialSliceUnit
from deluceva.delta.state import RowState
from deluceva.errors import ModelError
from deluceva.graph.passes import DENSE, VARYING


class Step:
    """One program entry: a unit, the slots of its varying inputs, its output slot, optional input filters.

    node: the unit's (first) graph node; a fused unit's output is the value of its last fused node.
    """

    __slots__ = ("unit", "ins", "out", "filters", "node", "ms", "last_in", "ran")

    def __init__(self, unit: Unit, ins: list[int], out: int, node: fx.Node) -> None:
        self.unit, self.ins, self.out, self.node = unit, ins, out, node
        self.filters: list[PixelFilter | DenseFilter | None] = []
        self.ms = 0.0
        self.last_in: list[Delta] = []
        self.ran = "dense"  # which form ran last frame: "dense" | "delta"


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


class _Output:
    """Full value of one graph output, updated by its deltas.

    4-D floating tensors: `mirror`, the value in the working dtype as a channels-last (N, C, H, W) tensor, changed
    only at the pixels a delta touches: a delta's rows (A, C) go into contiguous rows of it (a frame costs
    O(changed pixels), not a full conversion of every output; NCHW planes took 255 strided writes per pixel:
    YOLOv5n's heads at 768x448 cost 5-8 ms per busy frame). With a wider accumulation dtype (exact runs: float64)
    the accumulated value is kept as channels-last rows (N*H*W, C) (a RowState) and the mirror is rewritten from
    them; with the working dtype itself the deltas are added to the mirror directly. `get` hands out a copy of the
    mirror; once the caller has let go of it (no reference, view or array left, not modified: reference and storage
    counts, version counter), that same tensor is kept up to date at the touched pixels and handed out again
    instead of a new copy, so callers still always get a tensor nobody else holds.
    """

    def __init__(self, value: Any, acc: torch.dtype) -> None:
        self.rows = isinstance(value, torch.Tensor) and value.dim() == 4 and value.is_floating_point()
        if self.rows:
            self.dtype = value.dtype
            n, c, h, w = value.shape
            self.shape = (n, c, h, w)
            wide = torch.promote_types(value.dtype, acc)
            self.state = RowState(value, wide) if wide != value.dtype else None
            # the rows hold value in a dtype at least as wide: rounded back they are value itself, so the mirror is a
            # copy of it (a plain one when the seeder hands it channels-last: `DeltaNetwork.row_nodes`)
            self.mirror = value.clone(memory_format=torch.channels_last)
            self._last: torch.Tensor | None = None  # the tensor handed out last (a normal tensor, not an inference one)
            self._last_version = -1
        else:
            self.value = _copy(value)

    def _reusable(self) -> bool:
        """Whether nobody but us holds the last handed-out tensor (or a view or array of it) and it is unmodified."""
        if self._last is None or _USE_COUNT is None or sys.getrefcount(self._last) > 2:
            return False
        return self._last._version == self._last_version and _USE_COUNT(self._last.untyped_storage()._cdata) <= 2

    def add(self, d: Delta) -> None:
        if d is None:
            return
        if self.rows:
            if not isinstance(d, PixelDelta):
                d = pixels_from_dense(d)
            targets = [self.mirror]
            if self._reusable():
                targets.append(self._last)
            else:
                self._last = None
            n, c, h, w = self.shape
            rows = [t.permute(0, 2, 3, 1).view(n * h * w, c) for t in targets]  # channels-last: views
            add = self.state is None  # mirror += Δ: the same float ops as rows of the working dtype would do
            if not (add and self.dtype == torch.float32 and kernels_bridge.add_rows(rows, d)):
                vals = d.values.to(self.dtype) if add else self.state.update(d.index, d.values)[1]  # (A, C)
                for r in rows:
                    (r.index_add_ if add else r.index_copy_)(0, d.index, vals)
            if self._last is not None:
                self._last_version = self._last._version
        else:
            self.value = _add(self.value, d)

    def get(self) -> Any:
        """A tensor nobody else holds (channels-last for 4-D tensors), so callers may modify it."""
        if self.rows:
            if not self._reusable():
                with torch.inference_mode(False):  # a normal tensor: its version counter shows changes by the caller
                    self._last = self.mirror.clone()
                self._last_version = self._last._version
            return self._last
        return _copy(self.value)


def _add(full: Any, d: Delta) -> Any:
    """full + delta -> a new full value (tuples map; Replace replaces)."""
    if d is None:
        return full
    if isinstance(d, Replace):
        return d.value
    if isinstance(full, tuple | list):
        return type(full)(_add(f, x) for f, x in zip(full, d, strict=True))
    return full + to_dense(d, full.shape, full.dtype)


def _copy(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple | list):
        return type(v)(_copy(x) for x in v)
    return v


class _Float64Pass(fx.Interpreter):
    """Runs a float64 copy of a graph module, recording every node's value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        v = super().run_node(n)
        self.values[n] = v
        return v

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return _to_float64(super().get_attr(target, args, kwargs))


def _to_float64(v: Any) -> Any:
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.double()
    if isinstance(v, tuple | list):
        return type(v)(_to_float64(t) for t in v)
    return v


def reference_values(gm: fx.GraphModule, gm64: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value (keyed by the nodes of `gm`) from a run of its float64 copy `gm64` on x."""
    interp = _Float64Pass(gm64)
    interp.run(x.double())
    by_name = {n.name: v for n, v in interp.values.items()}
    return {n: by_name[n.name] for n in gm.graph.nodes if n.name in by_name}


def _like(ref: Any, ours: Any) -> Any:
    """`ref` (float64 values) cast to the dtypes of `ours` (tensors, or tuples of them); non-tensors: ours."""
    if isinstance(ours, torch.Tensor) and isinstance(ref, torch.Tensor) and ours.is_floating_point():
        return ref.to(ours.dtype)
    if isinstance(ours, tuple | list) and isinstance(ref, tuple | list) and len(ours) == len(ref):
        return type(ours)(_like(r, o) for r, o in zip(ref, ours, strict=True))
    return ours


def _wants_dense(unit: Unit, ins: list[Delta]) -> bool:
    """Whether `unit` runs its dense form on these (filtered) inputs: by its mode, and in "auto" by break-even."""
    mode = unit.mode
    if mode != "auto":
        return mode == "dense"
    frac = 0.0
    for d in ins:
        if isinstance(d, PixelDelta):
            frac = max(frac, d.active / d.num_pixels)
        elif d is not None:
            return True
    be = unit.measured_break_even
    return frac > (unit.break_even if be is None else be)


class _SeedEnv:
    """Seeding env of the dense pass: `env(node)` the full value computed so far (a LazyValue is computed now),
    `env.given(node)` a precomputed one (or None; see deluceva.delta.base.given), `env.shape(node)` its shape.
    lazy: seeding from given values, units may hand on LazyValues."""

    __slots__ = ("full", "values", "lazy")

    def __init__(self, full: dict[fx.Node, Any], values: dict[fx.Node, Any]) -> None:
        self.full, self.values = full, values
        self.lazy = bool(values)

    def __call__(self, node: fx.Node) -> Any:
        v = self.full[node]
        if type(v) is LazyValue:
            v = self.full[node] = v.get()
        return v

    def given(self, node: fx.Node) -> Any:
        return self.values.get(node)

    def shape(self, node: fx.Node) -> Any:
        return self.full[node].shape



def _seed_shapes_only(unit: Unit, env: _SeedEnv) -> Any:
    """Seed a unit that `seeds_shapes_only`: when seeding lazily with the input shapes of its last seed, skip its
    seed (what it derives is unchanged) and hand on its output as a LazyValue; else seed it on full values."""
    shapes = tuple((tuple(env.shape(n)), getattr(env.full[n], "dtype", None)) for n in unit.var_nodes)
    last = getattr(unit, "_seeded_for", None)
    if env.lazy and last is not None and last[0] == shapes:
        return LazyValue(lambda: unit.run(*unit.materialize(env)), *last[1])
    out = unit.seed(env)
    unit._seeded_for = (shapes, (tuple(out.shape), out.dtype)) if isinstance(out, torch.Tensor) else None
    return out


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


# units that only move values: a position of their output holds whole positions of their inputs (channels of one
# pixel stay together; see DeltaNetwork._filters_reading_input)
_REARRANGING = (SpatialSliceUnit, ChannelCatUnit, IdentityUnit)


class DeltaNetwork(nn.Module):
    """Stateful delta-converted network: `out = net(x)` with the full input, same output structure as the original.

    filter_pct: one target filtering percentage (0..100) for all filters, settable between frames.
    last_stats: per-unit dicts of the last frame; last_dense: whether the last frame ran dense; last_changed: False
    when the last frame changed no output (no input change forwarded and no filter with anything to forward: every
    unit was skipped and the outputs are the previous frame's, exactly). collect_timing: measure every unit's time
    (`last_stats` "ms"; NaN when off). idle_shortcut: such frames skip the unit loop as a whole (off: every unit is
    visited and skipped one by one, the same result; for measuring the cost of a skipped unit).
    """

    # Exact runs re-seed from the float64 pass after this many delta frames: the float32 rounding of each frame's
    # delta arithmetic accumulates like sqrt(frames) (YOLOX-Nano, car video at 768x448: the output is 1.0e-4 of its
    # scale off a float64 run after 280 frames without; <= 3.5e-5 over 300 frames with it). Idle frames add none.
    EXACT_RESEED = 100
    # Re-seeds keep the filters' scale (the relative floor's std of each input, measured on the stream's first seed)
    # so that they need no activation values; a seed this many frames after it measures the scale again (lighting
    # drifts over a long stream, day to night).
    RESCALE_FRAMES = 900

    def __init__(self, gm: fx.GraphModule, config: FilterConfig, filter_all: bool = False) -> None:
        super().__init__()
        self.gm = gm
        self.config = config
        self.filter_all = filter_all
        self.collect_timing = True
        self.idle_shortcut = True
        self._gm64: fx.GraphModule | None = None  # float64 copy of gm for exact seeding, made on first use
        self._build()
        self.reset()

    # ---------------------------------------------------------------- settings
    @property
    def filter_pct(self) -> float:
        return self.config.filter_pct

    @filter_pct.setter
    def filter_pct(self, value: float) -> None:
        v = float(value)
        if not 0.0 <= v <= 100.0:
            raise ValueError(f"filter_pct must be in [0, 100], got {value}")
        self.config.filter_pct = v

    @property
    def granularity(self) -> str:
        return self.config.granularity

    @granularity.setter
    def granularity(self, value: str) -> None:
        if value not in ("element", "pixel", "tile"):
            raise ValueError(f"granularity must be 'element', 'pixel' or 'tile', got {value!r}")
        self.config.granularity = value

    @property
    def noise_floor(self) -> float:
        return self.config.noise_floor

    @noise_floor.setter
    def noise_floor(self, value: float) -> None:
        self.config.noise_floor = float(value)

    @property
    def unit_names(self) -> list[str]:
        """Names of the varying units in execution order (the names in `last_stats`)."""
        return [s.unit.name for s in self.delta_steps]

    def unit_modes(self) -> dict[str, str]:
        """Current mode of every varying unit ("delta" | "dense" | "auto")."""
        return {s.unit.name: s.unit.mode for s in self.delta_steps}

    def set_unit_modes(self, modes: dict[str, str]) -> None:
        """Set units' execution modes by name: "delta" (sparse form), "dense" (dense form, still emitting a delta),
        "auto" (dense when the incoming active fraction exceeds the unit's break-even). Units not named keep their
        mode. Switchable between frames; state and exactness are kept. Raises ValueError on unknown names/modes."""
        by_name = self._units_named(modes)
        wrong = {n: m for n, m in modes.items() if m not in UNIT_MODES}
        if wrong:
            raise ValueError(f"unit modes must be one of {UNIT_MODES}, got {wrong}")
        for n, m in modes.items():
            by_name[n].mode = m

    def set_break_evens(self, values: dict[str, float | None]) -> None:
        """Per unit name, the active fraction above which an "auto" unit runs its dense form (measured on this
        machine: CostModel.break_even); None restores the unit's built-in estimate. Raises ValueError on unknown
        names."""
        by_name = self._units_named(values)
        for n, v in values.items():
            by_name[n].measured_break_even = None if v is None else float(v)

    def _units_named(self, names: Iterable[str]) -> dict[str, Unit]:
        """Every varying unit by name; ValueError when one of `names` is none of them."""
        by_name = {s.unit.name: s.unit for s in self.delta_steps}
        bad = [n for n in names if n not in by_name]
        if bad:
            raise ValueError(f"unknown unit(s) {bad[:5]}; see DeltaNetwork.unit_names")
        return by_name

    # ---------------------------------------------------------------- build
    def _build(self) -> None:
        gm = self.gm
        ctx = BuildContext(gm, self.config, self.filter_all)
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if not placeholders or any(not n.args for n in placeholders[1:]):
            raise ModelError(f"cannot convert: the network must take exactly one input tensor, has {len(placeholders)}")
        self.input_node = placeholders[0]
        self.output_node = next(n for n in nodes if n.op == "output")
        slot: dict[fx.Node, int] = {self.input_node: 0}
        fused: set[fx.Node] = set()
        deferred: dict[fx.Node, Step] = {}  # a fused unit runs where its last node was (its inputs exist by then)
        self.steps: list[Step] = []  # every unit, in graph order (dense pass)
        for node in nodes:
            if node in deferred:
                self.steps.append(deferred.pop(node))
                continue
            if node is self.input_node or node.op == "output" or node in fused:
                continue
            var_nodes = ctx.var_nodes(node)
            if node.op == "placeholder":  # a forward() argument with a default: that constant
                unit: Unit = StaticUnit(node, [], node.args[0])
            elif node.op == "get_attr":
                unit = StaticUnit(node, [], _fetch_attr(gm, str(node.target)))
            elif not node.meta.get(VARYING):
                unit = StaticUnit(node, [], ctx.module(node))
            elif node.meta.get(DENSE):
                unit = RecomputeUnit(node, var_nodes, ctx.module(node))
            else:
                factory = lookup(node, ctx)
                made = factory(node, ctx) if factory is not None else None
                unit = made if made is not None else RecomputeUnit(node, var_nodes, ctx.module(node))
            chain = list(getattr(unit, "fused", []))
            out_node = chain[-1] if chain else node
            fused.update(chain[:-1])
            slot[out_node] = len(slot)
            step = Step(unit, [slot[n] for n in unit.var_nodes], slot[out_node], node)
            unit.config = self.config
            self._add_filters(step, ctx)
            if chain:
                deferred[out_node] = step
            else:
                self.steps.append(step)
        self.slot_of = slot
        self.n_slots = len(slot)

        self.delta_steps = [s for s in self.steps if not isinstance(s.unit, StaticUnit)]
        self.out_nodes = self.output_node.all_input_nodes
        self._filters = [f for s in self.delta_steps for f in s.filters if f is not None]
        self._first_filters = [next((f for f in s.filters if f is not None), None) for s in self.delta_steps]
        self._out_slots = [(n, self.slot_of[n]) for n in self.out_nodes if n.meta.get(VARYING)]
        self._input_filters = self._filters_reading_input()

    def _filters_reading_input(self) -> list[PixelFilter]:
        """The filters that see the network input (slot 0) first: those of the units reading it, or reading it
        through units that only move its values (a Focus stem's slices and concat: each of their positions holds
        whole input pixels, so its largest change is the largest of those pixels'). Empty unless every such read
        filters per pixel and no rearranged copy of the input reaches an output or an unfiltered unit otherwise."""
        if self.config.granularity != "pixel":
            return []
        carried, filters = {0}, []
        for s in self.delta_steps:
            read = [i in carried for i in s.ins]
            if not any(read):
                continue
            if isinstance(s.unit, _REARRANGING) and not any(s.filters or []):
                if not all(read):  # input values mixed with others: a floor on the input would change what goes
                    return []
                carried.add(s.out)
                continue
            for i, f in zip(s.ins, s.filters or [None] * len(s.ins), strict=True):
                if i in carried:
                    if not isinstance(f, PixelFilter):
                        return []
                    filters.append(f)
        if any(slot in carried for _, slot in self._out_slots):
            return []
        return filters

    def _add_filters(self, step: Step, ctx: BuildContext) -> None:
        unit = step.unit
        if isinstance(unit, StaticUnit) or not unit.var_nodes:
            return
        if getattr(unit, "filtered", False):
            step.filters = [make_filter(ctx.shape(unit.var_nodes[0]), self.config)] + [None] * (
                len(unit.var_nodes) - 1
            )
        elif self.filter_all:
            step.filters = [
                make_filter(ctx.shape(n), self.config) if "tensor_meta" in n.meta and ctx.shape(n) else None
                for n in unit.var_nodes
            ]

    # ---------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget all state, the filters' average candidate counts included (a new stream): the next call runs
        dense."""
        for f in self._filters:
            f.count_ref = f.seed_floor = 0.0
        self._x: torch.Tensor | None = None
        self._outs: dict[fx.Node, _Output] = {}
        self._dense_next = True
        self.last_dense = True
        self.last_input_delta: Delta = None  # the input delta of the last delta frame (None: none, or not one)
        self.last_changed = True
        self._idle = False  # the last frame skipped every unit (see _run_idle)
        self._idle_since = 0  # first frame of the current run of idle frames
        self._env: list[Delta] = []
        self._frame = 0  # frames run since reset (keys the last_stats cache)
        self._forget_scales()
        self._deltas_since_seed = 0  # delta frames (idle ones not counted) since the last dense frame
        self._seed_dtype = self.config.seed_state_dtype  # the state dtype of the last seed
        self._stats_cache: tuple[int, list[dict[str, Any]]] | None = None

    def _forget_scales(self) -> None:
        """The next seed measures the filters' scales (a new stream, or RESCALE_FRAMES since they were)."""
        for f in self._filters:
            f.scale = None
        self._scaled_at = self._frame

    def refresh(self) -> None:
        """Make the next call run dense and re-seed every unit's state (the filters keep their average candidate
        counts: FilterConfig.count_smoothing)."""
        if not self._dense_next:  # (every frame of a stay on the dense engine: nn.Module's attribute set ~40 us)
            self._dense_next = True

    # ---------------------------------------------------------------- run
    def forward(self, x: torch.Tensor) -> Any:
        with torch.inference_mode():
            self._frame += 1
            if self.needs_seed(x):
                return self._run_dense(x)
            return self._run_delta(x)

    @property
    def input_filter_floor(self) -> float:
        """The smallest floor (input units) of the filters on the network input when every unit reading the input
        filters it per pixel, else 0: a change of the input at or under it would wait in those filters."""
        filters = self._input_filters
        return min(f.floor for f in filters) if filters else 0.0

    @property
    def input_floor(self) -> float:
        """The input delta's floor (input units): `config.input_floor`, raised to `input_filter_floor`. A change
        the input filters would hold waits in the input (x - applied) instead of their residuals: they then
        forward all they receive without listing the held pixels every frame (YOLOv5n 768x448, relative floor
        0.2: ~50k pixels, 13 grey levels, 0.5-1 ms per frame)."""
        return max(self.config.input_floor, self.input_filter_floor)

    def idle_frame(self) -> Any | None:
        """A call on an input the caller knows changes no pixel beyond `input_floor` against the input applied
        so far (the engine's uint8 InputMirror): the previous outputs, as `forward` would give, without the pass over
        the input. None, and nothing done, when such a call would not be idle: a seed is due (see `needs_seed`) or
        some filter would forward what it holds without new input."""
        x, cfg = self._x, self.config
        if (self._dense_next or x is None or not self.idle_shortcut
                or (cfg.exact and self._seed_dtype != cfg.seed_state_dtype)
                or (self._deltas_since_seed >= self.EXACT_RESEED and self.seeds_in_float64(x)) or not self._quiet()):
            return None
        with torch.inference_mode():
            self._frame += 1
            self.last_dense = False
            self.last_input_delta = None
            return self._run_idle()

    def needs_seed(self, x: torch.Tensor) -> bool:
        """Whether a call on x runs dense (first call, after reset()/refresh(), new shape or dtype, an exact run's
        periodic float64 re-seed, or a run turned exact whose state was seeded while filtering in a narrower
        dtype: FilterConfig.seed_state_dtype)."""
        cfg = self.config
        return self._dense_next or self._x is None or x.shape != self._x.shape or x.dtype != self._x.dtype or (
            cfg.exact and self._seed_dtype != cfg.seed_state_dtype) or (
            self._deltas_since_seed >= self.EXACT_RESEED and self.seeds_in_float64(x))

    @property
    def given_nodes(self) -> list[fx.Node]:
        """Graph nodes whose values `seed_from` can take precomputed (pre-activations, activations, pools: the
        units' expensive dense ops), in graph order."""
        return [n for s in self.delta_steps for n in s.unit.given_nodes()]

    @property
    def row_nodes(self) -> set[fx.Node]:
        """Given nodes whose values seeding only copies into channels-last state rows (`Unit.row_nodes`) or
        channels-last output mirrors (network outputs used by nothing else)."""
        terminal = {n for n in self.out_nodes if set(n.users) == {self.output_node}}
        return {n for s in self.delta_steps for n in s.unit.row_nodes()} | terminal

    def seed_from(self, x: torch.Tensor, values: dict[fx.Node, Any]) -> Any:
        """Seed every unit on input x like a dense call, taking the nodes' values from `values` (e.g. computed by a
        faster dense engine, keyed by `given_nodes`) instead of computing them; returns the network's output.
        Exact runs that seed in float64 (`needs_seed` docs) ignore `values` and run their float64 pass."""
        with torch.inference_mode():
            self._frame += 1
            return self._run_dense(x, None if self.seeds_in_float64(x) else values)

    def _result(self) -> Any:
        return fx.node.map_arg(self.output_node.args[0], lambda n: self._outs[n].get())

    def seeds_in_float64(self, x: torch.Tensor) -> bool:
        """Exact runs (0% filtered) with float64 state seed from a float64 pass of the original network, so the state
        does not carry the float32 rounding of the seed frame (YOLOX-Nano's float32 output is ~1e-4 off float64)."""
        cfg = self.config
        return cfg.exact and cfg.state_dtype == torch.float64 and x.dtype == torch.float32

    def _run_dense(self, x: torch.Tensor, values: dict[fx.Node, Any] | None = None) -> Any:
        self._idle = False
        self.last_changed = True
        ref = None
        if values is None and self.seeds_in_float64(x):
            if self._gm64 is None:
                self._gm64 = copy.deepcopy(self.gm).double()
            ref = reference_values(self.gm, self._gm64, x)
        if self._frame - self._scaled_at >= self.RESCALE_FRAMES:
            self._forget_scales()
        full: dict[fx.Node, Any] = {self.input_node: x}
        env = _SeedEnv(full, values or {})
        perf = time.perf_counter
        for step in self.steps:
            t0 = perf()
            unit = step.unit
            out = _seed_shapes_only(unit, env) if unit.seeds_shapes_only else unit.seed(env)
            chain = getattr(unit, "fused", [])
            if ref is not None:  # downstream units seed from the float64 values rounded once, not from ours
                out_node = chain[-1] if chain else step.node
                out = _like(ref[out_node], out)
            full[step.node] = out
            if step.filters:
                for f, n in zip(step.filters, unit.var_nodes, strict=True):
                    if f is not None:
                        f.seed(full[n])  # a LazyValue: a re-seed keeps the scale, no value needed
            step.ms = (perf() - t0) * 1e3
            step.last_in = []
            step.ran = "dense"
            for f in chain:
                full[f] = out
        self._x = x.detach().clone()
        self._outs = {n: _Output(env(n), self.config.seed_state_dtype) for n in self.out_nodes}
        self._seed_dtype = self.config.seed_state_dtype
        self._dense_next = False
        self._deltas_since_seed = 0
        self.last_dense = True
        return self._result()

    def _run_delta(self, x: torch.Tensor) -> Any:
        if x.dim() == 4 and x.is_floating_point() and x.is_contiguous():
            floor = self.input_floor
            coherence = effective_coherence(floor, self.config.input_coherence) if floor > 0.0 else 0.0
            dx = input_delta(x, self._x, floor, coherence)  # self._x: the input applied so far
        else:
            dx = x - self._x
            self._x = x.detach().clone()
            if not isinstance(dx, torch.Tensor) or not bool(dx.any()):
                dx = None
        self.last_input_delta = dx
        self.last_dense = False
        if dx is None and self.idle_shortcut and self._quiet():
            return self._run_idle()
        self._idle = False
        self._deltas_since_seed += 1
        env: list[Delta] = [None] * self.n_slots
        env[0] = dx
        timing = self.collect_timing
        perf = time.perf_counter
        t0 = 0.0
        for step in self.delta_steps:
            if timing:
                t0 = perf()
            ins = [env[i] for i in step.ins]
            step.last_in = ins
            filters = step.filters
            if filters:
                ins = [d if f is None else f(d) for f, d in zip(filters, ins, strict=True)]
            unit = step.unit
            for d in ins:
                if d is not None:
                    break
            else:  # every input unchanged: skip the unit
                unit.macs = 0
                env[step.out] = None
                step.ran = "delta"
                if timing:
                    step.ms = (perf() - t0) * 1e3
                continue
            mode = unit.mode
            if unit.has_dense and mode != "delta" and (mode == "dense" or _wants_dense(unit, ins)):
                env[step.out] = unit.dense_call(*ins)
                step.ran = "dense"
            else:
                env[step.out] = unit(*ins)
                step.ran = "delta"
            if timing:
                step.ms = (perf() - t0) * 1e3
        self._env = env
        outs, changed = self._outs, False
        for n, slot in self._out_slots:
            d = env[slot]
            if d is not None:
                changed = True
                outs[n].add(d)
        self.last_changed = changed
        return self._result()

    def _quiet(self) -> bool:
        """Whether no filter would forward anything without new input (nothing pending, or all of it held back)."""
        for f in self._filters:
            if f.pending and not f.quiet():
                return False
        return True

    def _run_idle(self) -> Any:
        """A frame with nothing to propagate: every unit is skipped, the outputs are the previous frame's."""
        for f in self._filters:
            f.skip()
        if not self._idle:
            self._idle_since = self._frame
        self._idle = True
        self.last_changed = False
        return self._result()

    # ---------------------------------------------------------------- statistics
    @property
    def frames_since_reset(self) -> int:
        """Calls since construction or the last reset() (identifies the frame `last_*` describe)."""
        return self._frame

    @property
    def last_skipped(self) -> bool:
        """Whether the last frame skipped the unit loop as a whole (nothing to propagate; see `last_changed`)."""
        return self._idle

    @property
    def units(self) -> list[Unit]:
        """The varying units in execution order."""
        return [s.unit for s in self.delta_steps]

    @property
    def last_stats(self) -> list[dict[str, Any]]:
        """Per-unit statistics of the last frame (see module docs of deluceva.convert). Built once per frame; frames
        that skipped every unit in a row share their rows."""
        cached = self._stats_cache
        if cached is not None and (cached[0] == self._frame or (self._idle and cached[0] >= self._idle_since)):
            return list(cached[1])
        rows = self._stats_rows()
        self._stats_cache = (self._frame, rows)
        return list(rows)

    def _stats_rows(self) -> list[dict[str, Any]]:
        rows = []
        dense, idle, timing, env = self.last_dense, self._idle, self.collect_timing, self._env
        for s, filt in zip(self.delta_steps, self._first_filters, strict=True):
            u = s.unit
            if dense:
                fin = fout = 1.0
                macs = u.dense_macs
            elif idle:
                fin = fout = 0.0
                macs = 0
            else:
                ins = s.last_in
                fin = active_fraction(ins[0]) if len(ins) == 1 else max(map(active_fraction, ins), default=0.0)
                fout = active_fraction(env[s.out]) if env else 0.0
                macs = u.macs
            row = {
                "name": u.name,
                "kind": u.kind,
                "dense": dense,
                "mode": "delta" if idle else s.ran,
                "active_in": fin,
                "active_out": fout,
                "forwarded": None if filt is None or dense else filt.forwarded_fraction,
                "held_back": None if filt is None or dense else filt.held_back,
                "candidates": None if filt is None or dense else filt.candidates,
                "macs": int(macs),
                "dense_macs": int(u.dense_macs),
                "ms": 0.0 if idle else s.ms if timing or dense else float("nan"),
            }
            rows.append(row)
        return rows

    def describe(self) -> str:
        """One line per varying unit: name, kind, inputs, filter."""
        lines = []
        for s in self.delta_steps:
            f = "filter " if any(s.filters) else ""
            ins = ", ".join(n.name for n in s.unit.var_nodes)
            lines.append(f"{s.unit.name:<24} {s.unit.kind:<22} {f}<- {ins}")
        return "\n".join(lines)

