"""Sparse delta kernels (deluceva.delta.kernels) vs their dense references, on random and real video deltas."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

from deluceva.delta.activation import activation_code
from deluceva.delta.kernels import (
    ACTIVATIONS,
    HAVE_NUMBA,
    PixelFilter,
    SparseActivation,
    SparseConv2d,
    SparseConvTranspose2d,
    SparseMaxPool2d,
    actstep,
    add,
    concat,
    upsample_nearest2x,
)
from deluceva.delta.kernels.elementwise import FLAT
from deluceva.delta.kernels.merge import concat_at
from deluceva.delta.kernels.opbench import active_pixels
from deluceva.delta.pixels import PixelDelta
from deluceva.delta.state import RowState

ROOT = Path(__file__).resolve().parents[1]
VIDEO = ROOT / "assets" / "video" / "vtest_pets09_s2l1.avi"
V5_WEIGHTS = ROOT / "models" / "yolov5n-coco" / "yolov5n_state_dict.npz"
BACKENDS = ["numba", "torch"] if HAVE_NUMBA else ["torch"]
# KERNEL_EXAMPLES=1000 pytest tests/test_kernels.py for a deeper search
HYP = settings(
    max_examples=int(os.environ.get("KERNEL_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def random_delta(shape: tuple[int, int, int, int], frac: float, clustered: bool, seed: int) -> PixelDelta:
    """Random PixelDelta with about `frac` active pixels: uniform, or grown from a few random seeds (blobs)."""
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n, 1, h, w, generator=g) < (frac / 9 if clustered else frac)
    if clustered:
        mask = F.max_pool2d(mask.float(), 3, 1, 1) > 0
    idx = mask.reshape(-1).nonzero().squeeze(1)
    return PixelDelta(idx, torch.randn(idx.numel(), c, generator=g), shape)


def reachable(delta: PixelDelta, k: tuple[int, int], stride, padding, dilation) -> torch.Tensor:
    """Sorted output pixels a conv with this geometry reaches from the active input pixels (dense reference)."""
    n, _, h, w = delta.shape
    mask = torch.zeros(n * h * w)
    mask[delta.index] = 1.0
    hit = F.conv2d(mask.view(n, 1, h, w), torch.ones(1, 1, *k), None, stride, padding, dilation)
    return hit.reshape(-1).nonzero().squeeze(1)


# ----------------------------------------------------------------------------------------------------- conv


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    depthwise = groups > 1 and draw(st.booleans())
    cin = groups if depthwise else groups * draw(st.integers(1, 5))
    cout = groups if depthwise else groups * draw(st.integers(1, 5))
    kh, kw = draw(st.sampled_from([(1, 1), (3, 3), (3, 3), (5, 5), (6, 6), (2, 3)]))
    stride = draw(st.sampled_from([1, 1, 2, 3]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    padding = draw(st.integers(0, max(kh, kw) // 2 * dilation))
    need = dilation * (max(kh, kw) - 1) + 1 - 2 * padding
    h = draw(st.integers(max(1, need), 14))
    w = draw(st.integers(max(1, need), 14))
    n = draw(st.integers(1, 2))
    frac = draw(st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.5, 1.0]))
    return (n, cin, h, w), (cout, cin // groups, kh, kw), stride, padding, dilation, groups, frac


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(case=conv_cases(), clustered=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_conv_equals_dense(backend, case, clustered, seed):
    shape, wshape, stride, padding, dilation, groups, frac = case
    weight = torch.randn(wshape, generator=torch.Generator().manual_seed(seed))
    conv = SparseConv2d(weight, shape, stride, padding, dilation, groups, backend=backend)
    delta = random_delta(shape, frac, clustered, seed)
    out = conv(delta)
    ref = F.conv2d(delta.to_dense(), weight, None, stride, padding, dilation, groups)
    assert out.shape == tuple(ref.shape)
    assert out.values.shape == (out.index.numel(), wshape[0])
    torch.testing.assert_close(out.to_dense(), ref, atol=1e-4, rtol=1e-4)
    if wshape[2:] != (1, 1):
        assert torch.equal(out.index, reachable(delta, wshape[2:], stride, padding, dilation))
    else:  # 1x1: exactly the input pixels that land on an output pixel
        assert torch.all(out.index[1:] > out.index[:-1])
        assert out.index.numel() <= delta.index.numel()
    # the persistent buffer is clean again: a second call gives the same answer
    again = conv(delta)
    assert torch.equal(again.index, out.index)
    torch.testing.assert_close(again.values, out.values, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(
    groups=st.sampled_from([1, 2]),
    k=st.sampled_from([1, 2, 3, 4]),
    stride=st.sampled_from([1, 2, 3]),
    dilation=st.sampled_from([1, 2]),
    padding=st.integers(0, 2),
    out_pad=st.integers(0, 1),
    frac=st.sampled_from([0.02, 0.2, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_sparse_conv_transpose_equals_dense(backend, groups, k, stride, dilation, padding, out_pad, frac, seed):
    out_pad = min(out_pad, max(stride, dilation) - 1)
    shape = (1, 2 * groups, 7, 9)
    weight = torch.randn(2 * groups, 3, k, k, generator=torch.Generator().manual_seed(seed))
    if (shape[2] - 1) * stride - 2 * padding + dilation * (k - 1) + out_pad + 1 <= 0:
        return
    conv = SparseConvTranspose2d(weight, shape, stride, padding, out_pad, groups, dilation, backend=backend)
    delta = random_delta(shape, frac, False, seed)
    ref = F.conv_transpose2d(delta.to_dense(), weight, None, stride, padding, out_pad, groups, dilation)
    torch.testing.assert_close(conv(delta).to_dense(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv_empty_delta_and_shape_check(backend):
    conv = SparseConv2d(torch.randn(8, 4, 3, 3), (1, 4, 10, 10), 2, 1, backend=backend)
    out = conv(PixelDelta.empty((1, 4, 10, 10)))
    assert out.shape == (1, 8, 5, 5) and out.active == 0
    with pytest.raises(ValueError):
        conv(PixelDelta.empty((1, 4, 12, 10)))


def test_first_conv_gathers_for_clustered_and_scatters_for_scattered_changes():
    """The RGB first conv (6x6/2) picks the output-centric gather for blobs, the scatter for spread pixels."""
    weight = torch.randn(16, 3, 6, 6)
    shape = (1, 3, 96, 128)
    conv = SparseConv2d(weight, shape, 2, 2)
    expect = ["gather", "scatter"] if HAVE_NUMBA else ["scatter", "scatter"]
    for clustered, path in zip((True, False), expect, strict=True):
        idx = active_pixels(96, 128, 0.2 if clustered else 0.01, "clustered" if clustered else "scattered", 5)
        delta = PixelDelta(idx, torch.randn(idx.numel(), 3), shape)
        out = conv(delta)
        assert conv.last_path == path
        torch.testing.assert_close(out.to_dense(), F.conv2d(delta.to_dense(), weight, None, 2, 2), atol=1e-4, rtol=1e-4)
        assert torch.equal(out.index, reachable(delta, (6, 6), 2, 2, 1))


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba path")
@pytest.mark.parametrize("stride, padding, dilation", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (2, 0, 1)])
def test_small_delta_conv_kernel_equals_split_gemm_path(monkeypatch, stride, padding, dilation):
    """The one-call kernel for few active pixels and the split + GEMM + scatter path give the same delta."""
    from deluceva.delta.kernels import scatter

    shape = (2, 24, 13, 11)
    weight = torch.randn(40, 24, 3, 3, generator=torch.Generator().manual_seed(1))
    ref_conv = SparseConv2d(weight, shape, stride, padding, dilation)
    for frac, seed in [(0.01, 0), (0.05, 1), (0.3, 2)]:
        delta = random_delta(shape, frac, False, seed)
        ref = F.conv2d(delta.to_dense(), weight, None, stride, padding, dilation)
        outs = []
        for per_cout in (0, 1 << 40):  # never / always the small kernel
            monkeypatch.setattr(scatter, "SMALL_CONV_MACS_PER_COUT", per_cout)
            conv = SparseConv2d(weight, shape, stride, padding, dilation)
            outs.append(conv(delta))
            again = conv(delta)  # the persistent buffer is clean again
            torch.testing.assert_close(again.values, outs[-1].values, atol=1e-5, rtol=1e-5)
        assert torch.equal(outs[0].index, outs[1].index)
        for out in outs:
            torch.testing.assert_close(out.to_dense(), ref, atol=1e-4, rtol=1e-4)
    assert ref_conv.out_shape == tuple(ref.shape)


def test_conv_dense_above_switches_path_exactly():
    weight = torch.randn(6, 4, 3, 3)
    conv = SparseConv2d(weight, (1, 4, 12, 12), 1, 1, dense_above=0.3)
    delta = random_delta((1, 4, 12, 12), 0.6, False, 3)
    out = conv(delta)
    assert conv.last_path == "dense"
    torch.testing.assert_close(out.to_dense(), F.conv2d(delta.to_dense(), weight, None, 1, 1), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- filter


def filter_sequence(backend: str, shape, steps, seed):
    """Yield (filter, residual before, incoming delta, pct, floor, count floor, forwarded) over random deltas; every
    fourth step the percentage is of a count floor above the candidates (an average count after a re-seed)."""
    f = PixelFilter(shape, backend=backend)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        frac = [0.02, 0.1, 0.4][step % 3]
        d = random_delta(shape, frac, bool(step % 2), seed + step)
        pct = float(torch.randint(0, 101, (1,), generator=g))
        floor = [0.0, 0.0, 0.3][step % 3]
        count_floor = 2 * f.pixels if step % 4 == 3 else 0
        before = f.residual.clone()
        fwd = f(d, pct, floor, count_floor=count_floor)
        yield f, before, d, pct, floor, count_floor, fwd


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(4, 20), st.integers(4, 20)),
    seed=st.integers(0, 2**16),
)
def test_filter_conserves_and_forwards_the_largest(backend, shape, seed):
    for f, before, d, pct, floor, count_floor, fwd in filter_sequence(backend, shape, 6, seed):
        # nothing is lost, bit for bit
        assert torch.equal(f.residual + fwd.to_rows(), before + d.to_rows())
        assert torch.all(fwd.index[1:] > fwd.index[:-1])
        assert torch.equal(f.magnitude, f.residual.abs().amax(1))
        assert set(f.candidates.tolist()) >= set(f.magnitude.gt(0).nonzero().squeeze(1).tolist())
        assert f.num_candidates == f.candidates.numel()
        m_fwd = fwd.values.abs().amax(1)
        assert torch.all(m_fwd > floor)
        cand = before.add(d.to_rows()).abs().amax(1)
        n_cand = int(cand.gt(0).sum())
        if n_cand and fwd.active:
            # every forwarded pixel is at least as large as every held-back one above the floor
            held = f.magnitude[f.magnitude.gt(floor)]
            if held.numel():
                assert m_fwd.min() >= held.max()
        if floor == 0.0 and n_cand >= 50:
            # (100 - pct)% of the candidates, or of the count floor (at most every candidate)
            want = min(n_cand, round((100.0 - pct) / 100.0 * max(n_cand, count_floor)))
            assert abs(fwd.active - want) <= 0.02 * n_cand


@pytest.mark.parametrize("shape", [(1, 5, 16, 18), (1, 4, 160, 160)])  # the latter: radix selection (> 8192 pending)
def test_filter_backends_agree(shape):
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    seqs = [list(filter_sequence(b, shape, 8, 11)) for b in ("numba", "torch")]
    for (fa, *_, a), (fb, *_, b) in zip(*seqs, strict=True):
        assert torch.equal(a.index, b.index)
        assert torch.equal(a.values, b.values)
        assert torch.equal(fa.residual, fb.residual)


def test_filter_direct_path_agrees_with_the_torch_backend(monkeypatch):
    """While the percentage binds nothing above the floor (a near-zero percentage with a floor), the numba filter
    writes the new delta once (`_forward_direct_nb`); when the percentage binds it puts everything back and
    selects as usual. Either way outputs and residuals equal the torch backend's, bit for bit."""
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    import deluceva.delta.kernels.filter as kfilter

    taken = []
    direct = kfilter._forward_direct_nb

    def spy(*args):
        res = direct(*args)
        taken.append(bool(res[3]))
        return res

    monkeypatch.setattr(kfilter, "_forward_direct_nb", spy)
    shape = (1, 8, 40, 48)
    fa, fb = PixelFilter(shape, backend="numba"), PixelFilter(shape, backend="torch")
    # (pct, floor, count floor): the percentage binds at 50% and 90%, and 0.01% of many candidates holds one back
    steps = [(0.01, 0.8, 0), (0.01, 0.8, 0), (0.0, 0.8, 0), (50.0, 0.8, 0), (0.01, 0.8, 0), (0.01, 0.8, 0),
             (90.0, 0.0, 0), (0.0, 0.0, 0), (0.01, 0.0, 0), (0.01, 0.8, 2 * 40 * 48), (0.0, 0.8, 0)]
    for i, (pct, floor, count_floor) in enumerate(steps):
        d = random_delta(shape, [0.05, 0.3, 0.8][i % 3], bool(i % 2), 100 + i)
        a = fa(d, pct, floor, count_floor=count_floor)
        b = fb(d, pct, floor, count_floor=count_floor)
        assert torch.equal(a.index, b.index), i
        assert torch.equal(a.values, b.values), i
        assert torch.equal(fa.residual, fb.residual), i
        assert torch.equal(fa.magnitude, fa.residual.abs().amax(1)), i
        assert fa.held_max == pytest.approx(fb.held_max), i
        assert set(fa.candidates.tolist()) == set(fa.magnitude.gt(0).nonzero().squeeze(1).tolist()), i
    assert True in taken and False in taken  # both the direct path and its undo ran


def test_row_add_kernel_adds_and_copies():
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    from deluceva.delta.kernels.rowadd import add_rows_nb, no_copy

    g = torch.Generator().manual_seed(5)
    rows = torch.randn(37 * 21, 255, generator=g)
    idx = torch.randperm(37 * 21, generator=g)[:300].sort().values
    vals = torch.randn(300, 255, generator=g)
    want = rows.clone().index_add_(0, idx, vals)
    copy = rows.clone()
    add_rows_nb(rows.numpy(), idx.numpy(), vals.numpy(), copy.numpy())
    assert torch.equal(rows, want) and torch.equal(copy, want)
    add_rows_nb(rows.numpy(), idx.numpy(), vals.numpy(), no_copy(255))
    assert torch.equal(rows, want.index_add(0, idx, vals)) and torch.equal(copy, want)


def test_radix_selection_finds_the_partitions_kth_largest():
    if not HAVE_NUMBA:
        pytest.skip("numba not installed")
    from deluceva.delta.kernels.filter import RADIX_SELECT_MIN, kth_largest_nb

    rng = np.random.default_rng(3)
    n = RADIX_SELECT_MIN * 4
    noise = np.abs(rng.standard_normal(n)).astype(np.float32) * np.float32(0.01)
    noise[: n // 20] *= 300  # a few large changes over many codec-noise ones, as at a network input
    cases = {
        "mixed magnitudes": np.maximum(noise, np.float32(1e-7)),
        "quantised (ties)": (rng.integers(1, 40, n) / np.float32(255)).astype(np.float32),
        "all equal": np.full(n, 0.25, np.float32),
        "one bin": (np.float32(1.0) + rng.random(n).astype(np.float32) * np.float32(1e-3)).astype(np.float32),
        "just above the cut-over": np.abs(rng.standard_normal(RADIX_SELECT_MIN)).astype(np.float32) + 1e-6,
    }
    for name, mc in cases.items():
        m = mc.size
        for k in (1, 2, m // 20, m // 2, m - 1, m):
            buf = np.concatenate([mc, rng.random(7).astype(np.float32)])  # only mc[:n] counts
            assert kth_largest_nb(buf, m, k) == np.partition(mc, m - k)[m - k], (name, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_filter_reset_and_empty(backend):
    f = PixelFilter((1, 3, 8, 8), backend=backend)
    assert f(PixelDelta.empty((1, 3, 8, 8)), 0.0).active == 0
    f(random_delta((1, 3, 8, 8), 0.5, False, 0), 100.0)
    assert f.residual.abs().sum() > 0
    f.reset()
    assert f.residual.abs().sum() == 0 and f.magnitude.sum() == 0 and f.candidates.numel() == 0
    # state edited from outside (shared residual): resync rebuilds the candidates
    f.residual[5] = 1.0
    f.magnitude[5] = 1.0
    f.resync()
    assert f.candidates.tolist() == [5]
    out = f(PixelDelta.empty((1, 3, 8, 8)), 0.0)
    assert out.index.tolist() == [5] and f.residual.abs().sum() == 0
    assert f(PixelDelta.empty((1, 3, 8, 8)), 0.0).active == 0


# ----------------------------------------------------------------------------------------------- elementwise


@HYP
@given(
    name=st.sampled_from(["relu", "relu6", "leaky_relu", "silu", "sigmoid", "hardswish", "tanh", "gelu"]),
    shape=st.tuples(st.integers(1, 2), st.integers(1, 8), st.integers(1, 12), st.integers(1, 12)),
    frac=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_activation_delta_equals_dense(name, shape, frac, seed):
    g = torch.Generator().manual_seed(seed)
    z = 3 * torch.randn(shape, generator=g)
    act = SparseActivation(name, shape)
    act.seed(z)
    delta = random_delta(shape, frac, False, seed)
    out = act(delta)
    fn = ACTIVATIONS[name]
    z_new = z + delta.to_dense()
    torch.testing.assert_close(out.to_dense(), fn(z_new) - fn(z), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(act.z, z_new.permute(0, 2, 3, 1).reshape(-1, shape[1]), atol=1e-6, rtol=1e-6)
    assert set(out.index.tolist()) <= set(delta.index.tolist())
    if name in FLAT:  # all-zero rows are dropped where f is flat
        assert bool(out.values.ne(0).any(1).all())


@pytest.mark.skipif(not HAVE_NUMBA, reason="fused kernel needs numba")
@pytest.mark.parametrize("name", ["silu", "relu", "leaky_relu", "sigmoid", "hardswish"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("rows, channels", [(1, 3), (37, 16), (700, 64)])
def test_fused_state_step_matches_torch_path(name, state_dtype, precise, rows, channels):
    """RowState.step with the fused kernel (one numba pass) = the torch path (update, f twice, subtract), over the
    whole range of pre-activations (exp's clamp included), and the state ends equal."""
    g = torch.Generator().manual_seed(rows * channels)
    z = (20 * torch.randn(1, channels, 40, 30, generator=g)).clamp_(-120, 120)
    fused, ref = RowState(z, state_dtype), RowState(z, state_dtype)
    idx = torch.randperm(1200, generator=g)[:rows].sort().values
    d = torch.randn(rows, channels, generator=g) * torch.tensor([0.01, 1.0, 30.0]).repeat(channels)[:channels]
    fn, alpha = ACTIVATIONS[name], 0.1
    code = {"silu": actstep.SILU, "relu": actstep.RELU, "leaky_relu": actstep.LEAKY_RELU, "sigmoid": actstep.SIGMOID,
            "hardswish": actstep.HARDSWISH}[name]
    f = (lambda t: fn(t, alpha)) if name == "leaky_relu" else fn
    for _ in range(3):
        got = fused.step(idx, d, f, precise, (code, alpha))
        want = ref.step(idx, d, f, precise)
        assert got.dtype == want.dtype == torch.float32
        # both in float64: tight; otherwise either side rounds f(z) to float32, a few ulps of the largest |z|
        tol = 1e-6 if precise and state_dtype == torch.float64 else 4 * 2.0**-24 * float(ref.z.abs().max())
        torch.testing.assert_close(got, want, atol=tol, rtol=0.0)
    assert torch.equal(fused.z, ref.z)


@pytest.mark.skipif(not HAVE_NUMBA, reason="parallel kernels need numba")
@pytest.mark.parametrize("name", ["silu", "leaky_relu", "hardswish"])
def test_parallel_state_steps_equal_the_sequential_kernel_bit_for_bit(name):
    """With 2 threads (`use_threads`) a step of more than PARALLEL_MIN values runs the parallel kernel, the rows split
    into slices: every output value and the state equal the sequential fused kernel's exactly (rows and dense conv
    rows alike). With 1 thread such a step takes the torch path (no parallel kernel)."""
    from deluceva.delta import kernels_bridge, state
    from deluceva.threads import use_threads

    g = torch.Generator().manual_seed(7)
    z = 4 * torch.randn(1, 64, 80, 60, generator=g)
    idx = torch.randperm(4800, generator=g)[:1500].sort().values  # 96k values, several slices of uneven rows
    d = torch.randn(1500, 64, generator=g)
    code, alpha = {"silu": (actstep.SILU, 0.0), "leaky_relu": (actstep.LEAKY_RELU, 0.1),
                   "hardswish": (actstep.HARDSWISH, 0.0)}[name]
    f = ACTIVATIONS[name]
    rows = torch.zeros(4800, 64)
    rows[idx] = d
    try:
        use_threads(2)
        assert RowState._fused(d.numel(), False) is state._step_act_par
        par = RowState(z, torch.float32)
        seq = par.z.numpy().copy()
        for _ in range(2):
            got = par.step(idx, d, f, False, (code, alpha)).numpy()
            want = actstep.step_act_nb(seq, idx.numpy(), d.numpy(), code, alpha, False)
            assert np.array_equal(got, want) and np.array_equal(par.z.numpy(), seq)
        got_idx, got_rows = kernels_bridge.step_act_rows(par.z_np, rows, (code, alpha))
        want_idx, want_rows = actstep.step_act_rows_nb(seq, rows.numpy(), code, alpha, np.empty(4800, np.int64))
        assert np.array_equal(got_idx, idx.numpy()) and np.array_equal(got_idx, want_idx)
        assert np.array_equal(got_rows, want_rows) and np.array_equal(par.z.numpy(), seq)
    finally:
        use_threads(1)
    assert RowState._fused(d.numel(), False) is None


@pytest.mark.skipif(not HAVE_NUMBA, reason="parallel kernels need numba")
@pytest.mark.parametrize("na, nb, same", [(3000, 2500, False), (40, 9000, False), (1500, 1500, True), (9, 1, False)])
def test_parallel_merges_equal_the_one_pass_kernel_bit_for_bit(na, nb, same, monkeypatch):
    """With 2 threads, add and concat of two large deltas merge in parallel slices of the index range: the same
    index and the same value bits as the one-pass kernel (negative zeros included), whether the pixel sets overlap,
    coincide or one is tiny; and the result is the dense add / concat."""
    from deluceva.delta.kernels import merge
    from deluceva.threads import use_threads

    g = torch.Generator().manual_seed(na + nb)
    shape = (1, 32, 120, 100)
    ia = torch.randperm(12000, generator=g)[:na].sort().values
    ib = ia.clone() if same else torch.randperm(12000, generator=g)[:nb].sort().values
    a = PixelDelta(ia, torch.randn(len(ia), 32, generator=g), shape)
    vb = torch.randn(len(ib), 32, generator=g)
    vb[0, 0] = -0.0
    b = PixelDelta(ib, vb, shape)
    calls = []
    par = merge._merge2_par_nb
    monkeypatch.setattr(merge, "_merge2_par_nb", lambda *args: calls.append(1) or par(*args))
    try:
        use_threads(2)
        for fn, channels in ((add, False), (concat, True)):
            got = fn(a, b)
            want_idx, want_vals = merge._merge2_nb(a.index_np, a.values_np, b.index_np, b.values_np, channels)
            assert np.array_equal(got.index_np, want_idx) and got.values_np.tobytes() == want_vals.tobytes()
            dense = torch.cat([a.to_dense(), b.to_dense()], 1) if channels else a.to_dense() + b.to_dense()
            assert torch.equal(got.to_dense(), dense)
    finally:
        use_threads(1)
    assert len(calls) == (0 if na + nb < 100 else 2)  # large merges (>= 8k values) took the parallel kernel


def test_row_state_adopts_only_channels_last_values_of_its_dtype():
    """adopt=True takes a channels-last value of the state dtype as the rows themselves (a seeder's NHWC output: no
    copy, updates land in it); NCHW values, another dtype, or adopt=False get their own rows with the same values."""
    z = torch.randn(1, 8, 5, 6)
    nhwc = z.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
    adopted = RowState(nhwc, torch.float32, adopt=True)
    assert adopted.z.data_ptr() == nhwc.data_ptr() and adopted.z.is_contiguous()
    adopted.update(torch.tensor([7]), torch.ones(1, 8))
    assert torch.equal(nhwc[0, :, 1, 1], z[0, :, 1, 1] + 1)  # row 7 = pixel (1, 1)
    for value, dtype, adopt in [(z, torch.float32, True), (nhwc, torch.float64, True), (nhwc, torch.float32, False)]:
        own = RowState(value, dtype, adopt=adopt)
        assert own.z.data_ptr() != value.data_ptr()
        torch.testing.assert_close(own.z, value.permute(0, 2, 3, 1).reshape(30, 8).to(dtype))


def test_activation_code_covers_plain_calls_only():
    graph = fx.Graph()
    x = graph.placeholder("x")
    cases = [(F.silu, (x,), {}, (actstep.SILU, 0.0)), (F.leaky_relu, (x, 0.1), {}, (actstep.LEAKY_RELU, 0.1)),
             (F.leaky_relu, (x,), {"negative_slope": 0.2}, (actstep.LEAKY_RELU, 0.2)),
             (F.leaky_relu, (x,), {}, (actstep.LEAKY_RELU, 0.01)), (torch.relu, (x,), {}, (actstep.RELU, 0.0)),
             (F.relu, (x,), {"inplace": True}, None), (torch.tanh, (x,), {}, None), (F.elu, (x, 0.5), {}, None)]
    for target, args, kwargs, want in cases:
        assert activation_code(graph.call_function(target, args, kwargs), x) == want, target


# ----------------------------------------------------------------------------------------------------- merge


@HYP
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 10), st.integers(1, 10)),
    fa=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    fb=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    cb=st.integers(1, 5),
    same=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_add_and_concat_equal_dense(shape, fa, fb, cb, same, seed):
    for numba in {False, HAVE_NUMBA}:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("deluceva.delta.kernels.merge.HAVE_NUMBA", numba)
            check_add_concat(shape, fa, fb, cb, same, seed)


def check_add_concat(shape, fa, fb, cb, same, seed):
    a = random_delta(shape, fa, False, seed)
    b = random_delta(shape, fb, True, seed + 1)
    if same:  # identical pixel sets take the fast path
        b = PixelDelta(a.index, torch.randn(a.active, shape[1]), shape)
    s = add(a, b)
    torch.testing.assert_close(s.to_dense(), a.to_dense() + b.to_dense())
    assert torch.equal(s.index, torch.unique(torch.cat([a.index, b.index])))
    c_shape = (shape[0], cb, shape[2], shape[3])
    c = random_delta(c_shape, fb, False, seed + 2)
    cat = concat(a, c, b)
    assert cat.shape == (shape[0], 2 * shape[1] + cb, shape[2], shape[3])
    torch.testing.assert_close(cat.to_dense(), torch.cat([a.to_dense(), c.to_dense(), b.to_dense()], 1))
    assert torch.all(cat.index[1:] > cat.index[:-1])
    many = add(a, b, c if cb == shape[1] else a)
    torch.testing.assert_close(many.to_dense(), a.to_dense() + b.to_dense() + (c if cb == shape[1] else a).to_dense())
    # the changing parts of a wider concat at their offsets (channels between them stay zero), an input twice
    wide = (shape[0], 3 * shape[1] + cb + 2, shape[2], shape[3])
    at = concat_at([a, c, b, a], [0, shape[1] + 1, shape[1] + cb + 2, 2 * shape[1] + cb + 2], wide)
    ref = torch.zeros(wide)
    for d, off in zip([a, c, b, a], [0, shape[1] + 1, shape[1] + cb + 2, 2 * shape[1] + cb + 2], strict=True):
        ref[:, off : off + d.shape[1]] += d.to_dense()
    assert torch.equal(at.to_dense(), ref) and at.shape == wide and at.values.is_contiguous()
    assert torch.equal(at.index, torch.unique(torch.cat([a.index, b.index, c.index])))


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(
    shape=st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(1, 9), st.integers(1, 9)),
    scale=st.sampled_from([2, 2, 3]),
    frac=st.sampled_from([0.0, 0.1, 0.6, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_upsample_nearest_equals_dense(backend, shape, scale, frac, seed):
    d = random_delta(shape, frac, True, seed)
    up = upsample_nearest2x(d, scale, backend)
    ref = F.interpolate(d.to_dense(), scale_factor=scale, mode="nearest")
    assert torch.equal(up.to_dense(), ref)
    assert torch.all(up.index[1:] > up.index[:-1]) and up.active == d.active * scale * scale


@pytest.mark.parametrize("backend", BACKENDS)
@HYP
@given(
    k=st.sampled_from([2, 3, 5, 9, 13]),
    stride=st.sampled_from([1, 2]),
    frac=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_maxpool_delta_equals_dense(backend, k, stride, frac, seed):
    shape = (1, 4, 11, 13)
    pad = k // 2
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    pool = SparseMaxPool2d(shape, k, stride, pad, backend=backend)
    pool.seed(x)
    for step in range(3):  # consecutive deltas keep the stored state consistent
        d = random_delta(shape, frac, bool(step % 2), seed + step)
        out = pool(d)
        x_new = x + d.to_dense()
        ref = F.max_pool2d(x_new, k, stride, pad) - F.max_pool2d(x, k, stride, pad)
        torch.testing.assert_close(out.to_dense(), ref)
        x = x_new


# ------------------------------------------------------------------------------------ real video, real weights


def video_frames(count: int) -> torch.Tensor:
    """First `count` decoded frames of the PETS09 clip as float (T, 3, 360, 480) in [0, 1]."""
    frames = []
    with av.open(str(VIDEO)) as container:
        for frame in container.decode(video=0):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if len(frames) == count:
                break
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0


def v5_conv(sd, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """YOLOv5n conv `name` with its BatchNorm (eps 1e-3) folded in: (weight OIHW, bias)."""
    w = torch.from_numpy(sd[f"{name}.conv.weight"])
    gamma, beta = (torch.from_numpy(sd[f"{name}.bn.{k}"]) for k in ("weight", "bias"))
    mean, var = (torch.from_numpy(sd[f"{name}.bn.running_{k}"]) for k in ("mean", "var"))
    scale = gamma / torch.sqrt(var + 1e-3)
    return w * scale[:, None, None, None], beta - mean * scale


def test_real_video_chain_matches_dense():
    """Filter -> 6x6/s2 conv -> SiLU -> filter -> 3x3/s2 conv -> SiLU -> 1x1 conv of YOLOv5n on consecutive PETS09
    frames with 0% filtering reproduces the dense layers on every frame."""
    sd = np.load(V5_WEIGHTS)
    (w0, b0), (w1, b1), (w2, b2) = (v5_conv(sd, n) for n in ("model.0", "model.1", "model.2.cv1"))
    frames = video_frames(10)

    def dense(x):
        a0 = F.silu(F.conv2d(x, w0, b0, 2, 2))
        z1 = F.conv2d(a0, w1, b1, 2, 1)
        return a0, z1, F.conv2d(F.silu(z1), w2, b2)

    x0 = frames[:1]
    a0, z1, y2 = dense(x0)
    conv0, conv1, conv2 = (
        SparseConv2d(w0, tuple(x0.shape), 2, 2),
        SparseConv2d(w1, tuple(a0.shape), 2, 1),
        SparseConv2d(w2, tuple(z1.shape)),
    )
    filt0, filt1 = PixelFilter(tuple(x0.shape)), PixelFilter(tuple(a0.shape))
    act0, act1 = SparseActivation("silu", tuple(a0.shape)), SparseActivation("silu", tuple(z1.shape))
    act0.seed(F.conv2d(x0, w0, b0, 2, 2))
    act1.seed(z1)
    y2_rows = y2.permute(0, 2, 3, 1).reshape(-1, y2.shape[1]).clone()
    for t in range(1, len(frames)):
        d_in = PixelDelta.from_dense(frames[t : t + 1] - frames[t - 1 : t])
        assert 0.02 < d_in.active_fraction < 0.3  # consecutive frames of a static camera: sparse change
        s0 = filt0(d_in, 0.0)
        d1 = act0(conv0(s0))
        s1 = filt1(d1, 0.0)
        d2 = conv2(act1(conv1(s1)))
        y2_rows.index_add_(0, d2.index, d2.values)
        a0_ref, z1_ref, y2_ref = dense(frames[t : t + 1])
        assert d1.active_fraction < 0.5
        torch.testing.assert_close(act1.z, z1_ref.permute(0, 2, 3, 1).reshape(act1.z.shape), atol=2e-4, rtol=0)
        torch.testing.assert_close(y2_rows, y2_ref.permute(0, 2, 3, 1).reshape(y2_rows.shape), atol=2e-4, rtol=0)


def test_real_video_filter_holds_back_and_conserves():
    """On real frame deltas the filter forwards (100-pct)% of the candidates and the forwarded plus the held-back
    parts always add up to the true change of the input."""
    frames = video_frames(8)
    shape = (1, 3, frames.shape[2], frames.shape[3])
    f = PixelFilter(shape)
    sent = torch.zeros(shape[0] * shape[2] * shape[3], 3)
    for t in range(1, len(frames)):
        d = PixelDelta.from_dense(frames[t : t + 1] - frames[t - 1 : t])
        f.accumulate(d)
        n_cand = int(f.magnitude.gt(0).sum())
        fwd = f.select(60.0, noise_floor=0.0)
        assert abs(100.0 * fwd.active / n_cand - 40.0) <= 2.0
        sent.index_add_(0, fwd.index, fwd.values)
        change = (frames[t : t + 1] - frames[:1]).permute(0, 2, 3, 1).reshape(sent.shape)
        torch.testing.assert_close(sent + f.residual, change, atol=1e-5, rtol=0)
    # a noise floor holds back small (codec-noise) changes entirely and forwards all the rest
    f = PixelFilter(shape)
    fwd = f(PixelDelta.from_dense(frames[-1:] - frames[:1]), 0.0, noise_floor=8 / 255)
    assert fwd.active and bool(fwd.values.abs().amax(1).gt(8 / 255).all())
    assert f.candidates.numel() > fwd.active  # most changed pixels are codec noise
    assert bool(f.magnitude.le(8 / 255).all())
