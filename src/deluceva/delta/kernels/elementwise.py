"""Elementwise non-linear delta units: Δy = f(z + Δz) - f(z) on the active pixels only.

State: the pre-activation rows z (N*H*W, C), channels-last, updated in place (z[idx] += Δz). For activations
with flat parts (ReLU, ReLU6, hardswish, hardsigmoid) rows whose output delta is exactly zero are dropped from
the emitted PixelDelta (for smooth ones that check costs more than it saves).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from deluceva.delta.pixels import PixelDelta

Activation = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Activation] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "leaky_relu": F.leaky_relu,
    "silu": F.silu,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "gelu": F.gelu,
    "mish": F.mish,
    "elu": F.elu,
    "identity": lambda x: x,
}
FLAT = frozenset({"relu", "relu6", "hardswish", "hardsigmoid"})  # constant over whole intervals


def activation(name: str, **kwargs: float) -> Activation:
    """Activation by name, e.g. activation('leaky_relu', negative_slope=0.1)."""
    try:
        fn = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}") from None
    return partial(fn, **kwargs) if kwargs else fn


class SparseActivation:
    """Delta of y = f(z) for one (N, C, H, W) tensor; `__call__(Δz) -> Δy` updates the stored z in place.

    fn: a callable or a name from ACTIVATIONS. z: initial pre-activation rows (N*H*W, C) (default zeros; or
    call `seed(dense_z)` after a dense frame). drop_zero: drop exactly-zero output rows (default: only for
    activations with flat parts, FLAT).
    """

    def __init__(
        self,
        fn: Activation | str,
        shape: tuple[int, int, int, int],
        z: torch.Tensor | None = None,
        drop_zero: bool | None = None,
    ):
        self.fn = activation(fn) if isinstance(fn, str) else fn
        n, c, h, w = shape
        self.shape = (n, c, h, w)
        self.z = z if z is not None else torch.zeros(n * h * w, c)
        self.drop_zero = drop_zero if drop_zero is not None else (isinstance(fn, str) and fn in FLAT)

    def seed(self, dense_z: torch.Tensor) -> None:
        """Set z from a dense (N, C, H, W) pre-activation."""
        n, c, h, w = self.shape
        self.z.copy_(dense_z.permute(0, 2, 3, 1).reshape(n * h * w, c))

    def __call__(self, delta: PixelDelta) -> PixelDelta:
        idx = delta.index
        if idx.numel() == 0:
            return PixelDelta.empty(self.shape, delta.values.dtype)
        old = self.z.index_select(0, idx)
        new = old + delta.values
        self.z.index_copy_(0, idx, new)
        out = self.fn(new) - self.fn(old)
        if self.drop_zero:
            keep = out.abs().amax(1).ne(0)
            if not bool(keep.all()):
                sel = keep.nonzero().squeeze(1)
                idx, out = idx.index_select(0, sel), out.index_select(0, sel)
        return PixelDelta(idx, out, self.shape)


def conv_act(conv: Callable[[PixelDelta], PixelDelta], act: SparseActivation, delta: PixelDelta) -> PixelDelta:
    """conv + bias + activation unit: the bias lives in act.z (seeded densely): Δy = f(z + conv(Δx)) - f(z)."""
    return act(conv(delta))
