"""Kernel warm-up before the first real frame: it reaches every unit and leaves no trace in the results."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deluceva.convert import convert
from deluceva.delta.warmup import WARMUP_PCT, synthetic_clip, warm_up
from deluceva.plan.session import decode_frames
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
PERSON = ROOT / "assets/video/one-by-one-person-detection.mp4"
HW = (128, 224)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def yolov5n():
    det = load_model("yolov5n")
    return det, decode_frames(det, HW, PERSON, 12)


def test_synthetic_clip_changes_reach_every_unit_in_delta_form(yolov5n):
    det, frames = yolov5n
    net = convert(det.network, frames[0], filter_pct=WARMUP_PCT)
    net.set_unit_modes(dict.fromkeys(net.unit_names, "delta"))
    clip = synthetic_clip(tuple(frames[0].shape))
    assert len(clip) == 4 and all(x.shape == frames[0].shape for x in clip)
    reached = set()
    with torch.inference_mode():
        for x in clip:
            net(x)
            if not net.last_dense:
                reached |= {r["name"] for r in net.last_stats if r["active_in"] > 0 and r["mode"] == "delta"}
    assert reached == set(net.unit_names)


def test_warm_up_restores_the_network_and_changes_no_result(yolov5n):
    """Two networks over the same real frames at 50%, one warmed up: bit-identical outputs, same unit paths."""
    det, frames = yolov5n
    cold = convert(det.network, frames[0], filter_pct=50.0)
    warm = convert(det.network, frames[0], filter_pct=50.0)
    modes = {n: ("dense" if i % 3 == 0 else "auto") for i, n in enumerate(warm.unit_names)}
    for net in (cold, warm):
        net.set_unit_modes(modes)
    assert warm_up(warm, tuple(frames[0].shape)) > 0.0
    assert warm.filter_pct == 50.0
    assert {s.unit.name: s.unit.mode for s in warm.delta_steps} == modes
    with torch.inference_mode():
        for i, x in enumerate(frames):
            a, b = cold(x), warm(x)
            assert cold.last_dense == warm.last_dense == (i == 0)  # warm-up left no state: the first frame seeds
            for ya, yb in zip(a, b, strict=True):
                assert torch.equal(ya, yb)
            assert [r["mode"] for r in cold.last_stats] == [r["mode"] for r in warm.last_stats]


def test_a_re_seed_leaves_nothing_of_the_frames_before(yolov5n):
    """A network re-seeded in mid-run (its filters keep their buffers) gives bit-identical results to a new network
    seeded on the same frame, at 75% with residuals pending at the re-seed. Without count smoothing: the filters'
    average candidate count is carried over re-seeds on purpose (FilterConfig.count_smoothing)."""
    det, frames = yolov5n
    used = convert(det.network, frames[0], filter_pct=75.0)
    used.config.count_smoothing = 0.0
    with torch.inference_mode():
        for x in frames[:6]:
            used(x)
        assert any(r["candidates"] for r in used.last_stats)  # something is held back
        used.refresh()
        fresh = convert(det.network, frames[0], filter_pct=75.0)
        fresh.config.count_smoothing = 0.0
        for i, x in enumerate(frames[6:]):
            a, b = used(x), fresh(x)
            assert used.last_dense == fresh.last_dense == (i == 0)
            for ya, yb in zip(a, b, strict=True):
                assert torch.equal(ya, yb)


def test_warm_up_runs_the_coherent_input_pass_and_the_mirror_kernels(yolov5n, monkeypatch):
    """The input pass with a floor and coherence and the uint8 mirror's coherent idle check have kernels of their
    own: the warm-up calls them (the first real delta frame had paid ~13 ms for them at 224x128, and a probe of the
    delta network measured that frame as lost)."""
    from deluceva.delta import inputs

    if not inputs.HAVE_NUMBA:
        pytest.skip("numba is not installed: no kernels to load")
    calls: dict[str, int] = {}

    def counting(name: str):
        fn = getattr(inputs, name)

        def wrapped(*args):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args)

        monkeypatch.setattr(inputs, name, wrapped)

    for name in ("_input_delta_coherent_nb", "_coherent_change_nb", "_change_histogram_nb", "_mirror_update_nb"):
        counting(name)
    det, frames = yolov5n
    net = convert(det.network, frames[0], filter_pct=50.0)
    warm_up(net, tuple(frames[0].shape))
    assert calls.get("_input_delta_coherent_nb", 0) > 0
    assert net.config.input_floor == 0.0 and net.config.input_coherence == 0.0  # restored
    inputs.warm_up_mirror()
    assert all(calls.get(n, 0) > 0 for n in ("_coherent_change_nb", "_change_histogram_nb", "_mirror_update_nb"))
