"""Dense executors for a detector's network: the reference path every speed-up is measured against.

Each executor is prepared once for one input size and thread count and then called per frame:
`run(x: float32 (1, 3, H, W)) -> tuple[Tensor, ...]` (the network's raw head maps).

- "torch": PyTorch eager under inference_mode, NCHW.
- "torch-cl": PyTorch eager with the module and input in channels_last (oneDNN's preferred layout).
- "torchscript": traced, frozen and optimised for inference (oneDNN conv+activation fusion).
- "onnxruntime": the network exported once (TorchScript exporter) and run by ONNX Runtime, sequential execution,
  intra-op threads = T. The fastest here, so it is the default ("auto").
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from deluceva.errors import ModelError

DenseRun = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
ENGINES = ("onnxruntime", "torchscript", "torch-cl", "torch")


def _as_tuple(out) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def torch_eager(network: nn.Module, input_hw: tuple[int, int], threads: int, channels_last: bool = False) -> DenseRun:
    torch.set_num_threads(threads)
    net = copy.deepcopy(network).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return tuple(o.contiguous() for o in _as_tuple(net(x)))

    return run


def torchscript_frozen(network: nn.Module, input_hw: tuple[int, int], threads: int) -> DenseRun:
    torch.set_num_threads(threads)
    x0 = torch.zeros(1, 3, *input_hw)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(copy.deepcopy(network).eval(), x0)
        net = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return tuple(o.contiguous() for o in _as_tuple(net(x)))

    return run


def export_onnx(network: nn.Module, input_hw: tuple[int, int]) -> bytes:
    """Serialise `network` to ONNX at a fixed input size (1, 3, H, W)."""
    x = torch.zeros(1, 3, *input_hw)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(copy.deepcopy(network).eval(), (x,), buf, dynamo=False, opset_version=17,
                              input_names=["images"], do_constant_folding=True)
        except Exception as e:  # the exporter raises many types; the user needs one line
            raise ModelError(f"cannot export the network to ONNX for ONNX Runtime: {e}".splitlines()[0]) from e
    return buf.getvalue()


def onnxruntime_session(onnx_model: bytes | str, threads: int, spinning: bool = True):
    """An ONNX Runtime CPU session: `threads` intra-op threads, sequential, all graph optimisations. spinning: the
    worker threads busy-wait between runs (the default: fastest for back-to-back frames); off for sessions run now
    and then, whose spinning workers would slow the PyTorch work that follows them."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


def onnxruntime_run(network: nn.Module, input_hw: tuple[int, int], threads: int, spinning: bool = True,
                    reuse_outputs: bool = False) -> DenseRun:
    """ONNX Runtime executor (see `onnxruntime_session`). reuse_outputs: every run writes its outputs into the
    same buffers (bound once, after the first run has shaped them), so each call's tensors are overwritten by the
    next call; for sessions with large outputs run now and then (the delta network's seeder exports ~66 MB: fresh
    output arrays each run cost ~17k page faults, a third of a re-seed after a stay on the dense engine)."""
    sess = onnxruntime_session(export_onnx(network, input_hw), threads, spinning)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = sess.run(None, {name: _ort_input(x)})
        return tuple(torch.from_numpy(o) for o in outs)

    return _run_into_buffers(sess, name, run) if reuse_outputs else run


def _ort_input(x: torch.Tensor) -> np.ndarray:
    """x (1, 3, H, W) as the contiguous float32 array ONNX Runtime takes (no copy when it already is one)."""
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def _run_into_buffers(sess, name: str, first_run: DenseRun) -> DenseRun:
    """`sess` run through an IO binding whose outputs are the first run's arrays, reused by every later run."""
    binding = sess.io_binding()
    buffers: list[torch.Tensor] = []

    def run(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not buffers:
            buffers.extend(first_run(x))
            for out, buf in zip(sess.get_outputs(), buffers, strict=True):
                arr = buf.numpy()
                binding.bind_output(out.name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)
            return tuple(buffers)
        binding.bind_cpu_input(name, _ort_input(x))
        sess.run_with_iobinding(binding)
        return tuple(buffers)

    return run


def resolve_dense_engine(engine: str) -> str:
    """The dense engine a name stands for: "auto" = ONNX Runtime (the fastest measured here)."""
    return "onnxruntime" if engine == "auto" else engine


def make_dense(network: nn.Module, input_hw: tuple[int, int], threads: int = 1, engine: str = "auto") -> DenseRun:
    """A dense executor of `network` at `input_hw`; engine as in `resolve_dense_engine`."""
    engine = resolve_dense_engine(engine)
    if engine == "onnxruntime":
        return onnxruntime_run(network, input_hw, threads)
    if engine == "torchscript":
        return torchscript_frozen(network, input_hw, threads)
    if engine == "torch-cl":
        return torch_eager(network, input_hw, threads, channels_last=True)
    if engine == "torch":
        return torch_eager(network, input_hw, threads)
    raise ModelError(f"unknown dense engine {engine!r}; choose one of auto, {', '.join(ENGINES)}")
