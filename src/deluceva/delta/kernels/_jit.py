"""Optional numba JIT: fused loops for scatter/filter when numba is importable, torch fallbacks otherwise.

`HAVE_NUMBA` tells whether the compiled kernels are available; `jit` compiles with on-disk caching (first use
of a kernel compiles it once per machine, later processes load the cache).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

try:
    import numba
    from numba import prange

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
    prange = range  # the parallel kernels are plain functions then, never called
    HAVE_NUMBA = False


# Products of at most this many multiply-adds (rows x Cin x Cout) run in NumPy: its matmul costs ~1.4 us per call
# where a torch.mm with its output allocation and the NumPy round trip of the kernels costs ~6 us; OpenBLAS runs
# products under 4 * 65536 multiply-adds on one thread, so this stays within any thread budget.
NUMPY_GEMM_MAX_MACS = 1 << 16


def grown(buf: np.ndarray, rows: int, cap: int) -> np.ndarray:
    """`buf` if it has at least `rows` rows, else a new empty array of its dtype and row shape with
    min(cap, max(rows, 2 * len(buf))) rows (reused kernel output buffers grow geometrically, up to the tensor)."""
    if buf.shape[0] >= rows:
        return buf
    return np.empty((min(cap, max(rows, 2 * buf.shape[0])), *buf.shape[1:]), buf.dtype)


_WORK: dict[tuple, np.ndarray] = {}


def work_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A shared work array of this shape and dtype (one per shape and dtype, reused): for kernels that overwrite it
    before reading and keep nothing of it past their return."""
    key = (shape, np.dtype(dtype).str)
    buf = _WORK.get(key)
    if buf is None:
        buf = _WORK[key] = np.empty(shape, dtype)
    return buf


def index_scratch(size: int) -> np.ndarray:
    """A shared int64 work buffer of `size` entries (`work_array`): for kernels that list indices in it and return a
    copy of the listed part before returning, so callers never hold it."""
    return work_array((size,), np.int64)


def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`numba.njit(cache=True, nogil=True)` with numba, else the plain Python function (then never called)."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False)(fn)


def jit_vec(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`jit` with numpy's error model: a float division does not check for zero, so loops with divisions vectorise
    (numba's default Python error model adds a branch per division, which keeps the loop scalar)."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy")(fn)


# Fast-math flags that keep IEEE rounding of each operation's result but let LLVM fuse multiply-adds and treat
# min/max as plain vector instructions (no NaN or infinity in, no signed-zero care): no reassociation, so explicit
# rounding steps survive. For float kernels whose inputs are finite.
FINITE_MATH = frozenset({"nnan", "ninf", "nsz", "contract"})


def jit_finite(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`jit_vec` with FINITE_MATH: for polynomial kernels on finite floats (1.6 -> 0.7 ns per SiLU value here)."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", fastmath=set(FINITE_MATH))(fn)


def jit_parallel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`jit_vec` with numba's parallel loops (`numba.prange`, run by its thread pool): for kernels whose work splits
    into independent slices. Callers take them only when `parallel()` (numba's workqueue pool does not nest)."""
    if not HAVE_NUMBA:
        return fn
    return numba.njit(cache=True, nogil=True, boundscheck=False, error_model="numpy", parallel=True)(fn)


# Kernel calls of at least this many values (rows x channels) take their parallel forms when threads are on: from
# about here they pay (2 threads, the SiLU state step, 64 channels, after a PyTorch conv as in a frame: 8k values
# 149 -> 139 us, 32k 189 -> 136 us, 131k 618 -> 338 us, 1.4M 5.4 -> 2.7 ms; its torch path 365 us, 280 us,
# 518 us, 4.2 ms)
PARALLEL_MIN = 8192

_threads = 1  # threads the kernels may use (`set_threads`); 1: the parallel kernels are not taken


def set_threads(n: int) -> None:
    """Let the kernels use `n` threads (the engine's thread count): above 1, large kernel calls split their work
    over numba's thread pool (capped at its size, the machine's cores by default). PyTorch and ONNX Runtime gain
    1.7x from a second thread on this CPU; the numba kernels, single-threaded before, were ~40% of a busy delta
    frame at 2 threads."""
    global _threads
    _threads = max(1, int(n))
    if HAVE_NUMBA:
        numba.set_num_threads(min(_threads, numba.config.NUMBA_NUM_THREADS))


def parallel() -> bool:
    """Whether the kernels may split large calls over threads (`set_threads` > 1, numba present)."""
    return HAVE_NUMBA and _threads > 1


def resolve_backend(backend: str) -> str:
    """'auto' -> 'numba' if available else 'torch'; 'numba' without numba installed raises."""
    if backend == "auto":
        return "numba" if HAVE_NUMBA else "torch"
    if backend == "numba" and not HAVE_NUMBA:
        raise RuntimeError("backend='numba' requested but numba is not installed")
    if backend not in ("numba", "torch"):
        raise ValueError(f"unknown backend {backend!r} (expected 'auto', 'numba' or 'torch')")
    return backend
