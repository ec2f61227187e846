"""Warm-up of a converted network's kernels before its first real frame.

The numba kernels are compiled once (cached on disk) but load on their first call per argument types, 5-25 ms
each, paid by the first delta frames of a process that reach them (measured, YOLOv5n 768x448 at 75%: the first
delta frame 31 ms instead of 9 ms, the first to reach the max-pools 61 ms instead of 14 ms). `warm_up` runs a short
synthetic clip through every unit in its delta form (a seed, a change of a few pixels, a change everywhere, a change of
a small region) so that the few-pixel and the many-pixel kernel paths of every unit are loaded, then resets the
network and restores its unit modes and filtering percentage. The filters run at WARMUP_PCT (any filtering > 0
selects the same float32 kernels), which forwards nearly every change, so that the changes reach the deepest units.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

WARMUP_PCT = 1e-3
# the input pass with a floor and coherence (its own kernels: loading them cost the first real delta frame ~13 ms,
# YOLOv5n 224x128, which a probe of the delta network then measured as lost): floor and coherence in the clip's units
WARMUP_INPUT_FLOOR = 0.05


def synthetic_clip(shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """Four (N, C, H, W) float32 frames in [0, 1]: a smooth random image (structure at 1/16 of the size), the same
    with a 4x4 patch raised, a global contrast change of the first, and a 32x32 patch raised elsewhere."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, c, max(1, h // 16), max(1, w // 16), generator=gen)
    base = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    small = base.clone()
    small[..., h // 3:h // 3 + 4, w // 3:w // 3 + 4] += 0.3
    region = base.clone()
    region[..., (2 * h) // 3:(2 * h) // 3 + 32, (2 * w) // 3:(2 * w) // 3 + 32] += 0.3
    return [base, small, base * 0.9 + 0.05, region]


def warm_up(net: Any, shape: tuple[int, ...]) -> float:
    """Run `synthetic_clip(shape)` through `net` (a DeltaNetwork) with every unit in delta mode, its filters at
    WARMUP_PCT (0 stays 0: exact runs use other kernels); reset it and restore its unit modes and filtering
    percentage. Returns the ms spent."""
    t0 = time.perf_counter()
    modes = {s.unit.name: s.unit.mode for s in net.delta_steps}
    pct = net.filter_pct
    cfg = net.config
    floors = cfg.input_floor, cfg.input_coherence
    try:
        net.set_unit_modes(dict.fromkeys(modes, "delta"))
        net.filter_pct = min(pct, WARMUP_PCT) if pct > 0 else 0.0
        with torch.inference_mode():
            clip = synthetic_clip(shape)
            for x in clip:
                net(x)
            if pct > 0:  # again from the last frame, through the input pass with a floor and coherence
                cfg.input_floor = cfg.input_coherence = WARMUP_INPUT_FLOOR
                for x in clip[:2]:
                    net(x)
    finally:
        cfg.input_floor, cfg.input_coherence = floors
        net.set_unit_modes(modes)
        net.filter_pct = pct
        net.reset()
    return (time.perf_counter() - t0) * 1e3
