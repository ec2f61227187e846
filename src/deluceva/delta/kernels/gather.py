"""Output-centric sparse conv for few input channels: gather an im2col patch per affected output pixel.

For a conv with small Cin*K*K (the 3-channel first conv of a detector) the input-centric scatter moves
A*T*Cout floats, while the affected outputs of a clustered change are few (about A/stride^2) and their patches
are short. Steps (numba):
1. the affected outputs (reachable from the active inputs), sorted unique, via marks;
2. the delta is written into a persistent zeroed channels-last map (N*H*W, Cin);
3. patches (B, K*K*Cin) are gathered from it (zero outside the image) and multiplied by W (K*K*Cin, Cout);
4. the map is re-zeroed at the active pixels only.
Scattered changes touch nearly every output of such a layer; the dense path is the better choice there.
"""

from __future__ import annotations

import numpy as np
import torch

from deluceva.delta.kernels._jit import jit
from deluceva.delta.kernels.phases import PhasePlan
from deluceva.delta.kernels.scatter import reach_nb


@jit
def _patches_nb(outs, pix, vals, dmap, h, w, ho, wo, kh, kw, sy, sx, py, px, dy, dx):
    """(B, Kh*Kw*Cin) im2col rows of the delta at output pixels `outs`; dmap holds the delta meanwhile."""
    cin = vals.shape[1]
    for i in range(pix.shape[0]):
        for c in range(cin):
            dmap[pix[i], c] = vals[i, c]
    hw = h * w
    ohw = ho * wo
    b = outs.shape[0]
    patches = np.zeros((b, kh * kw * cin), np.float32)
    for j in range(b):
        o = outs[j]
        n = o // ohw
        r = o - n * ohw
        oy = r // wo
        ox = r - oy * wo
        for ky in range(kh):
            iy = oy * sy - py + ky * dy
            if iy < 0 or iy >= h:
                continue
            for kx in range(kw):
                ix = ox * sx - px + kx * dx
                if ix < 0 or ix >= w:
                    continue
                src = n * hw + iy * w + ix
                base = (ky * kw + kx) * cin
                for c in range(cin):
                    patches[j, base + c] = dmap[src, c]
    for i in range(pix.shape[0]):
        for c in range(cin):
            dmap[pix[i], c] = 0
    return patches


class GatherConv:
    """Output-centric sparse conv (groups=1, numba): `affected(index)` then `compute(outs, index, values)`.

    weight: (Cout, Cin, Kh, Kw); plan: the conv's PhasePlan (for the affected-output set); geometry as F.conv2d.
    """

    def __init__(
        self,
        plan: PhasePlan,
        weight: torch.Tensor,
        in_shape: tuple[int, int, int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ):
        cout, cin, kh, kw = weight.shape
        n, _, h, w = in_shape
        self.plan = plan
        self.kernel, self.stride, self.padding, self.dilation = (kh, kw), stride, padding, dilation
        self.wmat = weight.permute(2, 3, 1, 0).reshape(kh * kw * cin, cout).contiguous()  # (K*K*Cin, Cout)
        rows_out = n * plan.out_hw[0] * plan.out_hw[1]
        self._dmap = np.zeros((n * h * w, cin), np.float32)
        self._mark = np.zeros(rows_out, np.uint8)
        self._touched = np.empty(rows_out, np.int64)

    @property
    def patch(self) -> int:
        """Floats gathered per affected output pixel (K*K*Cin)."""
        return int(self.wmat.shape[0])

    def affected(self, pix: torch.Tensor) -> torch.Tensor:
        """Sorted unique output pixels reachable from the active input pixels."""
        p = self.plan
        return torch.from_numpy(
            reach_nb(pix.numpy(), *p.in_hw, *p.out_hw, *p.mul, *p.div, p.ntaps, p.off0_y, p.off0_x, p.rel_y,
                      p.rel_x, self._mark, self._touched)
        )  # fmt: skip

    def compute(self, outs: torch.Tensor, pix: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """Output delta rows (B, Cout) at `outs` (from `affected(pix)`) for the delta (pix, vals)."""
        p = self.plan
        patches = _patches_nb(outs.numpy(), pix.numpy(), vals.numpy(), self._dmap, *p.in_hw, *p.out_hw,
                              *self.kernel, *self.stride, *self.padding, *self.dilation)  # fmt: skip
        return torch.mm(torch.from_numpy(patches), self.wmat)
