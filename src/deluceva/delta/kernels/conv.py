"""Sparse delta convolutions on PixelDeltas (no bias): Δy = conv(Δx) at every affected output pixel.

Formulations (chosen at preparation from the layer's shape):
- 1x1 kernels ("direct"): each input pixel feeds at most one output pixel, monotonically, so the output index
  set is an index mapping of the input one and the values are one gather-GEMM (A, Cin) @ (Cin, Cout).
- k > 1 ("input-centric", ScatterConv): one GEMM per stride phase class over only the taps that class reaches,
  then one scatter-add pass into a persistent zeroed buffer and a collect of the touched rows.
- few input channels (Cin <= 4, the RGB first conv; numba): per call, if the affected outputs' im2col
  patches are under half the floats of the scattered contributions (clustered changes), gather patches and
  GEMM instead (GatherConv, 1.3-2x faster on the RGB first conv); otherwise scatter.
- depthwise (Cin/groups == Cout/groups == 1): no GEMM, a fused multiply + scatter.
- other grouped convs: batched GEMM over groups.
- optionally (`dense_above`), above an active fraction: densify and run F.conv2d (exact; for dense deltas).

`SparseConvTranspose2d` uses the same scatter with taps o = i*stride + k*dilation - padding (one class).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from deluceva.delta.kernels._jit import NUMPY_GEMM_MAX_MACS, grown, jit, resolve_backend
from deluceva.delta.kernels.actstep import step_act_nb
from deluceva.delta.kernels.gather import GatherConv
from deluceva.delta.kernels.phases import PhasePlan
from deluceva.delta.kernels.scatter import ScatterConv
from deluceva.delta.pixels import PixelDelta

IntPair = int | tuple[int, int]


def _pair(v: IntPair) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_out_hw(
    hw: tuple[int, int], kernel: tuple[int, int], stride: IntPair, padding: IntPair, dilation: IntPair
) -> tuple[int, int]:
    """Output (Ho, Wo) of F.conv2d for input (H, W)."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    ho, wo = ((hw[a] + 2 * p[a] - d[a] * (kernel[a] - 1) - 1) // s[a] + 1 for a in range(2))
    return ho, wo


def conv_plan(
    in_hw: tuple[int, int], kernel: tuple[int, int], stride: IntPair, padding: IntPair, dilation: IntPair
) -> PhasePlan:
    """PhasePlan of F.conv2d: o = (i + padding - k * dilation) / stride."""
    s, p, d = _pair(stride), _pair(padding), _pair(dilation)
    out_hw = conv_out_hw(in_hw, kernel, s, p, d)
    offs = [p[a] - np.arange(kernel[a], dtype=np.int64) * d[a] for a in range(2)]
    return PhasePlan.build(in_hw, out_hw, kernel, offs[0], offs[1], (1, 1), s)


def _nonzero_rows(y: torch.Tensor) -> PixelDelta:
    """PixelDelta of the pixels of a dense (N, C, H, W) tensor with a non-zero channel."""
    n, c, h, w = y.shape
    rows = y.permute(0, 2, 3, 1).reshape(n * h * w, c)
    index = rows.abs().amax(1).ne(0).nonzero().squeeze(1)
    return PixelDelta(index, rows.index_select(0, index), (n, c, h, w))


# A 1x1 conv (stride 1, no padding) + activation on active pixels x Cin up to this runs in one kernel call
# (`_pointwise_act_nb`): its product loops reach ~12 GMAC/s (BLAS ~35) but save a GEMM call and a kernel call
SMALL_POINTWISE_MAX_ROWS = 4096


@jit
def _pointwise_act_nb(idx, vals, wmat, z, code, alpha, precise, out):
    """Δz = vals (A, Cin) @ wmat (Cin, Cout), then the fused activation step on the state rows z at idx
    (`actstep.step_act_nb`); Δy (A, Cout) is written into out[:A] (no array to box)."""
    a, cin = vals.shape
    cout = wmat.shape[1]
    dz = np.zeros((a, cout), np.float32)
    for i in range(a):
        row = dz[i]
        for k in range(cin):
            v = vals[i, k]
            wr = wmat[k]
            for j in range(cout):
                row[j] += v * wr[j]
    out[:a] = step_act_nb(z, idx, dz, code, alpha, precise)


class _Unit:
    """Shape check, empty fast path and dense fallback shared by the sparse convs."""

    in_shape: tuple[int, int, int, int]
    out_shape: tuple[int, int, int, int]
    dense_above: float | None
    last_path: str = ""  # formulation used by the last call: direct | scatter | gather | dense

    def __call__(self, delta: PixelDelta) -> PixelDelta:
        if delta.shape != self.in_shape:
            raise ValueError(f"delta shape {delta.shape} != prepared input shape {self.in_shape}")
        if delta.active == 0:
            return PixelDelta.empty(self.out_shape, delta.values.dtype)
        if self.dense_above is not None and delta.active_fraction > self.dense_above:
            self.last_path = "dense"
            return _nonzero_rows(self.dense(delta.to_dense()))
        return self._sparse(delta)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sparse(self, delta: PixelDelta) -> PixelDelta:
        raise NotImplementedError


class SparseConv2d(_Unit):
    """Sparse delta conv2d for one input shape: `__call__(Δx) -> Δy` on PixelDeltas, no bias.

    weight: (Cout, Cin/groups, Kh, Kw) as for F.conv2d; input_shape: (N, Cin, H, W). The output index is the
    sorted unique set of output pixels reachable from the active inputs (values may be zero there); for 1x1
    kernels exactly the mapped input pixels. backend: 'auto' | 'numba' | 'torch'. dense_above: active fraction
    above which the delta is densified and run through F.conv2d (output: the pixels with a non-zero row).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        input_shape: tuple[int, int, int, int],
        stride: IntPair = 1,
        padding: IntPair | str = 0,
        dilation: IntPair = 1,
        groups: int = 1,
        backend: str = "auto",
        dense_above: float | None = None,
    ):
        weight = weight.detach().to(torch.float32).contiguous()
        cout, cg, kh, kw = weight.shape
        n, cin, h, w = input_shape
        if cin != cg * groups or cout % groups:
            raise ValueError(f"weight {tuple(weight.shape)} does not fit input {input_shape}, groups={groups}")
        if isinstance(padding, str):
            if padding != "valid":
                raise ValueError("only integer padding or 'valid' is supported")
            padding = 0
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.weight, self.groups, self.dense_above = weight, groups, dense_above
        self._weight_cl = weight.contiguous(memory_format=torch.channels_last)
        self.in_shape = (n, cin, h, w)
        ho, wo = conv_out_hw((h, w), (kh, kw), self.stride, self.padding, self.dilation)
        if ho <= 0 or wo <= 0:
            raise ValueError(f"input {input_shape} too small for kernel {(kh, kw)}")
        self.out_shape = (n, cout, ho, wo)
        og = cout // groups
        self.direct = kh == kw == 1
        self._unit_stride = self.direct and self.stride == (1, 1) and self.padding == (0, 0)
        self._numba = resolve_backend(backend) == "numba"
        self.gather: GatherConv | None = None
        if self.direct:
            w2 = weight.view(groups, og, cg).transpose(1, 2)  # (G, cg, og)
            self.wmat = w2[0].contiguous() if groups == 1 else w2.contiguous()
            self._wmat_np = self.wmat.numpy()
            self._act_rows = np.empty((0, cout), np.float32)  # run_small_act's output (overwritten per call)
            self._wmacs = cin * cout // groups
        else:
            plan = conv_plan((h, w), (kh, kw), self.stride, self.padding, self.dilation)
            wtap = weight.view(groups, og, cg, kh * kw).permute(0, 2, 3, 1)  # (G, cg, K*K, og)
            self.scatter = ScatterConv(plan, wtap, n * ho * wo, backend)
            if self._numba and groups == 1 and cin <= 4:
                self.gather = GatherConv(plan, weight, self.in_shape, self.stride, self.padding, self.dilation)
                # floats the scatter moves per active input pixel: mean reachable taps * Cout
                self._scatter_floats = float(plan.ntaps.mean()) * cout

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """F.conv2d of a dense (N, Cin, H, W) tensor with this layer's geometry (no bias)."""
        w = self._weight_cl if x.is_contiguous(memory_format=torch.channels_last) else self.weight
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)

    def _sparse(self, delta: PixelDelta) -> PixelDelta:
        if not self.direct:
            if self.gather is not None:
                outs = self.gather.affected(delta.index)
                # measured: gathering wins when it moves under about half the floats of the scatter
                if outs.numel() * self.gather.patch <= 0.5 * delta.index.numel() * self._scatter_floats:
                    self.last_path = "gather"
                    return PixelDelta(outs, self.gather.compute(outs, delta.index, delta.values), self.out_shape)
            self.last_path = "scatter"
            idx, rows = self.scatter.run(delta)
            return PixelDelta(idx, rows, self.out_shape)
        self.last_path = "direct"
        if self._unit_stride:  # every input pixel maps to the same output pixel: the index passes through
            if self.groups == 1 and delta.active * self._wmacs <= NUMPY_GEMM_MAX_MACS:
                return delta.with_values(np.dot(delta.values_np, self._wmat_np), self.out_shape)
            return delta.with_values(self._mm(delta.values), self.out_shape)
        pix, vals = delta.index, delta.values
        (sy, sx), (py, px) = self.stride, self.padding
        _, _, h, w = self.in_shape
        _, _, ho, wo = self.out_shape
        if not (sy == sx == 1 and py == px == 0):
            b, r = pix.div(h * w, rounding_mode="floor"), pix.remainder(h * w)
            y = r.div(w, rounding_mode="floor") + py
            x = r.remainder(w) + px
            keep = (y.remainder(sy) == 0) & (x.remainder(sx) == 0) & (y < ho * sy) & (x < wo * sx)
            sel = keep.nonzero().squeeze(1)
            vals = vals.index_select(0, sel)
            y, x = y[sel].div(sy, rounding_mode="floor"), x[sel].div(sx, rounding_mode="floor")
            pix = b[sel] * (ho * wo) + y * wo + x
        return PixelDelta(pix, self._mm(vals), self.out_shape)

    def run_small_act(self, delta: PixelDelta, z: np.ndarray, code: int, alpha: float, precise: bool
                      ) -> tuple[np.ndarray, np.ndarray] | None:
        """(index, Δy) of conv + activation step on state rows z in one kernel call for a delta of few pixels
        (3x3 and other kernels: `ScatterConv.run_small_act`; 1x1: `_pointwise_act_nb`); None (nothing done)
        otherwise. Δy is a view of a buffer the next call overwrites (consumed within the frame)."""
        if not self._numba or self.gather is not None or delta.shape != self.in_shape or (
                self.dense_above is not None and delta.active_fraction > self.dense_above):
            return None
        if not self.direct:
            return self.scatter.run_small_act(delta, z, code, alpha, precise)
        if not self._unit_stride or self.groups != 1 or delta.active * self.in_shape[1] > SMALL_POINTWISE_MAX_ROWS:
            return None
        idx = delta.index_np
        a = idx.shape[0]
        if self._act_rows.shape[0] < a:
            self._act_rows = grown(self._act_rows, a, self.in_shape[0] * self.in_shape[2] * self.in_shape[3])
        _pointwise_act_nb(idx, delta.values_np, self._wmat_np, z, code, alpha, precise, self._act_rows)
        return idx, self._act_rows[:a]

    def _mm(self, vals: torch.Tensor) -> torch.Tensor:
        """1x1: the output rows (A, Cout) of input rows (A, Cin)."""
        if self.groups == 1:
            return torch.mm(vals, self.wmat)
        g, a = self.groups, vals.shape[0]
        out = torch.bmm(vals.view(a, g, self.wmat.shape[1]).transpose(0, 1), self.wmat)  # (G, a, og)
        return out.transpose(0, 1).reshape(a, self.out_shape[1])


class SparseConvTranspose2d(_Unit):
    """Sparse delta conv_transpose2d (no bias); weight (Cin, Cout/groups, Kh, Kw) as for F.conv_transpose2d."""

    def __init__(
        self,
        weight: torch.Tensor,
        input_shape: tuple[int, int, int, int],
        stride: IntPair = 1,
        padding: IntPair = 0,
        output_padding: IntPair = 0,
        groups: int = 1,
        dilation: IntPair = 1,
        backend: str = "auto",
        dense_above: float | None = None,
    ):
        weight = weight.detach().to(torch.float32).contiguous()
        cin, og, kh, kw = weight.shape
        n, cin_x, h, w = input_shape
        if cin != cin_x or cin % groups:
            raise ValueError(f"weight {tuple(weight.shape)} does not fit input {input_shape}, groups={groups}")
        self.stride, self.padding = _pair(stride), _pair(padding)
        self.output_padding, self.dilation = _pair(output_padding), _pair(dilation)
        self.weight, self.groups, self.dense_above = weight, groups, dense_above
        self.in_shape = (n, cin, h, w)
        (sy, sx), (py, px), (dy, dx) = self.stride, self.padding, self.dilation
        ho = (h - 1) * sy - 2 * py + dy * (kh - 1) + self.output_padding[0] + 1
        wo = (w - 1) * sx - 2 * px + dx * (kw - 1) + self.output_padding[1] + 1
        self.out_shape = (n, og * groups, ho, wo)
        offs_y = np.arange(kh, dtype=np.int64) * dy - py
        offs_x = np.arange(kw, dtype=np.int64) * dx - px
        plan = PhasePlan.build((h, w), (ho, wo), (kh, kw), offs_y, offs_x, (sy, sx), (1, 1))
        wtap = weight.view(groups, cin // groups, og, kh * kw).permute(0, 1, 3, 2)  # (G, cg, K*K, og)
        self.scatter = ScatterConv(plan, wtap, n * ho * wo, backend)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """F.conv_transpose2d of a dense (N, Cin, H, W) tensor with this layer's geometry (no bias)."""
        return F.conv_transpose2d(
            x, self.weight, None, self.stride, self.padding, self.output_padding, self.groups, self.dilation
        )

    def _sparse(self, delta: PixelDelta) -> PixelDelta:
        self.last_path = "scatter"
        idx, rows = self.scatter.run(delta)
        return PixelDelta(idx, rows, self.out_shape)
