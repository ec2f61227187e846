"""Capture: symbolic trace + shape propagation; clear one-line ModelErrors for what cannot be converted."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva import convert
from deluceva.errors import ModelError
from deluceva.graph.capture import capture
from deluceva.graph.passes import DenseFallbackWarning


class Gate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return self.conv(x)
        return x


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), Gate())

    def forward(self, x):
        return self.block(self.stem(x))


def test_capture_records_shapes_and_keeps_the_callers_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU()).train()
    gm = capture(m, torch.randn(1, 3, 9, 9))
    shapes = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes if "tensor_meta" in n.meta}
    assert shapes["input_1"] == (1, 3, 9, 9) and shapes["_0"] == (1, 4, 4, 4)
    assert m.training and not gm.training  # the caller's module is untouched, the copy is in eval mode


def test_graph_module_is_accepted_as_is():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm = fx.symbolic_trace(m)
    x = torch.randn(1, 3, 8, 8)
    net = convert(gm, x)
    net(x)
    out = net(x + 0.1)
    torch.testing.assert_close(out, m(x + 0.1))


def test_data_dependent_control_flow_names_the_module():
    with pytest.raises(ModelError) as info:
        convert(Outer(), torch.randn(1, 3, 8, 8))
    msg = str(info.value)
    assert "data-dependent control flow in block.1" in msg
    assert "x.sum() > 0" in msg
    assert "\n" not in msg


def test_example_input_failure_is_a_model_error():
    with pytest.raises(ModelError, match="example input"):
        convert(nn.Conv2d(3, 4, 3), torch.randn(1, 5, 8, 8))


def test_multiple_inputs_rejected():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ModelError, match="exactly one input"):
        convert(Two(), torch.randn(1, 3, 4, 4))


class WithOptions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x, augment: bool = False, scale: float = 2.0):
        if augment:  # a default argument: specialised to its value, not data-dependent
            x = x.flip(3)
        return self.conv(x) * scale


def test_forward_arguments_with_defaults_are_constants():
    m, x = WithOptions().eval(), torch.rand(1, 3, 8, 8)
    net = convert(m, x)
    net(x)
    torch.testing.assert_close(net(x + 0.5), m(x + 0.5))


def my_custom_op(x: torch.Tensor) -> torch.Tensor:
    return torch.flip(x.cumsum(3), dims=[2]) * 0.5


torch.fx.wrap("my_custom_op")


class WithUnsupported(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = torch.cumsum(y, dim=2) / 10 + my_custom_op(y)
        return self.c2(y)


def test_unsupported_ops_run_dense_warn_once_and_stay_exact():
    m = WithUnsupported().eval()
    x = torch.rand(1, 3, 12, 16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = convert(m, x)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]
    assert len(msgs) == 2
    assert any("torch.cumsum" in s and "'cumsum'" in s for s in msgs)
    assert any("my_custom_op" in s for s in msgs)
    assert all("#" in s for s in msgs)  # position in the graph
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        xi = x.clone()
        xi[..., i : i + 3, 3:7] += torch.rand(3, 3, 4, generator=g)
        out = net(xi)
        assert net.last_dense == (i == 0)
        torch.testing.assert_close(out, m(xi), rtol=1e-5, atol=1e-5)
    kinds = {r["name"]: r["kind"] for r in net.last_stats}
    assert kinds["cumsum"] == "dense" and kinds["my_custom_op"] == "dense"
