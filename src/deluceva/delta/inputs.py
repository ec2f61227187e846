"""The network input's delta with a noise floor: changes are held back until they exceed the floor.

State: the input applied so far `x_applied` (N, C, H, W). Per frame: a = x - x_applied; forward every pixel whose
max-over-channels |a| exceeds `floor` (all channels of it), and set x_applied = x there. What is held back is exactly
x - x_applied, so nothing is dropped: a pixel drifting slowly is forwarded once its accumulated change exceeds the
floor. floor = 0 forwards every changed pixel (exact). One vectorised pass over the input, no per-pixel loops.
"""

from __future__ import annotations

import torch

from deluceva.delta.pixels import PixelDelta


def input_delta(x: torch.Tensor, applied: torch.Tensor, floor: float) -> PixelDelta | None:
    """PixelDelta of x (N, C, H, W) against `applied` (updated in place at the forwarded pixels); None if none."""
    n, c, h, w = x.shape
    d = x - applied
    mask = d.abs().amax(1) > floor  # (N, H, W)
    idx = mask.reshape(-1).nonzero().squeeze(1)
    if idx.numel() == 0:
        return None
    if n == 1:
        vals = d.view(c, h * w).index_select(1, idx).t().contiguous()
        applied.view(c, h * w).index_copy_(1, idx, x.reshape(c, h * w).index_select(1, idx))
    else:
        vals = d.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c).index_select(0, idx)
        flat = applied.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a copy for NCHW: write back below
        flat.index_copy_(0, idx, rows)
        applied.copy_(flat.view(n, h, w, c).permute(0, 3, 1, 2))
    return PixelDelta(idx, vals, (n, c, h, w))
