"""Exactness per operator family: a DeltaNetwork of a one-op module equals the dense module on every step (filter 0).

Hypothesis draws shapes and parameters; the input sequences change sparse random pixels, rectangles, everything, or
nothing between steps.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from deluceva import convert
from deluceva.delta import kernels_bridge
from deluceva.graph.passes import DenseFallbackWarning

_DEEP = os.environ.get("DELUCEVA_HYPOTHESIS_EXAMPLES")  # e.g. 200: a deeper, randomised local search
SETTINGS = settings(
    max_examples=int(_DEEP or 12),
    derandomize=_DEEP is None,  # CI runs a fixed set of examples
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


class Fn(nn.Module):
    """Wrap a function of x (and optional submodules) into a traceable module."""

    def __init__(self, fn: Callable, **mods: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for k, m in mods.items():
            self.add_module(k, m)

    def forward(self, x):
        return self.fn(self, x)


def sequence(shape: tuple[int, ...], seed: int, steps: int = 6) -> list[torch.Tensor]:
    """x0 then steps with sparse pixels / a rectangle / everything / nothing changed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    xs = [x]
    modes = ["sparse", "rect", "none", "full", "sparse", "rect"]
    for i in range(steps):
        x = x.clone()
        mode = modes[(i + seed) % len(modes)]
        if len(shape) == 4:
            n, c, h, w = shape
            if mode == "sparse":
                mask = torch.rand((n, 1, h, w), generator=g) < 0.15
                x = x + mask * torch.randn(shape, generator=g)
            elif mode == "rect":
                y0, x0 = int(torch.randint(0, h, (1,), generator=g)), int(torch.randint(0, w, (1,), generator=g))
                x[..., y0 : y0 + 3, x0 : x0 + 4] += torch.randn_like(x[..., y0 : y0 + 3, x0 : x0 + 4])
            elif mode == "full":
                x = x + 0.3 * torch.randn(shape, generator=g)
        elif mode != "none":
            mask = torch.rand(shape, generator=g) < (0.2 if mode != "full" else 1.0)
            x = x + mask * torch.randn(shape, generator=g)
        xs.append(x)
    return xs


def _flat(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)]


def assert_exact(module: nn.Module, xs: list[torch.Tensor], rtol: float = 1e-5, **kw) -> None:
    """net(x) == module(x) on every step, |diff| <= rtol * (scale of the output) (+ tiny absolute slack)."""
    module = module.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DenseFallbackWarning)
        net = convert(module, xs[0], **kw)
    for i, x in enumerate(xs):
        out = net(x)
        assert net.last_dense == (i == 0)
        with torch.inference_mode():
            ref = module(x.clone())  # the module may work in place
        for a, b in zip(_flat(out), _flat(ref), strict=True):
            assert a.shape == b.shape
            scale = float(b.abs().max()) if b.numel() else 0.0
            err = float((a - b).abs().max()) if b.numel() else 0.0
            assert err <= rtol * max(scale, 1e-3) + 1e-6, f"step {i}: max |diff| {err:.3g} (scale {scale:.3g})"


ACTS = [None, torch.relu, F.relu6, F.leaky_relu, torch.sigmoid, F.silu, F.hardswish, F.hardsigmoid, torch.tanh,
        F.mish, F.gelu]  # fmt: skip


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def kernels(request, monkeypatch):
    monkeypatch.setattr(kernels_bridge, "enabled", request.param)
    return request.param


@st.composite
def conv_case(draw):
    groups = draw(st.sampled_from([1, 1, 2, "dw"]))
    cin = draw(st.integers(1, 6)) * (2 if groups == 2 else 1)
    if groups == "dw":
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        cout = draw(st.integers(1, 6)) * groups
    k = draw(st.sampled_from([1, 2, 3, 5]))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, k // 2 * dilation + 1))
    h, w = draw(st.integers(k * dilation + 2, 14)), draw(st.integers(k * dilation + 2, 14))
    n = draw(st.integers(1, 2))
    act = draw(st.sampled_from(ACTS))
    return n, cin, cout, k, stride, padding, dilation, groups, h, w, act, draw(st.integers(0, 10_000))


@SETTINGS
@given(conv_case())
def test_conv2d(kernels, case):
    n, cin, cout, k, stride, padding, dilation, groups, h, w, act, seed = case
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bool(seed % 2))
    fn = (lambda m, x: m.conv(x)) if act is None else (lambda m, x: act(m.conv(x)))
    assert_exact(Fn(fn, conv=conv), sequence((n, cin, h, w), seed))


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 4), st.sampled_from([1, 2, 3, 4]), st.integers(1, 3), st.integers(0, 2),
       st.integers(1, 2), st.sampled_from([1, 2]), st.sampled_from(ACTS), st.integers(0, 10_000))
def test_conv_transpose2d(kernels, cin, cout, k, stride, padding, dilation, groups, act, seed):
    padding = min(padding, (k - 1) * dilation)
    out_pad = seed % stride if stride > 1 else 0
    if out_pad >= dilation and out_pad >= stride:
        out_pad = 0
    torch.manual_seed(seed)
    conv = nn.ConvTranspose2d(cin * groups, cout * groups, k, stride, padding, out_pad, groups, bool(seed % 2),
                              dilation)  # fmt: skip
    fn = (lambda m, x: m.conv(x)) if act is None else (lambda m, x: act(m.conv(x)))
    assert_exact(Fn(fn, conv=conv), sequence((1, cin * groups, 6, 7), seed))


def test_conv_bn_folded_and_functional_conv():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    mod = Fn(lambda m, x: F.conv2d(F.relu(m.bn(m.conv(x))), m.w, None, 1, 1), conv=nn.Conv2d(3, 6, 3), bn=bn)
    mod.w = nn.Parameter(torch.randn(4, 6, 3, 3))
    assert_exact(mod, sequence((1, 3, 10, 12), 1))


@SETTINGS
@given(st.integers(1, 20), st.integers(1, 12), st.sampled_from([2, 3]), st.sampled_from(ACTS), st.integers(0, 9999))
def test_linear(fin, fout, dims, act, seed):
    torch.manual_seed(seed)
    fn = (lambda m, x: m.fc(x)) if act is None else (lambda m, x: act(m.fc(x)))
    shape = (2, fin) if dims == 2 else (2, 3, fin)
    assert_exact(Fn(fn, fc=nn.Linear(fin, fout)), sequence(shape, seed))


def test_batchnorm_standalone():
    torch.manual_seed(0)
    bn2, bn1 = nn.BatchNorm2d(5), nn.BatchNorm1d(5)
    for bn in (bn2, bn1):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 2)
    mod = Fn(lambda m, x: m.bn1(m.bn2(torch.relu(x)).mean((2, 3))), bn2=bn2, bn1=bn1)
    assert_exact(mod, sequence((2, 5, 8, 9), 3))
    f_bn = Fn(lambda m, x: F.batch_norm(torch.relu(x), m.bn2.running_mean, m.bn2.running_var, m.bn2.weight,
                                        m.bn2.bias, False), bn2=bn2)  # fmt: skip
    assert_exact(f_bn, sequence((1, 5, 6, 6), 4))


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 3, 5]), st.integers(1, 3), st.integers(0, 2), st.integers(1, 2),
       st.booleans(), st.integers(0, 9999))
def test_max_pool(kernels, c, k, stride, padding, dilation, ceil_mode, seed):
    padding = min(padding, k // 2)
    fn = lambda m, x: F.max_pool2d(x, k, stride, padding, dilation, ceil_mode)  # noqa: E731
    assert_exact(Fn(fn), sequence((2, c, 13, 11), seed))


@SETTINGS
@given(st.integers(1, 4), st.sampled_from([1, 2, 3]), st.integers(1, 3), st.integers(0, 1), st.booleans(),
       st.booleans(), st.integers(0, 9999))
def test_avg_pools(c, k, stride, padding, ceil_mode, include_pad, seed):
    padding = min(padding, k // 2)

    def fn(m, x):
        a = F.avg_pool2d(x, k, stride, padding, ceil_mode, include_pad)
        return a, F.adaptive_avg_pool2d(x, 1), F.adaptive_avg_pool2d(x, (3, 2)), x.mean((2, 3), keepdim=True), \
            torch.mean(x, dim=(-1, -2)), F.adaptive_max_pool2d(x, 2)  # fmt: skip

    assert_exact(Fn(fn), sequence((1, c, 9, 10), seed))


@pytest.mark.parametrize("act", ACTS[1:] + [F.elu, torch.exp, lambda x: torch.clamp(x, -0.5, 0.7),
                                             lambda x: x.pow(2), lambda x: 1.5 / (x.abs() + 1)])
def test_activations(act):
    assert_exact(Fn(lambda m, x: act(x)), sequence((2, 4, 7, 9), 5))
    assert_exact(Fn(lambda m, x: act(x)), sequence((3, 11), 6))


def test_activation_aliases():
    relu, sig = nn.ReLU(inplace=True), nn.Sigmoid()

    def fn(m, x):
        a = m.relu(x) + F.relu(x, inplace=False) + x.relu() + torch.relu(x)
        b = m.sig(x) + x.sigmoid() + torch.sigmoid(x)
        return a, b, F.leaky_relu(x, 0.2), nn.functional.hardtanh(x, -1, 2)

    assert_exact(Fn(fn, relu=relu, sig=sig), sequence((1, 3, 6, 6), 7))


@SETTINGS
@given(st.integers(0, 9999), st.sampled_from(["add", "sub", "mul", "div", "neg", "alpha"]))
def test_arith_constants(seed, op):
    g = torch.Generator().manual_seed(seed)
    chan = torch.rand(1, 4, 1, 1, generator=g) + 0.5
    full = torch.rand(1, 4, 6, 7, generator=g) + 0.5
    fns = {
        "add": lambda m, x: (x + 2.0, 3 + x, x + chan, x + full, torch.add(x, m.c)),
        "sub": lambda m, x: (x - 2.0, 1 - x, x - chan, full - x, x.sub(m.c)),
        "mul": lambda m, x: (x * 2.0, 3 * x, x * chan, full * x, torch.mul(x, m.c), x.mul(0.5)),
        "div": lambda m, x: (x / 2.0, x / chan, x / full, torch.div(x, m.c), 1.0 / (x.abs() + 1)),
        "neg": lambda m, x: (-x, torch.neg(x)),
        "alpha": lambda m, x: (torch.add(x, x.relu(), alpha=0.5), torch.sub(x, x.tanh(), alpha=2)),
    }
    mod = Fn(fns[op])
    mod.register_buffer("c", chan.clone())
    assert_exact(mod, sequence((1, 4, 6, 7), seed))


@SETTINGS
@given(st.integers(0, 9999))
def test_arith_two_changing_inputs(kernels, seed):
    def fn(m, x):
        s = F.adaptive_avg_pool2d(x, 1).sigmoid()  # changing per-channel scale (squeeze-excite)
        a, b = x.relu(), x.tanh()
        return a + b, a - b, a * b, x * s, s * x, a / (b.abs() + 1), x * x, a + s, x[:, :1] * x

    assert_exact(Fn(fn), sequence((2, 4, 6, 7), seed))


@SETTINGS
@given(st.integers(0, 9999), st.integers(1, 3))
def test_shape_ops(kernels, seed, n):
    def fn(m, x):
        a, b = x.chunk(2, dim=1)
        c, d, e = torch.split(x, [1, 2, 1], dim=1)
        p, q = x.split(3, dim=2)
        y = torch.cat([b, a, x], 1)
        z = torch.cat([x, x.relu()], dim=2)
        s = torch.stack([a, b], 0)
        v = x.view(x.size(0), 2, 2, x.size(2), x.size(3)).transpose(1, 2).contiguous().view(x.shape)
        u = torch.reshape(torch.transpose(x.reshape(n, 4, 1, 6, 7), 1, 2), (n, 4, 6, 7))
        return (u,y, z, s, c + e, d, p, q, x[:, 1:3], x[..., 1:4, ::2], x.reshape(n, -1), x.permute(0, 2, 3, 1),
                x.flatten(1), torch.flatten(x, 2), x.transpose(2, 3), v, F.channel_shuffle(x, 2),
                x.unsqueeze(1).squeeze(1), x.sum(1), x[0], x.float().clone())  # fmt: skip

    assert_exact(Fn(fn), sequence((n, 4, 6, 7), seed))


@pytest.mark.parametrize("seed", range(3))
def test_focus_space_to_depth_slices(kernels, seed):
    def fn(m, x):
        focus = torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1)
        return focus, x[:, :, 1:5:3, 2:], x[..., 2:, :]

    assert_exact(Fn(fn), sequence((2, 3, 10, 8), seed))


def test_channel_shuffle_module_and_pixel_shuffle():
    mod = Fn(lambda m, x: (m.cs(x), F.pixel_shuffle(x, 2), F.pixel_unshuffle(x, 2)), cs=nn.ChannelShuffle(2))
    assert_exact(mod, sequence((1, 8, 6, 8), 8))


@SETTINGS
@given(st.integers(0, 9999), st.sampled_from([1, 2, 3]), st.sampled_from(["nearest", "bilinear", "bicubic"]),
       st.booleans())
def test_upsample(kernels, seed, scale, mode, align):
    align = align if mode != "nearest" else None

    def fn(m, x):
        return (F.interpolate(x, scale_factor=scale, mode=mode, align_corners=align), m.up(x),
                F.interpolate(x, size=(9, 11), mode=mode, align_corners=align))  # fmt: skip

    assert_exact(Fn(fn, up=nn.Upsample(scale_factor=2, mode="nearest")), sequence((2, 3, 5, 6), seed))


@SETTINGS
@given(st.integers(0, 9999), st.tuples(*[st.integers(0, 2)] * 4), st.sampled_from(["constant", "reflect", "replicate"]))
def test_pad(seed, pad, mode):
    def fn(m, x):
        return F.pad(x, pad, mode=mode), m.zp(x), m.cp(x), F.pad(x, (1, -1, 0, 2)), F.pad(x, (0, 0, 0, 0, 1, 1))

    mod = Fn(fn, zp=nn.ZeroPad2d(1), cp=nn.ConstantPad2d((1, 0, 2, 0), 3.5))
    assert_exact(mod, sequence((1, 3, 6, 7), seed))


def test_dense_fallbacks_are_exact():
    ln = nn.LayerNorm(7)

    def fn(m, x):
        return F.softmax(x, 1), x.log_softmax(-1), m.ln(x), torch.cumsum(x, 2), x.amax(1), x.max(1).values

    with pytest.warns(DenseFallbackWarning, match="cumsum"):
        convert(Fn(fn, ln=ln).eval(), torch.randn(1, 3, 5, 7))
    assert_exact(Fn(fn, ln=ln), sequence((1, 3, 5, 7), 9))


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
def test_state_dtype(state_dtype):
    torch.manual_seed(0)

    def fn(m, x):
        y = F.silu(m.conv(x))
        s = F.adaptive_avg_pool2d(y, 1).sigmoid()
        return F.max_pool2d(y * s, 2), F.softmax(y.flatten(1), 1), x.relu() * x.tanh()

    assert_exact(Fn(fn, conv=nn.Conv2d(3, 6, 3, padding=1)), sequence((1, 3, 8, 10), 11), state_dtype=state_dtype)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv_padding_modes_and_same(kernels, padding_mode):
    torch.manual_seed(1)
    mod = Fn(lambda m, x: (m.a(x), F.relu(m.b(x))),
             a=nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode),
             b=nn.Conv2d(3, 4, (2, 4), padding="same", dilation=(2, 1)))  # fmt: skip
    assert_exact(mod, sequence((1, 3, 9, 10), 12))


@pytest.mark.parametrize("filter_pct", [0.0, 50.0])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_activation_one_call_kernel_equals_separate_steps(monkeypatch, filter_pct, stride):
    """Conv (3x3, 1x1, depthwise) + SiLU on few changed pixels in one kernel call gives the same outputs, frame
    after frame, as the conv kernel followed by the activation step (exact float64 state at 0%, float32 state when
    filtering)."""
    if not kernels_bridge.enabled:
        pytest.skip("kernels disabled")
    from deluceva.delta.kernels.conv import SparseConv2d

    torch.manual_seed(0)
    module = Fn(lambda m, x: F.silu(m.conv4(F.silu(m.conv3(F.silu(m.conv2(F.silu(m.conv1(x)))))))),
                conv1=nn.Conv2d(3, 24, 3, stride, 1), conv2=nn.Conv2d(24, 32, 3, 1, 1), conv3=nn.Conv2d(32, 16, 1),
                conv4=nn.Conv2d(16, 16, 3, 1, 1, groups=16)).eval()  # fmt: skip
    xs = [torch.randn(1, 3, 24, 20)]
    for i in range(12):  # a few pixels change per frame
        x = xs[-1].clone()
        x[..., 3 + i : 5 + i, 7:9] += 0.5 * torch.randn(1, 3, 2, 2)
        xs.append(x)
    calls = []
    orig = SparseConv2d.run_small_act

    def recorded(self, *a):
        r = orig(self, *a)
        kind = "1x1" if self.direct else "dw" if self.scatter.depthwise else "kxk"
        calls.append((kind, r))
        return r

    monkeypatch.setattr(SparseConv2d, "run_small_act", recorded)
    fused = convert(module, xs[0], filter_pct=filter_pct)
    outs_fused = [fused(x).clone() for x in xs]
    # the one-call kernels (3x3, 1x1, depthwise) applied to these deltas
    assert {kind for kind, r in calls if r is not None} == {"kxk", "1x1", "dw"}
    monkeypatch.setattr(SparseConv2d, "run_small_act", lambda self, *a: None)
    separate = convert(module, xs[0], filter_pct=filter_pct)
    outs_separate = [separate(x).clone() for x in xs]
    for a, b in zip(outs_fused, outs_separate, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
