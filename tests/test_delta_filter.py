"""Filters: nothing is ever dropped, the held-back fraction follows filter_pct, noise floor and granularities."""

from __future__ import annotations

import pytest
import torch

from deluceva import convert
from deluceva.delta import kernels_bridge
from deluceva.delta.base import FilterConfig
from deluceva.delta.filter import DenseFilter, PixelFilter, select_forward
from deluceva.delta.pixels import PixelDelta


def _random_delta(shape, frac, g) -> PixelDelta:
    n, c, h, w = shape
    mask = torch.rand(n * h * w, generator=g) < frac
    idx = mask.nonzero().squeeze(1)
    vals = torch.randn(idx.numel(), c, generator=g) * torch.rand(idx.numel(), 1, generator=g) ** 3
    return PixelDelta(idx, vals, shape)


@pytest.fixture(params=[True, False], ids=["kernels", "torch"])
def kernels(request, monkeypatch):
    monkeypatch.setattr(kernels_bridge, "enabled", request.param)
    return request.param


def test_select_forward_exact_count_with_ties():
    mags = torch.tensor([1.0] * 50 + [2.0] * 50)
    assert int(select_forward(mags, 50, 0).sum()) == 50
    assert int(select_forward(mags, 90, 0).sum()) == 10
    assert int(select_forward(mags, 0, 1.0).sum()) == 50  # noise floor: magnitude <= floor never forwarded
    assert int(select_forward(mags, 100, 0).sum()) == 0


@pytest.mark.parametrize("granularity", ["element", "pixel", "tile"])
@pytest.mark.parametrize("pct", [0, 30, 50, 90])
def test_pixel_filter_conserves_and_holds_back_pct(kernels, granularity, pct):
    g = torch.Generator().manual_seed(pct)
    shape = (2, 5, 40, 48)
    cfg = FilterConfig(filter_pct=pct, granularity=granularity, tile=4)
    f = PixelFilter(cfg)
    f.seed(torch.zeros(shape))
    sent = torch.zeros(shape[0] * shape[2] * shape[3], shape[1])
    total = torch.zeros_like(sent)
    for _ in range(8):
        d = _random_delta(shape, 0.3, g)
        total.index_add_(0, d.index, d.values)
        out = f(d)
        if out is not None:
            assert torch.equal(out.index, torch.sort(out.index).values)
            sent.index_add_(0, out.index, out.values)
        torch.testing.assert_close(sent + f.r, total, rtol=0, atol=1e-6)  # nothing dropped
        if pct and f.candidates >= 100:
            assert abs(100 * f.held_back - pct) <= 2
    if pct == 0:
        assert float(f.r.abs().max()) == 0.0


def test_pixel_filter_noise_floor_and_pass_through(kernels):
    cfg = FilterConfig(filter_pct=0, noise_floor=0.5)
    f = PixelFilter(cfg)
    f.seed(torch.zeros(1, 2, 4, 4))
    d = PixelDelta(torch.tensor([0, 3, 5]), torch.tensor([[0.1, 0.2], [0.0, 0.9], [-0.6, 0.0]]), (1, 2, 4, 4))
    out = f(d)
    assert out.index.tolist() == [3, 5]
    assert f(PixelDelta(torch.tensor([0]), torch.tensor([[0.3, 0.0]]), (1, 2, 4, 4))) is None  # 0.4 <= 0.5
    out = f(PixelDelta(torch.tensor([0]), torch.tensor([[0.2, 0.0]]), (1, 2, 4, 4)))
    assert out.index.tolist() == [0]  # accumulated 0.6 > 0.5
    assert torch.allclose(out.values, torch.tensor([[0.6, 0.2]]))
    cfg.noise_floor = 0.0
    d = PixelDelta(torch.tensor([1, 2]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]), (1, 2, 4, 4))
    assert not f.pending
    out = f(d)
    assert out is d  # exact and nothing pending: the delta passes through untouched


def test_dense_filter():
    g = torch.Generator().manual_seed(0)
    cfg = FilterConfig(filter_pct=75)
    f = DenseFilter(cfg)
    f.seed(torch.zeros(4, 100))
    total, sent = torch.zeros(4, 100), torch.zeros(4, 100)
    for _ in range(5):
        d = torch.randn(4, 100, generator=g)
        total += d
        out = f(d)
        sent += out
        torch.testing.assert_close(sent + f.r, total, rtol=0, atol=1e-5)
        assert abs(100 * f.held_back - 75) <= 2


def test_filter_all_units(kernels):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 5 * 5, 4)).eval()  # fmt: skip
    x = torch.randn(1, 3, 12, 12)
    net = convert(m, x, filter_all=True)
    g = torch.Generator().manual_seed(1)
    xs = [x + 0.1 * i * torch.randn(x.shape, generator=g) for i in range(4)]
    for xi in xs:
        torch.testing.assert_close(net(xi), m(xi), rtol=1e-5, atol=1e-5)
    assert all(r["held_back"] is not None for r in net.last_stats)  # a filter in front of every unit
    net.filter_pct = 60
    net(xs[0])
    held = [r["held_back"] for r in net.last_stats if r["candidates"] and r["candidates"] >= 50]
    assert held and all(abs(100 * h - 60) <= 2 for h in held)


def test_granularity_validation():
    with pytest.raises(ValueError, match="granularity"):
        convert(torch.nn.ReLU(), torch.randn(1, 1, 2, 2), granularity="block")


def test_switching_granularity_and_pct_between_frames_conserves(kernels):
    g = torch.Generator().manual_seed(3)
    shape = (1, 4, 24, 32)
    cfg = FilterConfig(filter_pct=50)
    f = PixelFilter(cfg)
    f.seed(torch.zeros(shape))
    sent = torch.zeros(24 * 32, 4)
    total = torch.zeros_like(sent)
    plan = [("pixel", 50), ("tile", 80), ("element", 30), ("pixel", 90), ("tile", 0), ("pixel", 0), ("pixel", 0)]
    for gran, pct in plan:
        cfg.granularity, cfg.filter_pct = gran, pct
        d = _random_delta(shape, 0.2, g)
        total.index_add_(0, d.index, d.values)
        out = f(d)
        if out is not None:
            sent.index_add_(0, out.index, out.values)
        torch.testing.assert_close(sent + f.r, total, rtol=0, atol=1e-6)
    assert float(f.r.abs().max()) == 0.0 and not f.pending  # at 0% everything pending went out


def test_select_forward_percentage_of_all_positions():
    mags = torch.arange(1.0, 41.0)  # 40 candidates among 1000 positions
    assert int(select_forward(mags, 90, 0, total=1000).sum()) == 40  # 10% of 1000 = 100 >= 40: all forwarded
    keep = select_forward(mags, 99, 0, total=1000)  # 1% of 1000 = 10: the 10 largest
    assert int(keep.sum()) == 10 and bool(keep[-10:].all())


@pytest.mark.parametrize("granularity", ["element", "pixel", "tile"])
def test_pixel_filter_percentage_of_positions_forwards_sparse_changes_and_caps_dense_ones(kernels, granularity):
    """percent_of="positions": every change passes while fewer than (100 - pct)% of the granules changed; when more
    changed, (100 - pct)% of all granules pass (the largest); nothing is dropped either way."""
    g = torch.Generator().manual_seed(7)
    shape = (1, 4, 40, 50)  # 2000 pixels, 8000 elements, 130 tiles of 4x4
    cfg = FilterConfig(filter_pct=90, granularity=granularity, tile=4, percent_of="positions")
    f = PixelFilter(cfg)
    f.seed(torch.zeros(shape))
    sent = torch.zeros(2000, 4)
    total = torch.zeros_like(sent)
    for frac in (0.01, 0.02, 0.6, 0.6, 0.0):
        d = _random_delta(shape, frac, g) if frac else None
        if d is not None:
            total.index_add_(0, d.index, d.values)
        pending = f.candidates - f.forwarded
        out = f(d)
        if out is not None:
            sent.index_add_(0, out.index, out.values)
        torch.testing.assert_close(sent + f.r, total, rtol=0, atol=1e-6)
        cap = round(0.1 * f.granules)
        assert f.forwarded == min(f.candidates, cap)
        if frac == 0.01 and pending == 0:
            assert f.forwarded == f.candidates > 0 and float(f.r.abs().max()) == 0.0  # sparse: all of it passes
        if frac == 0.6:
            assert f.candidates > cap and f.forwarded == cap  # dense: capped at 10% of all granules


def test_percent_of_is_validated():
    from deluceva.engine import EngineConfig
    from deluceva.errors import DelucevaError

    with pytest.raises(DelucevaError, match="--filter-of"):
        EngineConfig(mode="delta", filter_of="pixels")


def test_select_forward_percentage_of_at_least_a_count_floor():
    mags = torch.arange(1.0, 41.0)  # 40 candidates
    assert int(select_forward(mags, 50, 0, count_floor=30).sum()) == 20  # floor under the count: 50% of 40
    keep = select_forward(mags, 50, 0, count_floor=60)  # 50% of 60 = 30: the 30 largest
    assert int(keep.sum()) == 30 and bool(keep[-30:].all())
    assert int(select_forward(mags, 50, 0, count_floor=100).sum()) == 40  # at most every candidate
    assert int(select_forward(mags, 90, 0, total=100, count_floor=1000).sum()) == 10  # positions: no count floor


def test_percentage_after_a_reseed_is_of_the_average_candidate_count(kernels):
    """A re-seed clears what a filter holds, not its average candidate count: on the next frames the percentage is
    of that average (count_smoothing), so the fresh changes are not held back at the full share; with
    count_smoothing 0 the percentage is of the candidates now, as for a new filter."""
    shape = (1, 8, 20, 24)
    forwarded = {}
    for smoothing in (0.1, 0.0):
        g = torch.Generator().manual_seed(5)
        f = PixelFilter(FilterConfig(filter_pct=75, count_smoothing=smoothing))
        f.seed(torch.zeros(shape))
        for _ in range(20):
            f(_random_delta(shape, 0.3, g))
        ref = f.count_ref
        f.seed(torch.ones(shape))
        f(_random_delta(shape, 0.05, g))
        forwarded[smoothing] = f.forwarded
        if smoothing:
            assert ref > 2 * f.candidates  # many small residuals were waiting before the re-seed
            assert abs(f.forwarded - min(f.candidates, 0.25 * int(ref))) <= 0.5  # 25% of the average (rounded)
        else:
            assert f.count_ref == 0.0 and abs(f.forwarded - 0.25 * f.candidates) <= 0.5
    assert forwarded[0.1] > forwarded[0.0]


def test_reseed_keeps_the_buffers_and_holds_nothing(kernels):
    """A re-seed of the same tensor clears what was held but keeps r, m and the kernel (no re-allocation, whose
    page faults were paid in the following delta frames); it then filters exactly like a fresh filter (with the
    percentage of the candidates now: count_smoothing 0)."""
    g = torch.Generator().manual_seed(5)
    shape = (1, 8, 20, 24)
    cfg = FilterConfig(filter_pct=90, count_smoothing=0.0)
    used, fresh = PixelFilter(cfg), PixelFilter(cfg)
    used.seed(torch.zeros(shape))
    for _ in range(3):
        used(_random_delta(shape, 0.3, g))
    assert used.pending and float(used.r.abs().max()) > 0
    r_before = used.r
    used.seed(torch.ones(shape))
    fresh.seed(torch.ones(shape))
    assert not used.pending and float(used.r.abs().max()) == 0.0 and float(used.m.max()) == 0.0
    if kernels:
        assert used.r is r_before  # the kernel filter's buffers survive the re-seed
    for _ in range(3):
        d = _random_delta(shape, 0.3, g)
        a, b = used(d), fresh(d)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.index, b.index) and torch.equal(a.values, b.values)
        assert torch.equal(used.r, fresh.r) and used.pending == fresh.pending
    used.seed(torch.zeros(1, 8, 10, 12))  # another shape: new buffers
    assert tuple(used.r.shape) == (120, 8) and float(used.r.abs().max()) == 0.0
