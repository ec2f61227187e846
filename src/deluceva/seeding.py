"""Seeding a DeltaNetwork from the fastest dense engine (ONNX Runtime) instead of its units' PyTorch dense forms.

A seeding frame (first frame, re-seed) computes every unit's full input and state. Done by the units themselves it
is a PyTorch eager pass plus the state set-up (YOLOv5n 768x448, 1 thread: 86 ms against ONNX Runtime's 38 ms for
the whole network). `OrtSeeder` exports the converted graph once with every value the units can take precomputed
(`DeltaNetwork.given_nodes`: pre-activations, activations, pools) as extra graph outputs, runs it in ONNX Runtime
and hands the values to `DeltaNetwork.seed_from`; the units then only set up their state. Values that only become
channels-last state rows or output mirrors (`DeltaNetwork.row_nodes`: the pre-activations of convs, the outputs)
are exported transposed to NHWC, which ONNX Runtime does ~3x faster than PyTorch's NCHW -> rows copy (YOLOv5n
768x448: a re-seed 111-128 -> 94-108 ms).

Exact runs (0% filtered, float64 state) keep seeding from their float64 pass (`seed_from` ignores the values).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import fx

from deluceva.dense import onnxruntime_run
from deluceva.errors import ModelError

WARMUP_RUNS = 2


def values_module(gm: fx.GraphModule, nodes: list[fx.Node], nhwc: Collection[fx.Node] = ()) -> fx.GraphModule:
    """A copy of `gm` whose output is the tuple of the values of `nodes` (nodes of gm's graph), in that order; those
    in `nhwc` (4-D) permuted to (N, H, W, C)."""
    graph = fx.Graph()
    val_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(gm.graph, val_map)
    outs = [graph.call_method("permute", (val_map[n], 0, 2, 3, 1)) if n in nhwc else val_map[n] for n in nodes]
    graph.output(tuple(outs))
    return fx.GraphModule(gm, graph)


class OrtSeeder:
    """`seeder(net, x)` seeds `net` on x from one ONNX Runtime run and returns its output (like `net(x)` on a
    seeding frame). Built once per network and input size (one ONNX export and two warm-up runs, ~0.5-3 s);
    `threads` intra-op threads.
    Raises deluceva.errors.ModelError when the graph does not export."""

    def __init__(self, net: Any, input_hw: tuple[int, int], threads: int) -> None:
        self.net = net
        self.nodes = list(dict.fromkeys(n for n in net.given_nodes if _is_tensor(n)))
        rows = net.row_nodes
        self.nhwc = [n in rows and _is_tensor(n, dims=4) for n in self.nodes]
        self.input_hw = (int(input_hw[0]), int(input_hw[1]))
        nhwc = [n for n, t in zip(self.nodes, self.nhwc, strict=True) if t]
        # no spinning: the session runs now and then, and its busy-waiting workers would slow the state set-up
        self._run = onnxruntime_run(values_module(net.gm, self.nodes, nhwc), self.input_hw, threads, spinning=False,
                                    reuse_outputs=True)  # no fresh pages per re-seed (~30% of one)
        x0 = torch.zeros(1, 3, *self.input_hw)
        for _ in range(WARMUP_RUNS):  # ONNX Runtime's first runs plan and grow its memory: 2x a steady run
            self._run(x0)

    def fits(self, x: torch.Tensor) -> bool:
        """Whether x is a frame this seeder was built for: float32 (1, 3, H, W) at its input size."""
        return x.dtype == torch.float32 and tuple(x.shape) == (1, 3, *self.input_hw)

    def __call__(self, x: torch.Tensor) -> Any:
        """Seed the network on x; x that does not fit, or an exact network seeding in float64, seeds itself."""
        net = self.net
        if not self.fits(x) or net.seeds_in_float64(x):
            net.refresh()
            return net(x)
        return net.seed_from(x, self.values(x))

    def values(self, x: torch.Tensor) -> dict[fx.Node, torch.Tensor]:
        """The given nodes' values on x from one ONNX Runtime run; NHWC exports as channels-last views of their
        NCHW shape. Every call writes into the same buffers: a call's values are the next call's (the state a
        re-seed builds on them is replaced by the next re-seed)."""
        outs = self._run(x)
        return {n: v.permute(0, 3, 1, 2) if t else v for n, v, t in zip(self.nodes, outs, self.nhwc, strict=True)}


def make_seeder(net: Any, input_hw: tuple[int, int], threads: int) -> tuple[OrtSeeder | None, str]:
    """(the ONNX Runtime seeder of `net`, "") or (None, why) when its graph does not export: it then seeds itself."""
    try:
        return OrtSeeder(net, input_hw, threads), ""
    except ModelError as e:
        return None, str(e)


def _is_tensor(node: fx.Node, dims: int | None = None) -> bool:
    """Whether node's value is a floating-point tensor (with `dims` dimensions when given)."""
    tm = node.meta.get("tensor_meta")
    return (tm is not None and hasattr(tm, "shape") and tm.dtype.is_floating_point
            and (dims is None or len(tm.shape) == dims))
