"""Check the cost model: predicted vs measured ms per delta frame of uniform and mixed plans on real frames."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from deluceva.plan.cost import CostModel
from deluceva.plan.planner import make_plan


def measure(net: Any, frames: Sequence[torch.Tensor], modes: Mapping[str, str], pct: float) -> float:
    """Median ms per delta frame over frames[1:] (frames[0] seeds) with unit modes `modes` at `pct`."""
    net.reset()
    net.filter_pct = pct
    net.set_unit_modes(dict(modes))
    ms = []
    with torch.inference_mode():
        net(frames[0])
        for x in frames[1:]:
            t0 = time.perf_counter()
            net(x)
            ms.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ms)


def validate(net: Any, frames: Sequence[torch.Tensor], model: CostModel, pcts: Sequence[float]
             ) -> list[dict[str, Any]]:
    """Rows {pct, plan: all-dense|all-delta|mixed, predicted_ms, measured_ms, error (relative)}. Use the frames the
    profile was measured on: at P > 0 held-back residuals make a frame's cost depend on the frames before it."""
    rows = []
    for p in pcts:
        plans = {"all-dense": model.uniform("dense"), "all-delta": model.uniform("delta"),
                 "mixed": make_plan(model, p).modes}
        for name, modes in plans.items():
            pred, meas = model.predict(modes, p), measure(net, frames, modes, p)
            rows.append({"pct": float(p), "plan": name, "predicted_ms": pred, "measured_ms": meas,
                         "error": (pred - meas) / meas if meas > 0 else 0.0})
    net.set_unit_modes(model.uniform("auto"))
    return rows
