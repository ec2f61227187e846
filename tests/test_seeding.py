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
    assert len(seeder.nodes) > 100  # every conv's pre-activation and activation, the pools
    assert 50 <= sum(seeder.nhwc) < len(seeder.nodes)  # the convs' pre-activations come transposed to NHWC
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
