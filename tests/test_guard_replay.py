"""The frame guard replayed on recorded real traces (bench/results: YOLOv5n, 768x448, 1 thread, 0.01% + R 0.2,
every engine timed on every frame of the shipped videos), against the hindsight optimum of the same cost model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from deluceva.plan.guard import DeltaCost, FrameGuard
from deluceva.plan.replay import fresh_factor, hindsight_best, replay

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _trace(name: str, row: int = 0) -> dict:
    return json.loads((RESULTS / name).read_text())["rows"][row]["per_frame"]


def _guard(per_frame: dict) -> FrameGuard:
    """A guard as the engine makes it for this setting: the profile (made without floors) puts the 0.01% band on
    ONNX Runtime at ~4x its time, so the band is probed from the first frames with the profile's bump scaled."""
    ort = float(per_frame["ort"][0])
    guard = FrameGuard(DeltaCost(3.8 * ort, 7.5 * ort, 0.077, 0.96), ort_ms=ort, seed_ms=2.0 * ort, scale_bump=True)
    guard.enter_dense_band(probe=True, stay=0)
    return guard


def test_replay_counts_the_chosen_engines_times_with_the_fresh_state_discount():
    per_frame = {"ort": [40.0] * 4, "all-delta": [10.0, 10.0, 10.0, 80.0], "activity": [1.0, 0.0, 0.0, 0.5]}
    guard = FrameGuard(DeltaCost(10.0, 50.0, 0.01), ort_ms=40.0, seed_ms=80.0)
    out = replay(per_frame, guard)
    assert out.decisions[:3] == ["reseed", "delta", "delta"]
    expected = [10.0 * fresh_factor(1), 10.0 * fresh_factor(2)] + [{"ort": 40.0, "reseed": 80.0,
                                                                    "delta": 80.0 * fresh_factor(3)}[out.decisions[3]]]
    assert out.mean_ms == pytest.approx(sum(expected) / 3)
    # hindsight: delta, delta, then the dense engine on the busy frame
    assert hindsight_best(per_frame) == pytest.approx((10.0 * fresh_factor(1) + 10.0 * fresh_factor(2) + 40.0) / 3)
    with pytest.raises(ValueError, match="'ort' and 'all-delta'"):
        replay({"ort": [1.0], "all-delta": [1.0]}, guard)


def test_guard_on_the_recorded_person_video_returns_to_the_delta_network_when_its_frames_are_priced_cheap():
    """The whole person video (1394 frames): the guard of stop 21 spent 966 frames on ONNX Runtime, 1.13x recorded
    and 1.11x replayed; pricing each frame of a stay by the delta frames measured at about its activity ends the
    stays where the delta network costs 0.3-0.7x ONNX Runtime (the old calm level sat at the idle frames' ~0.001)."""
    per_frame = _trace("plan_yolov5n_768x448_t1_person_full_0.01_rf0.2.json")
    out = replay(per_frame, _guard(per_frame))
    ort_mean = float(np.mean(per_frame["ort"][1:]))
    assert out.speedup >= 1.14
    assert out.decisions.count("ort") < 900
    assert out.mean_ms >= hindsight_best(per_frame)  # the bound holds
    assert ort_mean / hindsight_best(per_frame) < 1.5


def test_guard_on_the_recorded_car_video_keeps_exposure_swings_on_the_dense_engine():
    """The car video (377 frames, sustained exposure swings where delta frames cost 3-8x ONNX Runtime): the guard
    never runs a swing frame on the delta network and stays within 2% of ONNX Runtime overall."""
    per_frame = _trace("plan_yolov5n_768x448_t1_car_pets_full_0.01_rf0.2.json")
    out = replay(per_frame, _guard(per_frame))
    assert out.speedup >= 0.98
    ort, delta = np.asarray(per_frame["ort"]), np.asarray(per_frame["all-delta"])
    swing_delta = [d for d, o, x in zip(out.decisions, ort, delta, strict=True) if x > 3.0 * o]
    assert swing_delta.count("delta") <= 2  # at most the first frame of a swing, before its activity is priced


def test_a_won_cycle_resets_the_back_off():
    guard = FrameGuard(DeltaCost(10.0, 50.0, 0.01), ort_ms=40.0, seed_ms=60.0)
    guard.backoff = 32  # after lost probes
    guard.observe("reseed", 60.0)
    for _ in range(5):
        assert guard.decide(0.005) == "delta"
        guard.observe("delta", 10.0)
    guard._to_ort(2)  # leaving after 60 + 5 x 10 = 110 ms for 6 frames, under 6 x 40
    assert guard.stay == 2 and guard.backoff == guard.min_stay


def test_early_returns_lost_in_a_row_wait_longer_each_time():
    """Calm gaps between exposure swings price cheap, yet re-seeding there loses (the car video): each early return
    lost in a row doubles the stay before the next one (8, 16, 32, 64 frames); a won cycle resets it."""
    from deluceva.plan.guard import PROBE_STAY

    guard = FrameGuard(DeltaCost(100.0, 200.0, 0.01), ort_ms=40.0, seed_ms=60.0)  # a profile made without floors
    guard.observe("reseed", 60.0)
    for _ in range(6):  # calm delta frames measured cheap
        guard._last_a = 0.01
        guard.observe("delta", 8.0)
    guard._to_ort(2)
    waits = []
    for _ in range(4):
        n = 0
        while (d := guard.decide(0.01)) == "ort":
            guard.observe("ort", 40.0)
            n += 1
        assert d == "reseed"
        waits.append(n + 1)
        guard.observe("reseed", 60.0)
        while (d := guard.decide(0.01)) == "delta":  # the probe measures the delta network at 2x the dense engine
            guard.observe("delta", 80.0)
        assert d == "ort"
        guard.observe("ort", 40.0)
    assert waits[1:] == [PROBE_STAY * 2, PROBE_STAY * 4, PROBE_STAY * 8]


def test_no_re_seed_lands_on_an_exposure_ramp_under_the_input_floor():
    """Car video, frames 60-80 (an exposure swing): at YOLOv5n's input floor at R 0.2 (13.5 grey levels) under 10%
    of the pixels change, yet 30-80% change by more than 3 levels; a re-seed there costs 2-3x the dense engine and
    its delta frames lose. The guard takes no re-seed on such a frame (wide share >= WIDE_SHARE) and takes it on the
    next calm one."""
    from deluceva.plan.guard import WIDE_LEVEL, WIDE_SHARE, change_shares
    from deluceva.video import open_source
    from deluceva.zoo.registry import load_model

    det = load_model("yolov5n")
    with open_source(str(RESULTS.parents[1] / "assets/video/car-detection.mp4"), max_frames=80) as src:
        hw = det.input_hw("768x448", src.source_hw)
        xs = [det.preprocess(f.rgb, hw)[0] for f in src if f.index >= 59]
    shares = [change_shares(x, p, (13.5 / 255, WIDE_LEVEL / 255)) for p, x in zip(xs, xs[1:], strict=False)]
    ramps = [(a, w) for a, w in shares if w >= WIDE_SHARE]
    assert len(ramps) >= 8 and all(a < 0.1 for a, _ in ramps)  # calm at the floor, a ramp under it

    def after_a_stay(a: float, wide: float | None) -> str:
        guard = FrameGuard(DeltaCost(10.0, 50.0, 0.01), ort_ms=40.0, seed_ms=80.0)
        guard._to_ort(2)
        for _ in range(2):
            assert guard.decide(a, wide) == "ort"
            guard.observe("ort", 40.0)
        return guard.decide(a, wide)

    a, wide = ramps[0]
    assert after_a_stay(a, wide) == "ort"
    assert after_a_stay(a, 0.1) == after_a_stay(a, None) == "reseed"


def test_the_input_mirror_reads_both_change_shares_off_one_histogram():
    from deluceva.delta.inputs import InputMirror

    rng = np.random.default_rng(0)
    img = rng.integers(20, 200, (64, 80, 3), dtype=np.uint8)
    mirror = InputMirror(0, 0, (64, 80))
    mirror.previous(img)
    assert mirror.change_shares((13.5, 3.0)) is None  # no frame compared yet
    moved = img.copy()
    moved[:32, :, 0] += 5  # half the pixels by 5 levels
    moved[:8, :, 1] += 30  # an eighth by 30
    mirror.typical_change(moved)
    assert mirror.change_shares((13.5, 3.0)) == pytest.approx([0.125, 0.5])
