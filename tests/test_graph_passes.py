"""Graph passes: each keeps the network's values and brings it into the canonical form the delta units expect."""

from __future__ import annotations

import operator
import warnings

import torch
import torch.nn.functional as F
from torch import fx, nn

from deluceva.graph.capture import capture
from deluceva.graph.passes import (
    DENSE,
    VARYING,
    DenseFallbackWarning,
    canonical_passes,
    canonicalize,
    fold_batchnorm,
    functionalize_inplace,
    fuse_gated_activations,
    mark_dense,
    mark_varying,
)


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    bn.running_mean.copy_(torch.randn(c, generator=g))
    bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(c, generator=g))
    return bn.eval()


def _targets(gm: fx.GraphModule) -> list:
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_module":
            out.append(type(gm.get_submodule(n.target)))
        elif n.op in ("call_function", "call_method"):
            out.append(n.target)
    return out


def _same(gm: fx.GraphModule, m: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        a, b = gm(x.clone()), m(x.clone())
    for p, q in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3), _bn(4, 0)
        self.c2, self.b2 = nn.Conv2d(4, 4, 1), _bn(4, 1)
        self.t, self.b3 = nn.ConvTranspose2d(4, 2, 2, stride=2), _bn(2, 2)

    def forward(self, x):
        y = self.b1(self.c1(x))
        z = self.c2(y)
        w = self.b2(z) + z  # z has two users: not folded
        return self.b3(self.t(w))


def test_fold_batchnorm_only_single_user_convs():
    m, x = ConvBN().eval(), torch.randn(1, 3, 9, 9)
    gm = fold_batchnorm(capture(m, x))
    bns = [t for t in _targets(gm) if t is nn.BatchNorm2d]
    assert len(bns) == 1  # b2 stays: its conv output is also used by the add
    _same(gm, m, x)


class Aliases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relu, self.sig, self.leaky = nn.ReLU(inplace=True), nn.Sigmoid(), nn.LeakyReLU(0.3)
        self.pool, self.up, self.flat = nn.MaxPool2d(2), nn.Upsample(scale_factor=2), nn.Flatten()
        self.drop, self.ident = nn.Dropout(0.5), nn.Identity()

    def forward(self, x):
        a = self.relu(x * 1.0) + F.relu(x) + x.relu() + torch.relu(x)
        b = self.sig(x) + x.sigmoid() + F.sigmoid(x) + torch.tanh(x) + x.tanh()
        c = self.leaky(self.ident(self.drop(x)))
        return a, b, c, self.flat(self.up(self.pool(x)))


def test_canonicalize_aliases_to_one_form():
    m, x = Aliases().eval(), torch.randn(1, 2, 6, 6)
    gm = canonicalize(canonical_passes(capture(m, x)))
    targets = _targets(gm)
    assert targets.count(torch.relu) == 4 and targets.count(torch.sigmoid) == 3 and targets.count(torch.tanh) == 2
    assert F.leaky_relu in targets and F.max_pool2d in targets and F.interpolate in targets
    assert torch.flatten in targets
    assert not any(isinstance(t, type) for t in targets)  # no activation / pooling modules left
    leaky = next(n for n in gm.graph.nodes if n.target is F.leaky_relu)
    assert leaky.kwargs["negative_slope"] == 0.3 and leaky.args[0].op == "placeholder"  # dropout/identity removed
    _same(gm, m, x)


class Gated(nn.Module):
    def forward(self, x):
        y = x + 1
        return y * torch.sigmoid(y), torch.sigmoid(x) * x, x * F.hardsigmoid(x), x * torch.sigmoid(y)


def test_x_times_sigmoid_x_becomes_silu():
    m, x = Gated(), torch.randn(1, 2, 4, 4)
    gm = fuse_gated_activations(capture(m, x))
    targets = _targets(gm)
    assert targets.count(F.silu) == 2 and targets.count(F.hardswish) == 1
    assert targets.count(operator.mul) == 1  # x * sigmoid(y) is not a SiLU
    _same(gm, m, x)


class InPlace(nn.Module):
    def forward(self, x):
        y = x * 2
        y.add_(1)
        z = y.relu_()
        return y + z, torch.relu_(x * 3)


def test_functionalize_inplace_keeps_semantics():
    m, x = InPlace(), torch.randn(1, 2, 4, 4)
    gm = functionalize_inplace(capture(m, x))
    assert not any(isinstance(t, str) and t.endswith("_") for t in _targets(gm))
    assert torch.relu_ not in _targets(gm)
    _same(gm, m, x)


def test_functionalize_setitem():
    g = fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(operator.mul, (x, 2.0))
    g.call_function(operator.setitem, (y, (slice(None), 0), 0.0))
    g.output(g.call_function(operator.add, (y, x)))
    gm = fx.GraphModule(nn.Module(), g)
    x0 = torch.randn(1, 2, 3, 3)
    ref = gm(x0)
    out = functionalize_inplace(gm)(x0)
    assert operator.setitem not in _targets(gm)
    torch.testing.assert_close(out, ref)
    assert float(out[:, 0].sub(x0[:, 0]).abs().max()) == 0.0


class Shapes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("grid", torch.arange(4.0))

    def forward(self, x):
        n, c, h, w = x.shape
        g = torch.arange(w, dtype=x.dtype) + self.grid
        y = x.view(n, c, -1) + torch.zeros_like(x).view(n, c, -1)
        return y.sum(-1) + g.sum(), torch.cumsum(x, 1), torch.cumsum(x, 2)


def test_mark_varying_and_dense():
    m, x = Shapes(), torch.randn(1, 2, 4, 4)
    gm = mark_varying(capture(m, x))
    var = {n.name: n.meta[VARYING] for n in gm.graph.nodes}
    assert var["x"] and var["view"] and var["add_1"] and var["cumsum"]
    assert not any(var[k] for k in ("grid", "arange", "getattr_1", "getitem", "add", "zeros_like", "view_1"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mark_dense(gm, lambda n: n.target is not torch.cumsum)
    msgs = [str(w.message) for w in caught if issubclass(w.category, DenseFallbackWarning)]
    assert len(msgs) == 1 and "torch.cumsum" in msgs[0] and "'cumsum'" in msgs[0] and "'cumsum_1'" in msgs[0]
    assert [n.name for n in gm.graph.nodes if n.meta.get(DENSE)] == ["cumsum", "cumsum_1"]
