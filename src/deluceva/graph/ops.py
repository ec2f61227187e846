"""Canonical operator forms used after the passes, and the alias tables that map onto them.

After `graph.passes.canonicalize`, every elementwise activation is a `call_function` node whose target is a key of
`ELEMENTWISE` (first argument = the tensor, further arguments/kwargs = static parameters), and the parameter-free
torch.nn modules that have a functional form (pooling, upsample, flatten, softmax, pad, ...) are `call_function` nodes
too. Modules with weights (Conv2d, ConvTranspose2d, Linear, BatchNorm2d) stay `call_module`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Canonical elementwise unary functions f(x, *static) (delta form: f(z + d) - f(z) at touched positions).
ELEMENTWISE: frozenset[Callable] = frozenset(
    {
        torch.relu, F.relu6, F.leaky_relu, torch.sigmoid, F.silu, F.hardswish, F.hardsigmoid, torch.tanh, F.mish,
        F.gelu, F.hardtanh, F.elu, F.celu, F.selu, F.softplus, F.softsign, F.logsigmoid, F.tanhshrink,
        torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.reciprocal, torch.abs, torch.square, torch.clamp,
        torch.erf, torch.sin, torch.cos, torch.pow, torch.floor, torch.ceil, torch.round, torch.sign,
    }
)  # fmt: skip

# Function aliases -> canonical function (the `inplace` argument, if any, is dropped).
FUNCTION_ALIASES: dict[Callable, Callable] = {
    F.relu: torch.relu, torch.relu_: torch.relu, F.relu_: torch.relu,
    F.sigmoid: torch.sigmoid, torch.sigmoid_: torch.sigmoid,
    F.tanh: torch.tanh, torch.tanh_: torch.tanh,
    torch.clip: torch.clamp, torch.clamp_: torch.clamp,
    F.hardtanh_: F.hardtanh, F.leaky_relu_: F.leaky_relu, F.elu_: F.elu,
    torch.exp_: torch.exp,
}  # fmt: skip

# Functions with an `inplace` parameter that canonicalisation forces to False.
INPLACE_PARAM: frozenset[Callable] = frozenset(
    {F.relu, F.relu6, F.leaky_relu, F.hardtanh, F.elu, F.celu, F.selu, F.silu, F.hardswish, F.hardsigmoid, F.mish,
     F.dropout, F.dropout2d, F.alpha_dropout, F.threshold}
)  # fmt: skip

# Tensor methods -> canonical function (also their in-place `name_` variants, see `graph.passes`).
METHOD_ALIASES: dict[str, Callable] = {
    "relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "exp": torch.exp, "log": torch.log,
    "sqrt": torch.sqrt, "rsqrt": torch.rsqrt, "reciprocal": torch.reciprocal, "abs": torch.abs,
    "square": torch.square, "clamp": torch.clamp, "clip": torch.clamp, "erf": torch.erf, "sin": torch.sin,
    "cos": torch.cos, "pow": torch.pow, "floor": torch.floor, "ceil": torch.ceil, "round": torch.round,
    "sign": torch.sign, "softmax": F.softmax, "log_softmax": F.log_softmax,
}  # fmt: skip

# Functions that are the identity at inference.
IDENTITY_FUNCTIONS: frozenset[Callable] = frozenset({F.dropout, F.dropout2d, F.dropout1d, F.alpha_dropout})
IDENTITY_MODULES: tuple[type, ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)


def _pad4(p: Any) -> Any:
    return list(p) if isinstance(p, tuple | list) else [p] * 4


# Parameter-free modules -> (canonical function, kwargs) (activations included).
MODULE_TO_FUNCTION: dict[type, Callable[[Any], tuple[Callable, dict]]] = {
    nn.ReLU: lambda m: (torch.relu, {}),
    nn.ReLU6: lambda m: (F.relu6, {}),
    nn.LeakyReLU: lambda m: (F.leaky_relu, {"negative_slope": m.negative_slope}),
    nn.Sigmoid: lambda m: (torch.sigmoid, {}),
    nn.SiLU: lambda m: (F.silu, {}),
    nn.Hardswish: lambda m: (F.hardswish, {}),
    nn.Hardsigmoid: lambda m: (F.hardsigmoid, {}),
    nn.Tanh: lambda m: (torch.tanh, {}),
    nn.Mish: lambda m: (F.mish, {}),
    nn.GELU: lambda m: (F.gelu, {"approximate": m.approximate}),
    nn.Hardtanh: lambda m: (F.hardtanh, {"min_val": m.min_val, "max_val": m.max_val}),
    nn.ELU: lambda m: (F.elu, {"alpha": m.alpha}),
    nn.CELU: lambda m: (F.celu, {"alpha": m.alpha}),
    nn.SELU: lambda m: (F.selu, {}),
    nn.Softplus: lambda m: (F.softplus, {"beta": m.beta, "threshold": m.threshold}),
    nn.Softsign: lambda m: (F.softsign, {}),
    nn.LogSigmoid: lambda m: (F.logsigmoid, {}),
    nn.Tanhshrink: lambda m: (F.tanhshrink, {}),
    nn.MaxPool2d: lambda m: (
        F.max_pool2d,
        {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
         "ceil_mode": m.ceil_mode, "return_indices": m.return_indices},
    ),
    nn.AvgPool2d: lambda m: (
        F.avg_pool2d,
        {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "ceil_mode": m.ceil_mode,
         "count_include_pad": m.count_include_pad, "divisor_override": m.divisor_override},
    ),
    nn.AdaptiveAvgPool2d: lambda m: (F.adaptive_avg_pool2d, {"output_size": m.output_size}),
    nn.AdaptiveMaxPool2d: lambda m: (
        F.adaptive_max_pool2d, {"output_size": m.output_size, "return_indices": m.return_indices}
    ),
    nn.Upsample: lambda m: (
        F.interpolate,
        {"size": m.size, "scale_factor": m.scale_factor, "mode": m.mode, "align_corners": m.align_corners,
         "recompute_scale_factor": m.recompute_scale_factor},
    ),
    nn.Flatten: lambda m: (torch.flatten, {"start_dim": m.start_dim, "end_dim": m.end_dim}),
    nn.Softmax: lambda m: (F.softmax, {"dim": m.dim}),
    nn.LogSoftmax: lambda m: (F.log_softmax, {"dim": m.dim}),
    nn.ZeroPad2d: lambda m: (F.pad, {"pad": _pad4(m.padding), "mode": "constant", "value": 0.0}),
    nn.ConstantPad2d: lambda m: (F.pad, {"pad": _pad4(m.padding), "mode": "constant", "value": m.value}),
    nn.ReflectionPad2d: lambda m: (F.pad, {"pad": _pad4(m.padding), "mode": "reflect"}),
    nn.ReplicationPad2d: lambda m: (F.pad, {"pad": _pad4(m.padding), "mode": "replicate"}),
    nn.PixelShuffle: lambda m: (F.pixel_shuffle, {"upscale_factor": m.upscale_factor}),
    nn.PixelUnshuffle: lambda m: (F.pixel_unshuffle, {"downscale_factor": m.downscale_factor}),
    nn.ChannelShuffle: lambda m: (F.channel_shuffle, {"groups": m.groups}),
}

# Ops whose value does not depend on the values of their tensor inputs (only on shape/dtype): never "varying".
VALUE_INDEPENDENT_FUNCTIONS: frozenset[Callable] = frozenset(
    {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like}
)
VALUE_INDEPENDENT_METHODS: frozenset[str] = frozenset(
    {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel", "type", "get_device"}
)


def describe_target(node: torch.fx.Node) -> str:
    """Human name of a node's operator, e.g. 'torch.cumsum', 'Tensor.cumsum', 'nn.LayerNorm'."""
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        mod = node.graph.owning_module.get_submodule(node.target)  # type: ignore[union-attr]
        cls = type(mod)
        return f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn") else cls.__qualname__
    t = node.target
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__name__", str(t))
    if mod.startswith("torch.nn.functional"):
        mod = "F"
    elif mod.startswith("torch"):
        mod = "torch"
    return f"{mod}.{name}" if mod else name


def setitem(x: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """Out-of-place `x[index] = value` (the functional form of `operator.setitem`); linear in (x, value)."""
    y = x.clone()
    y[index] = value
    return y
