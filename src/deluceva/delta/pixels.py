"""PixelDelta: the sparse delta passed between delta units for 4-D feature maps (pixel granularity).

A pixel is one spatial position of one batch item, all channels together. Only pixels whose delta is non-zero (or
that a unit chose to forward) are stored, channels-last, so that a conv can run as one dense GEMM over them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PixelDelta:
    """Sparse delta of an (N, C, H, W) tensor.

    index:  int64 (A,), flat pixel indices n*H*W + y*W + x, unique and sorted ascending.
    values: float32 (A, C), contiguous; row i is the delta of every channel at pixel index[i].
    shape:  the logical dense shape (N, C, H, W).
    """

    index: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int, int, int]

    @property
    def num_pixels(self) -> int:
        """N * H * W: how many pixels the dense tensor has."""
        n, _, h, w = self.shape
        return n * h * w

    @property
    def active(self) -> int:
        return int(self.index.numel())

    @property
    def active_fraction(self) -> float:
        return self.active / max(1, self.num_pixels)

    @classmethod
    def empty(cls, shape: tuple[int, int, int, int], dtype: torch.dtype = torch.float32) -> PixelDelta:
        return cls(torch.zeros(0, dtype=torch.int64), torch.zeros(0, shape[1], dtype=dtype), tuple(shape))

    @classmethod
    def from_dense(cls, delta: torch.Tensor, mask: torch.Tensor | None = None) -> PixelDelta:
        """From a dense (N, C, H, W) delta; `mask` (N, H, W) bool picks pixels (default: any channel non-zero)."""
        n, c, h, w = delta.shape
        rows = delta.permute(0, 2, 3, 1).reshape(n * h * w, c)
        if mask is None:
            mask = rows.ne(0).any(dim=1)
        index = mask.reshape(-1).nonzero().squeeze(1)
        return cls(index, rows.index_select(0, index), (n, c, h, w))

    def to_rows(self) -> torch.Tensor:
        """Dense channels-last rows (N*H*W, C), zeros at inactive pixels."""
        rows = self.values.new_zeros(self.num_pixels, self.shape[1])
        rows.index_copy_(0, self.index, self.values)
        return rows

    def to_dense(self) -> torch.Tensor:
        """Dense (N, C, H, W) delta (a channels-last view), zeros at inactive pixels."""
        n, c, h, w = self.shape
        return self.to_rows().reshape(n, h, w, c).permute(0, 3, 1, 2)
