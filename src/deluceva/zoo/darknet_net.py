"""A darknet cfg as an fx-traceable torch network, and the darknet .weights loader.

`DarknetNetwork.forward(x: (1, C, H, W)) -> tuple of raw head maps`: the conv outputs feeding each [yolo]
layer, (1, A*(5+classes), H/stride, W/stride), ordered by stride, smallest stride (largest map) first. The
layer list is static, so `torch.fx.symbolic_trace` sees plain Conv2d -> BatchNorm2d -> activation chains,
cat, add, pools and upsample. Nothing is folded (BatchNorm folding is a graph pass elsewhere).

Darknet semantics reproduced: conv `pad=1` means padding size//2 (else `padding`, default 0); maxpool
`padding` is the total, default size-1, padding//2 of it on the left/top and the rest on the right/bottom
(so tiny-YOLO's size=2 stride=1 keeps the map size); route `layers` are negative (relative) or absolute,
`groups`/`group_id` take one channel slice; shortcut adds `from` to the previous output, then applies its
activation; dropout and yolo are identities.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from deluceva.errors import ModelError
from deluceva.zoo.darknet_cfg import Section

# OpenCV's darknet importer gives BatchNorm eps 1e-6, as darknet itself; cv2's outputs match it (see tests).
BN_EPS = 1e-6

ACTIVATIONS: dict[str, type[nn.Module] | None] = {
    "linear": None,
    "leaky": None,  # LeakyReLU(0.1), built below
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "mish": nn.Mish,
    "swish": nn.SiLU,
    "logistic": nn.Sigmoid,
    "tanh": nn.Tanh,
}


def _activation(sec: Section) -> nn.Module | None:
    name = sec.get_str("activation", "linear").lower()
    if name not in ACTIVATIONS:
        raise sec.error(f"unsupported activation {name!r} (supported: {', '.join(ACTIVATIONS)})")
    if name == "leaky":
        return nn.LeakyReLU(0.1)
    cls = ACTIVATIONS[name]
    return cls() if cls is not None else None


@dataclass(frozen=True)
class YoloSpec:
    """One [yolo] head: anchors (A, 2) as (w, h) input pixels, classes, scale_x_y, new_coords, stride."""

    layer: int
    anchors: tuple[tuple[float, float], ...]
    classes: int
    scale_x_y: float
    new_coords: bool
    stride: int


class Layer(nn.Module):
    """A darknet layer; `sources` index the running output list (0 = network input, i + 1 = layer i)."""

    sources: tuple[int, ...]

    def __init__(self, sources: tuple[int, ...]) -> None:
        super().__init__()
        self.sources = sources


class Conv(Layer):
    """[convolutional]: Conv2d (bias iff no BN) -> BatchNorm2d -> activation in nn.Sequential `block`."""

    def __init__(
        self, sources: tuple[int, ...], conv: nn.Conv2d, bn: nn.BatchNorm2d | None, act: nn.Module | None
    ):
        super().__init__(sources)
        parts: OrderedDict[str, nn.Module] = OrderedDict(conv=conv)
        if bn is not None:
            parts["bn"] = bn
        if act is not None:
            parts["act"] = act
        self.block = nn.Sequential(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class Route(Layer):
    """[route]: channel concat of the sources, then optionally channel group `group_id` of `groups`."""

    def __init__(self, sources: tuple[int, ...], channels: int, groups: int, group_id: int) -> None:
        super().__init__(sources)
        self.lo = channels // groups * group_id
        self.hi = self.lo + channels // groups
        self.sliced = groups > 1

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        x = xs[0] if len(xs) == 1 else torch.cat(xs, dim=1)
        return x[:, self.lo : self.hi] if self.sliced else x


class Shortcut(Layer):
    """[shortcut]: previous output + output of `from`, then the activation."""

    def __init__(self, sources: tuple[int, ...], act: nn.Module | None) -> None:
        super().__init__(sources)
        self.act = act

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        y = a + b
        return self.act(y) if self.act is not None else y


class Wrap(Layer):
    """A layer that is one standard module applied to the previous output (pool, upsample)."""

    def __init__(self, sources: tuple[int, ...], op: nn.Module) -> None:
        super().__init__(sources)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Identity(Layer):
    """[dropout] at inference, [yolo] (its input is the head map): no graph node at all when traced."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _maxpool(sec: Section) -> nn.Module:
    size = sec.get_int("size", 1)
    stride = sec.get_int("stride", 1)
    padding = sec.get_int("padding", size - 1)  # darknet: total padding, left/top gets padding // 2
    if size < 1 or stride < 1 or padding < 0:
        raise sec.error(f"invalid maxpool size={size} stride={stride} padding={padding}")
    for key, ok in (("stride_x", stride), ("stride_y", stride), ("maxpool_depth", 0), ("antialiasing", 0)):
        if sec.get_int(key, ok) != ok:
            raise sec.error(f"unsupported maxpool option {key}={sec.get_str(key)}")
    left = padding // 2
    if padding % 2 == 0 and left <= size // 2:
        return nn.MaxPool2d(size, stride, padding=left)
    # Asymmetric: darknet pads with -inf; replicating the edge gives the same maxima (every padded window also
    # contains the adjacent border element) and stays an ordinary, exportable op.
    return nn.Sequential(
        nn.ReplicationPad2d((left, padding - left, left, padding - left)), nn.MaxPool2d(size, stride)
    )


def _relative(sec: Section, idx: int, ref: int) -> int:
    """A route/shortcut layer reference (negative = relative to this layer) as an absolute layer index."""
    j = idx + ref if ref < 0 else ref
    if not 0 <= j < idx:
        raise sec.error(f"refers to layer {ref}, which is not an earlier layer")
    return j


class DarknetNetwork(nn.Module):
    """The network body of a darknet cfg. Outputs: the [yolo] head maps by stride (largest map first)."""

    def __init__(self, sections: list[Section]) -> None:
        super().__init__()
        net = sections[0]
        self.native_hw = (net.get_int("height", 416), net.get_int("width", 416))
        self.in_channels = net.get_int("channels", 3)
        if self.native_hw[0] <= 0 or self.native_hw[1] <= 0 or self.in_channels <= 0:
            raise net.error("width, height and channels must be positive")
        channels: list[int] = []  # per layer
        strides: list[float] = []
        layers: list[Layer] = []
        heads: list[YoloSpec] = []
        for sec in sections[1:]:
            i = sec.index
            prev_c = channels[i - 1] if i else self.in_channels
            prev_s = strides[i - 1] if i else 1.0
            prev = (i,)  # the previous layer's slot in the output list
            kind = sec.kind
            if kind in ("convolutional", "conv"):
                layer, c, s = self._conv(sec, prev, prev_c, prev_s)
            elif kind == "route":
                refs = [_relative(sec, i, r) for r in sec.get_ints("layers")]
                if not refs:
                    raise sec.error("route needs at least one layer")
                if len({strides[j] for j in refs}) > 1:
                    raise sec.error(f"route joins layers {refs} of different resolutions")
                groups, group_id = sec.get_int("groups", 1), sec.get_int("group_id", 0)
                total = sum(channels[j] for j in refs)
                if groups < 1 or not 0 <= group_id < groups or total % groups:
                    raise sec.error(f"invalid groups={groups} group_id={group_id} for {total} channels")
                layer = Route(tuple(j + 1 for j in refs), total, groups, group_id)
                c, s = total // groups, strides[refs[0]]
            elif kind == "shortcut":
                j = _relative(sec, i, sec.get_int("from"))
                if sec.get_str("weights_type", "none") != "none":
                    raise sec.error("weighted shortcuts (weights_type) are not supported")
                if channels[j] != prev_c or strides[j] != prev_s:
                    raise sec.error(
                        f"shortcut from layer {j} ({channels[j]} ch) does not match ({prev_c} ch)"
                    )
                layer, c, s = Shortcut((i, j + 1), _activation(sec)), prev_c, prev_s
            elif kind == "upsample":
                stride = sec.get_int("stride", 2)
                if stride < 1 or sec.get_float("scale", 1.0) != 1.0:
                    raise sec.error(
                        f"only nearest upsampling by a positive integer stride is supported ({stride})"
                    )
                layer = Wrap(prev, nn.Upsample(scale_factor=stride, mode="nearest"))
                c, s = prev_c, prev_s / stride
            elif kind in ("maxpool", "max"):
                layer, c = Wrap(prev, _maxpool(sec)), prev_c
                s = prev_s * sec.get_int("stride", 1)
            elif kind in ("avgpool", "avg"):
                layer, c, s = Wrap(prev, nn.AdaptiveAvgPool2d(1)), prev_c, float("inf")
            elif kind == "dropout":
                layer, c, s = Identity(prev), prev_c, prev_s
            elif kind == "yolo":
                heads.append(self._yolo(sec, prev_c, prev_s))
                layer, c, s = Identity(prev), prev_c, prev_s
            elif kind in ("net", "network"):
                raise sec.error("a second [net] section")
            else:
                raise sec.error(f"unsupported darknet section [{kind}]")
            layers.append(layer)
            channels.append(c)
            strides.append(s)
        if not heads:
            raise ModelError(f"{net.path}: no [yolo] layer, so nothing to detect with")
        order = sorted(range(len(heads)), key=lambda k: heads[k].stride)  # stable: ties keep cfg order
        self.heads: list[YoloSpec] = [heads[k] for k in order]
        self.layers = nn.ModuleList(layers)
        self.outputs: tuple[int, ...] = tuple(
            h.layer + 1 for h in self.heads
        )  # output-list slots of the heads

    @staticmethod
    def _conv(sec: Section, prev: tuple[int, ...], in_c: int, in_s: float) -> tuple[Layer, int, float]:
        filters, size = sec.get_int("filters", 1), sec.get_int("size", 1)
        stride, groups = sec.get_int("stride", 1), sec.get_int("groups", 1)
        padding = size // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
        for key, ok in (("dilation", 1), ("stride_x", stride), ("stride_y", stride), ("antialiasing", 0)):
            if sec.get_int(key, ok) != ok:
                raise sec.error(f"unsupported convolutional option {key}={sec.get_str(key)}")
        if sec.get_int("binary", 0) or sec.get_int("xnor", 0):
            raise sec.error("binary/xnor convolutions are not supported")
        if filters < 1 or size < 1 or stride < 1 or groups < 1 or in_c % groups or filters % groups:
            raise sec.error(
                f"invalid filters={filters} size={size} stride={stride} groups={groups} "
                f"for {in_c} input channels"
            )
        bn = sec.get_int("batch_normalize", 0) != 0
        conv = nn.Conv2d(in_c, filters, size, stride, padding, groups=groups, bias=not bn)
        norm = nn.BatchNorm2d(filters, eps=BN_EPS) if bn else None
        return Conv(prev, conv, norm, _activation(sec)), filters, in_s * stride

    @staticmethod
    def _yolo(sec: Section, in_c: int, in_s: float) -> YoloSpec:
        classes = sec.get_int("classes", 20)
        anchors = sec.get_floats("anchors", [])
        num = sec.get_int("num", len(anchors) // 2)
        if len(anchors) % 2 or len(anchors) // 2 < num or num < 1:
            raise sec.error(f"anchors must hold num={num} (w, h) pairs, got {len(anchors)} numbers")
        mask = sec.get_ints("mask", list(range(num)))
        if any(not 0 <= m < num for m in mask):
            raise sec.error(f"mask {mask} refers to anchors outside 0..{num - 1}")
        if in_c != len(mask) * (classes + 5):
            raise sec.error(f"its input has {in_c} channels, expected {len(mask)}*(5+{classes})")
        if in_s != int(in_s):
            raise sec.error(f"head resolution is not an integer stride of the input ({in_s})")
        return YoloSpec(
            layer=sec.index,
            anchors=tuple((anchors[2 * m], anchors[2 * m + 1]) for m in mask),
            classes=classes,
            scale_x_y=sec.get_float("scale_x_y", 1.0),
            new_coords=sec.get_int("new_coords", 0) != 0,
            stride=int(in_s),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = [x]
        for layer in self.layers:
            outs.append(layer(*[outs[j] for j in layer.sources]))
        return tuple(outs[j] for j in self.outputs)


def load_weights(net: DarknetNetwork, path: str | Path) -> None:
    """Fill the convs (and their BatchNorm) from a darknet .weights file; its size must match the cfg exactly.

    Layout: int32 major, minor, revision; `seen` int64 if major*10+minor >= 2 else int32; then per conv, in
    order, [bias] or [BN beta, gamma, running mean, running var], weight (O, I/groups, k, k); float32.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"darknet weights not found: {path}")
    raw = path.read_bytes()
    if len(raw) < 12:
        raise ModelError(f"{path}: too short for a darknet weights header ({len(raw)} bytes)")
    major, minor, _revision = np.frombuffer(raw, np.int32, 3)
    header = 20 if major * 10 + minor >= 2 and major < 1000 and minor < 1000 else 16
    convs = [layer for layer in net.layers if isinstance(layer, Conv)]
    tensors: list[torch.Tensor] = []
    for layer in convs:
        conv, bn = layer.block.conv, getattr(layer.block, "bn", None)
        if bn is not None:
            tensors += [bn.bias, bn.weight, bn.running_mean, bn.running_var]
        else:
            tensors.append(conv.bias)
        tensors.append(conv.weight)
    need = sum(t.numel() for t in tensors)
    have = (len(raw) - header) / 4
    if have != need:
        what = "truncated" if have < need else "larger than the cfg needs"
        raise ModelError(
            f"{path}: {what}: the cfg needs {need} float32 values after the {header}-byte header, "
            f"the file holds {max(have, 0):g} (wrong weights for this cfg?)"
        )
    values = torch.from_numpy(np.frombuffer(raw, np.float32, need, header).copy())
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(values[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
