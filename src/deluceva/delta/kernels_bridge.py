"""The one place the engine calls the fast kernels of `deluceva.delta.kernels` (written separately).

Each function returns a prepared kernel / result, or None when the kernels are unavailable, disabled
(`DELUCEVA_KERNELS=0` or `kernels_bridge.enabled = False`), or do not cover the configuration (dtype other than
float32, unsupported geometry); callers then use their exact torch fallbacks.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

import torch

from deluceva.delta.kernels._jit import index_scratch
from deluceva.delta.pixels import PixelDelta

enabled = os.environ.get("DELUCEVA_KERNELS", "1") != "0"
_ERRORS = (ImportError, ValueError, NotImplementedError, RuntimeError, TypeError)


def _on(dtype: torch.dtype = torch.float32) -> bool:
    return enabled and dtype == torch.float32


def sparse_conv2d(weight: torch.Tensor, in_shape: tuple, stride: Any, padding: Any, dilation: Any,
                  groups: int) -> Callable[[PixelDelta], PixelDelta] | None:
    """Kernel Δy = conv2d(Δx) (no bias) prepared for `in_shape`, or None."""
    if not _on(weight.dtype):
        return None
    try:
        from deluceva.delta.kernels.conv import SparseConv2d

        return SparseConv2d(weight, tuple(in_shape), stride, padding, dilation, groups)
    except _ERRORS:
        return None


def sparse_conv_transpose2d(weight: torch.Tensor, in_shape: tuple, stride: Any, padding: Any, output_padding: Any,
                            groups: int, dilation: Any) -> Callable[[PixelDelta], PixelDelta] | None:
    """Kernel Δy = conv_transpose2d(Δx) (no bias) prepared for `in_shape`, or None."""
    if not _on(weight.dtype):
        return None
    try:
        from deluceva.delta.kernels.conv import SparseConvTranspose2d

        return SparseConvTranspose2d(weight, tuple(in_shape), stride, padding, output_padding, groups, dilation)
    except _ERRORS:
        return None


def pixel_filter(r: torch.Tensor, m: torch.Tensor, shape: tuple) -> Any | None:
    """Kernel pixel filter sharing the residual rows r (P, C) and magnitudes m (P,), or None."""
    if not _on(r.dtype):
        return None
    try:
        from deluceva.delta.kernels.filter import PixelFilter

        return PixelFilter(tuple(shape), residual=r, magnitude=m)
    except _ERRORS:
        return None


_MODULES: dict[str, Any] = {}


def _module(name: str) -> Any:
    """The kernels module `deluceva.delta.kernels.<name>` (imported once: per-call imports cost ~1 us), or None when
    it cannot be imported."""
    if name not in _MODULES:
        try:
            _MODULES[name] = importlib.import_module(f"deluceva.delta.kernels.{name}")
        except ImportError:
            _MODULES[name] = None
    return _MODULES[name]


def merge_add(parts: list[PixelDelta]) -> PixelDelta | None:
    """Kernel sum of PixelDeltas of one shape, or None."""
    if not (enabled and parts[0].is_float32) or (m := _module("merge")) is None:
        return None
    try:
        return m.add(*parts)
    except _ERRORS:
        return None


def concat(parts: list[PixelDelta]) -> PixelDelta | None:
    """Kernel channel concat of PixelDeltas (all parts given, empty ones included), or None."""
    if not (enabled and parts[0].is_float32) or (m := _module("merge")) is None:
        return None
    try:
        return m.concat(*parts)
    except _ERRORS:
        return None


def concat_at(parts: list[PixelDelta], offsets: list[int], shape: tuple) -> PixelDelta | None:
    """Kernel channel concat of the changing parts at their channel offsets of the output `shape`, or None."""
    if not (enabled and parts[0].is_float32) or (m := _module("merge")) is None or not m.HAVE_NUMBA:
        return None
    try:
        return m.concat_at(parts, offsets, tuple(shape))
    except _ERRORS:
        return None


def max_pool2d(in_shape: tuple, kernel: Any, stride: Any, padding: Any, dilation: Any) -> Any | None:
    """Kernel sparse max-pool (`seed(x)`, `__call__(Δx)`) for one input shape, or None."""
    if not enabled:
        return None
    try:
        from deluceva.delta.kernels.pool import SparseMaxPool2d

        return SparseMaxPool2d(tuple(in_shape), kernel, stride, padding, dilation)
    except _ERRORS:
        return None


def upsample_nearest(d: PixelDelta, scale: int) -> PixelDelta | None:
    """Kernel nearest upsampling by an integer `scale` on both axes, or None."""
    if not (enabled and d.is_float32) or (m := _module("resample")) is None:
        return None
    try:
        return m.upsample_nearest2x(d, scale)
    except _ERRORS:
        return None


def add_rows(targets: list[torch.Tensor], d: PixelDelta) -> bool:
    """targets (1-2 equal float32 (P, C) row views) += d's rows (A, C) at d's pixels by the kernel, the first
    target's new values copied to the second; False (nothing done) when the kernel is unavailable."""
    if not (enabled and d.is_float32) or len(targets) > 2 or (m := _module("rowadd")) is None or not m.HAVE_NUMBA:
        return False
    rows = [t.numpy() for t in targets]
    copy = rows[1] if len(rows) == 2 else m.no_copy(rows[0].shape[1])
    m.add_rows_nb(rows[0], d.index_np, d.values_np, copy)
    return True


def nonzero_row_index(rows: torch.Tensor) -> Any | None:
    """Ascending NumPy indices of the rows of a contiguous float32 (P, C) tensor with a non-zero entry (one numba
    pass, a row's scan stopping at its first non-zero), or None when the kernels are unavailable."""
    if not (enabled and rows.dtype == torch.float32 and rows.is_contiguous()) or (m := _module("actstep")) is None:
        return None
    return m.nonzero_rows_nb(rows.numpy(), index_scratch(rows.shape[0]))


def step_act_rows(z: Any, rows: torch.Tensor, act: tuple[int, float]) -> tuple[Any, Any]:
    """(index, Δy) NumPy arrays of the rows of a dense output delta `rows` (P, C) float32 with a non-zero entry,
    their state rows z (P, C) float32 updated and Δy = f(z_new) - f(z_old) by the fused kernel (fast mode;
    callers check that the kernels are on: ConvUnit's `_fused_small`)."""
    actstep, jit = _module("actstep"), _module("_jit")
    big = rows.numel() >= jit.PARALLEL_MIN and jit.parallel()
    kernel = actstep.step_act_rows_par_nb if big else actstep.step_act_rows_nb
    return kernel(z, rows.contiguous().numpy(), act[0], act[1], index_scratch(rows.shape[0]))
