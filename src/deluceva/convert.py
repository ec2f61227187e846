"""`convert(module, example_input) -> DeltaNetwork`: capture -> passes -> delta units (see DESIGN.md "Conversion").

Pipeline, like FX graph-mode quantization: `graph.capture` (symbolic trace + shape propagation), the canonicalising
passes of `graph.passes` (functionalize in-place ops, drop identities, canonicalise aliases, fold BatchNorm, fuse
x*sigmoid(x) -> silu), shape propagation again, `mark_varying`, `mark_dense` (warns once per operator without a delta
form), then `delta.network.DeltaNetwork` compiles the graph into a flat program of delta units.

Using the result (a stateful nn.Module):
    net = convert(module, x0)          # exact at filter_pct = 0
    out = net(frame)                   # full input in, same output structure as module(frame) out
    net.filter_pct = 90                # one target for every filter, settable between frames
    net.refresh()                      # next call runs dense and re-seeds all state; net.reset() forgets it
    net.last_dense                     # whether the last call ran dense (first call, after reset/refresh, new shape)
    net.unit_names / net.set_unit_modes({name: "delta" | "dense" | "auto"})   # per-unit execution form
    net.last_stats                     # per unit: name, kind, dense, mode (form that ran: dense|delta),
                                       # active_in / active_out (fraction of pixels or
                                       # elements with a non-zero delta), forwarded / held_back / candidates at its
                                       # filter, macs (executed, input-centric) / dense_macs, ms
"""

from __future__ import annotations

import torch
from torch import nn

from deluceva.delta.base import FilterConfig
from deluceva.delta.network import DeltaNetwork
from deluceva.delta.registry import BuildContext, lookup
from deluceva.errors import ModelError
from deluceva.graph.capture import capture, shape_prop
from deluceva.graph.passes import canonical_passes, mark_dense, mark_varying

GRANULARITIES = ("element", "pixel", "tile")


def convert(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    filter_pct: float = 0.0,
    granularity: str = "pixel",
    noise_floor: float = 0.0,
    tile: int = 8,
    filter_all: bool = False,
    state_dtype: torch.dtype = torch.float64,
    input_floor: float = 0.0,
    relative_floor: float = 0.0,
    warmup: bool = True,
) -> DeltaNetwork:
    """Convert `module` (fx-traceable, eval mode is applied to a copy) into a stateful DeltaNetwork.

    example_input: a tensor like the frames to come (shapes may change later; a change runs dense).
    filter_pct: target percentage of candidate granules held back at every filter (0 = exact).
    granularity: "element" | "pixel" | "tile" (tile x tile pixels). noise_floor: granules with magnitude <= it are
    never forwarded. filter_all: filters in front of every unit input, not only conv / conv_transpose / linear.
    state_dtype: accumulation dtype of the units' full-value state (float64: no drift over hundreds of frames beyond
    the float32 noise of the dense network; float32: less memory traffic). With float64 state, a dense frame run
    while exact (0% filtered, no floors) seeds the state from a float64 pass of the network, so the delta output
    tracks the float64 network rather than carrying the seed frame's float32 rounding. States seeded while filtering
    are float32 (`net.config.filtered_state_dtype`; None keeps state_dtype). input_floor: changes of the
    network input are held back until their accumulated magnitude exceeds it (input units; e.g. 3 grey levels *
    input scale, above codec noise). relative_floor: every filter's noise floor is relative_floor * the std of its
    input at the last dense frame (deep layers re-sparsify). Both are settable later on `net.config`. warmup: run one
    dense and one delta frame on the example input (then reset), so that kernel compilation/loading does not land on
    the first frames.
    Raises ModelError (one line) when the module cannot be traced or the example input fails.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 0.0 <= float(filter_pct) <= 100.0:
        raise ValueError(f"filter_pct must be in [0, 100], got {filter_pct}")
    if not isinstance(example_input, torch.Tensor):
        raise ModelError("cannot convert: example_input must be a tensor")
    gm = capture(module, example_input)
    gm = canonical_passes(gm)
    gm = shape_prop(gm, example_input)
    gm = mark_varying(gm)
    config = FilterConfig(filter_pct=float(filter_pct), granularity=granularity, noise_floor=float(noise_floor),
                          tile=int(tile), state_dtype=state_dtype, input_floor=float(input_floor),
                          relative_floor=float(relative_floor))
    ctx = BuildContext(gm, config, filter_all)
    gm = mark_dense(gm, lambda node: lookup(node, ctx) is not None)
    net = DeltaNetwork(gm, config, filter_all=filter_all)
    if warmup:
        _warm_up(net, example_input)
    return net


def _warm_up(net: DeltaNetwork, x: torch.Tensor) -> None:
    """One dense frame, one delta frame with a few changed pixels (at the network's filter setting), then reset."""
    g = torch.Generator().manual_seed(0)
    bumped = x.detach().clone()
    if bumped.is_floating_point():
        mask = torch.rand(bumped.shape, generator=g) < 0.01
        bumped = bumped + mask.to(bumped.dtype) * 0.05
    net(x)
    net(bumped)
    net.reset()
