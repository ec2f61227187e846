"""Thread-pool discipline for PyTorch and ONNX Runtime sharing the same cores.

Both runtimes keep worker threads busy-waiting for a while after each parallel section. With T threads on T cores,
small PyTorch ops between ONNX Runtime runs (pre-processing, decoding, the guard's activity) each wake PyTorch's
OpenMP pool: they wait for a worker that ONNX Runtime's spinning threads keep off a core, and their own spinning
workers then slow the next ONNX Runtime run (YOLOv5n 768x448, 2 threads: post-processing 1.5 -> 11 ms, the ONNX
Runtime run 21 -> 28 ms). Work this small gains nothing from a second thread, so it runs single-threaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def use_threads(n: int) -> None:
    """Run PyTorch's ops and the delta kernels' large calls (numba's pool) on `n` threads."""
    from deluceva.delta.kernels._jit import set_threads

    torch.set_num_threads(n)
    set_threads(n)


@contextmanager
def single_threaded() -> Iterator[None]:
    """PyTorch ops inside run on the calling thread only (`torch.set_num_threads(1)`, restored after; ~0.2 us)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
