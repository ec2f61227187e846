"""PixelDelta: the sparse delta passed between delta units for 4-D feature maps (pixel granularity).

A pixel is one spatial position of one batch item, all channels together. Only pixels whose delta is non-zero (or
that a unit chose to forward) are stored, channels-last, so that a conv can run as one dense GEMM over them.

A delta holds its arrays as torch tensors, NumPy arrays or both (sharing memory): the numba kernels produce and
take NumPy arrays, torch ops take tensors, and each side is made from the other at most once per delta, when first
asked for. A torch <-> NumPy conversion costs 1-2 us on this CPU, which, several times per unit, was most of the
fixed cost of a unit on few pixels.
"""

from __future__ import annotations

import numpy as np
import torch

Array = torch.Tensor | np.ndarray


class PixelDelta:
    """Sparse delta of an (N, C, H, W) tensor.

    index:  int64 (A,), flat pixel indices n*H*W + y*W + x, unique and sorted ascending.
    values: float32 (A, C), contiguous; row i is the delta of every channel at pixel index[i].
    shape:  the logical dense shape (N, C, H, W).
    `index` / `values` are torch tensors, `index_np` / `values_np` the same memory as NumPy arrays; the constructor
    takes either. The arrays are never modified in place once in a PixelDelta.
    """

    __slots__ = ("_index", "_values", "_index_np", "_values_np", "shape")

    def __init__(self, index: Array, values: Array, shape: tuple[int, int, int, int]) -> None:
        if isinstance(index, np.ndarray):
            self._index, self._index_np = None, index
        else:
            self._index, self._index_np = index, None
        if isinstance(values, np.ndarray):
            self._values, self._values_np = None, values
        else:
            self._values, self._values_np = values, None
        self.shape = shape

    @property
    def index(self) -> torch.Tensor:
        t = self._index
        if t is None:
            t = self._index = torch.from_numpy(self._index_np)
        return t

    @property
    def values(self) -> torch.Tensor:
        t = self._values
        if t is None:
            t = self._values = torch.from_numpy(self._values_np)
        return t

    @property
    def index_np(self) -> np.ndarray:
        a = self._index_np
        if a is None:
            a = self._index_np = self._index.numpy()
        return a

    @property
    def values_np(self) -> np.ndarray:
        a = self._values_np
        if a is None:
            a = self._values_np = self._values.numpy()
        return a

    def with_values(self, values: Array, shape: tuple[int, int, int, int]) -> PixelDelta:
        """A delta at the same pixels (index shared in both forms) with other values and shape."""
        d = PixelDelta(self._index if self._index is not None else self._index_np, values, shape)
        d._index_np = self._index_np
        return d

    def __repr__(self) -> str:
        return f"PixelDelta(active={self.active}, shape={self.shape})"

    @property
    def is_float32(self) -> bool:
        """Whether the values are float32 (asked of whichever form exists: no conversion)."""
        v = self._values_np
        return v.dtype == np.float32 if v is not None else self._values.dtype == torch.float32

    @property
    def num_pixels(self) -> int:
        """N * H * W: how many pixels the dense tensor has."""
        n, _, h, w = self.shape
        return n * h * w

    @property
    def active(self) -> int:
        i = self._index_np
        return int(i.shape[0]) if i is not None else int(self._index.shape[0])

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
