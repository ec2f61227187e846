"""Seeding a delta network from ONNX Runtime (deluceva.seeding) on real frames of a shipped video."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from deluceva.convert import convert
from deluceva.dense import make_dense
from deluceva.plan.session import decode_frames
from deluceva.seeding import OrtSeeder
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
CAR = ROOT / "assets/video/car-detection.mp4"
HW = (128, 224)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    det = load_model("yolov5n")
    frames = decode_frames(det, HW, CAR, 80)
    return det, frames, make_dense(det.network, HW, 1, "onnxruntime")


def _close(a, b, tol=1e-4):
    for p, q in zip(a, b, strict=True):
        scale = max(1.0, float(q.abs().max()))
        assert float((p - q).abs().max()) <= tol * scale


def test_seeded_state_comes_from_the_exported_values(setup):
    """Values of another frame handed to seed_from become the network's state: its output is that frame's."""
    det, frames, ort = setup
    net = convert(det.network, frames[0], state_dtype=torch.float32)
    seeder = OrtSeeder(net, HW, 1)
    convs = sum(1 for s in net.delta_steps if s.unit.kind.startswith("conv"))
    # every conv's pre-activation, transposed to NHWC; the pools; no activation (computed from it when needed)
    assert convs == sum(seeder.nhwc) == 60 and len(seeder.nodes) == convs + 3
    other = seeder.values(frames[40])
    assert all(tuple(v.shape) == tuple(n.meta["tensor_meta"].shape) for n, v in other.items())
    out = net.seed_from(frames[0], other)
    _close(out, ort(frames[40]))
    assert net.last_dense and not net.needs_seed(frames[1])


def test_ort_seeded_delta_network_tracks_the_dense_network(setup):
    """Seeded from ONNX Runtime, then 79 delta frames at 0% filtered (float32 state, so the values are used): every
    frame's output within 1e-4 of the output scale of the dense network's."""
    det, frames, ort = setup
    net = convert(det.network, frames[0], state_dtype=torch.float32)
    seeder = OrtSeeder(net, HW, 1)
    _close(seeder(frames[0]), ort(frames[0]))
    with torch.inference_mode():
        for x in frames[1:]:
            assert not net.needs_seed(x)
            _close(net(x), det.network(x))


def test_reseeds_write_into_the_same_buffers_and_keep_tracking_the_dense_network(setup):
    """Every seeder run writes into the same output buffers (no fresh pages per re-seed) and still returns its own
    frame's values; re-seeding every 15 frames, a delta network at 0% filtered (float32 state, built on those
    buffers) stays within 1e-4 of the output scale of the dense network's on every frame."""
    det, frames, ort = setup
    net = convert(det.network, frames[0], state_dtype=torch.float32)
    seeder = OrtSeeder(net, HW, 1)
    first = seeder.values(frames[5])
    ptrs = [v.data_ptr() for v in first.values()]
    _close(seeder.net.seed_from(frames[5], first), ort(frames[5]))
    second = seeder.values(frames[60])
    assert [v.data_ptr() for v in second.values()] == ptrs
    _close(net.seed_from(frames[60], second), ort(frames[60]))
    with torch.inference_mode():
        for i, x in enumerate(frames):
            if i % 15 == 0:
                net.refresh()
                _close(seeder(x), ort(x))
            else:
                assert not net.needs_seed(x)
                _close(net(x), det.network(x))


def test_exact_network_seeds_from_its_float64_pass(setup):
    """At 0% with float64 state the network seeds from its own float64 pass; the seeder does not override it."""
    det, frames, _ = setup
    net = convert(det.network, frames[0])
    seeder = OrtSeeder(net, HW, 1)
    assert net.seeds_in_float64(frames[0])
    with torch.inference_mode():
        out = seeder(frames[3])
        exp = copy.deepcopy(net.gm).double()(frames[3].double())
    for p, q in zip(out, exp, strict=True):
        assert float((p.double() - q).abs().max()) <= 1e-6 * max(1.0, float(q.abs().max()))


def test_engine_seeds_from_onnx_runtime_and_reseeds_there(setup):
    from deluceva.engine import Engine, EngineConfig

    det, frames, ort = setup
    eng = Engine(det, EngineConfig(mode="delta", imgsz=f"{HW[1]}x{HW[0]}", filter_pct=50.0, plan="delta"))
    hw = eng.ensure_prepared((720, 1280))
    seeder = eng._seeders[hw]
    calls = []
    run = seeder._run
    seeder._run = lambda x: calls.append(1) or run(x)
    with torch.inference_mode():
        outs, mode = eng._run_delta(frames[0])
        assert mode == "refresh" and calls == [1]
        _close(outs, ort(frames[0]))
        eng._run_delta(frames[1])
        assert calls == [1]  # a delta frame
        eng.delta_network.refresh()
        outs, mode = eng._run_delta(frames[2])
        assert mode == "refresh" and calls == [1, 1]
        _close(outs, ort(frames[2]))
    off = Engine(det, EngineConfig(mode="delta", imgsz=f"{HW[1]}x{HW[0]}", filter_pct=50.0, plan="delta",
                                   dense_seed=False))
    assert off._seeders.get(off.ensure_prepared((720, 1280))) is None


def test_reseeds_keep_the_filters_scale_and_a_new_stream_measures_it(setup):
    """The relative floor's scale (std of each filter's input) is measured on a stream's first seed, from values
    the ONNX Runtime seeder hands over lazily (activations computed only then) as from PyTorch's own seed; re-seeds
    keep it (they need no activation values); after reset() the next seed measures the new frame."""
    from deluceva.delta.filter import PixelFilter

    det, frames, _ = setup

    def scales(net):
        return [f.scale for f in net._filters if isinstance(f, PixelFilter)]

    net, ref = (convert(det.network, frames[0], filter_pct=1.0, relative_floor=0.2, state_dtype=torch.float32)
                for _ in range(2))
    seeder = OrtSeeder(net, HW, 1)
    with torch.inference_mode():
        seeder(frames[0])
        ref(frames[0])
        first = scales(net)
        assert len(first) > 50 and all(s > 0 for s in first)
        assert first == pytest.approx(scales(ref), rel=1e-4)
        net.refresh()
        seeder(frames[40])
        assert scales(net) == first
        net.reset()
        ref.reset()
        seeder(frames[40])
        ref(frames[40])
    assert scales(net) == pytest.approx(scales(ref), rel=1e-4)
    assert sum(a != b for a, b in zip(scales(net), first, strict=True)) > len(first) // 2
    net.RESCALE_FRAMES = 3  # a re-seed this many frames after the scales were measured measures them again
    with torch.inference_mode():
        net(frames[41])
        net(frames[42])
        net.refresh()
        seeder(frames[43])
        ref.reset()
        ref(frames[43])
    assert scales(net) == pytest.approx(scales(ref), rel=1e-4)
