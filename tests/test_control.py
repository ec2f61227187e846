"""Error control (deluceva.control): the PI controller's direction, speed and limits, the probe schedule and its
error measure, and the engine probing real frames: probe frames give the dense result, the percentage falls where
the delta output is wrong (busy pets video at 90%) and rises where it is right (a still scene)."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from deluceva.control import ErrorProbe, PIController
from deluceva.engine import Engine, EngineConfig
from deluceva.errors import DelucevaError
from deluceva.eval.metrics import weighted_ap50
from deluceva.video import open_source
from deluceva.zoo.base import Detections
from deluceva.zoo.registry import load_model

ROOT = Path(__file__).resolve().parents[1]
PETS = ROOT / "assets/video/vtest_pets09_s2l1.avi"
SIZE = "384x224"


def test_controller_cuts_fast_and_raises_slowly() -> None:
    c = PIController(0.05, start_pct=90.0)
    assert c.update(0.5) < 70.0  # 10x the target: a large cut at once (kept share 10% -> > 30%)
    low = c.pct
    ups = [c.update(0.0) for _ in range(3)]
    assert low < ups[0] < ups[1] < ups[2] < 90.0  # clean probes: up, step by step, not back at once
    c = PIController(0.05, start_pct=50.0)
    assert c.update(0.05) == pytest.approx(50.0)  # exactly on target: no move


def test_controller_limits_and_anti_windup() -> None:
    c = PIController(0.05, start_pct=90.0, pct_max=98.0)
    for _ in range(50):
        c.update(0.0)
    assert c.pct == pytest.approx(98.0)
    c.update(0.25)  # one bad probe after a long clean run acts at once: no integral wound up at the limit
    assert c.pct < 95.0
    c = PIController(0.05, start_pct=10.0)
    for _ in range(50):
        c.update(1.0)
    assert c.pct == 0.0
    assert c.update(0.0) > 0.0


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 2.0])
def test_controller_rejects_targets_outside_0_1(target: float) -> None:
    with pytest.raises(DelucevaError, match="error-target"):
        PIController(target)


def _dets(*boxes: tuple[float, float, float, float], score: float = 0.9) -> Detections:
    b = np.array(boxes, np.float32).reshape(-1, 4)
    return Detections(b, np.full(len(b), score, np.float32), np.zeros(len(b), np.int64))


def test_probe_schedule_and_windowed_error() -> None:
    p = ErrorProbe(every=3, window=2)
    seen = []
    for ran in ("refresh", "delta", "delta", "delta"):
        seen.append(p.due())
        p.tick(ran)
    assert seen == [False, False, False, True]  # the seed (frame 0), then frame 3 is probed
    hit, miss = _dets((0, 0, 10, 10)), _dets((50, 50, 60, 60))
    assert p.observe(hit, hit) == 0.0
    assert p.since == 0 and not p.due()
    e2 = p.observe(hit, miss)  # pooled over the last two probes: half the reference boxes found
    assert e2 == pytest.approx(1.0 - weighted_ap50([hit, hit], [hit, miss]))
    assert 0.0 < e2 < 1.0
    assert p.observe(hit, miss) == pytest.approx(1.0)  # the window dropped the first probe
    runs = [p.tick("dense") for _ in range(30)]
    assert [i for i, r in enumerate(runs) if r] == [14, 29]  # every 15th dense-engine frame (3 x patience 5)
    with pytest.raises(DelucevaError, match="probe-every"):
        ErrorProbe(every=1)


@cache
def _pets(n: int) -> tuple[object, list]:
    torch.set_num_threads(1)
    det = load_model("yolov5n")
    with open_source(str(PETS), max_frames=n) as src:
        return det, [f.rgb for f in src]


def _engine(det, pct: float, every: int = 5, target: float = 0.05) -> Engine:
    return Engine(det, EngineConfig(mode="delta", imgsz=SIZE, threads=1, plan="delta", filter_pct=pct,
                                    error_target=target, probe_every=every))


def test_engine_probes_busy_video_and_lowers_the_percentage() -> None:
    det, rgbs = _pets(21)
    eng = _engine(det, 90.0)
    dense = Engine(det, EngineConfig(mode="dense", imgsz=SIZE, threads=1))
    modes, pcts = [], []
    for i, rgb in enumerate(rgbs):
        pcts.append(eng.filter_pct)
        dets, mode = eng.infer(rgb)
        modes.append(mode)
        if mode == "refresh" and i:  # a probe: the frame's result is the dense one
            ref = dense.infer(rgb)[0]
            assert len(ref) == len(dets) and np.abs(np.sort(ref.scores) - np.sort(dets.scores)).max() < 1e-3
    dense_at = [i for i, m in enumerate(modes) if m == "refresh"]
    assert dense_at[:3] == [0, 5, 10]  # the seed, then a probe every 5th frame
    assert all(b - a <= 5 for a, b in zip(dense_at, dense_at[1:], strict=False)) and dense_at[-1] >= 15
    errors = eng._probe.errors
    assert len(errors) >= 3 and errors[0] > 0.05  # pedestrians walk: 90% delays them past the target
    assert pcts[6] < 90.0 and min(pcts) < pcts[6]  # cut after the first probe, and again after the second
    assert eng.last_probe["error"] == errors[-1]


def test_engine_raises_the_percentage_on_a_still_scene() -> None:
    det, rgbs = _pets(1)
    eng = _engine(det, 50.0, every=3)
    for _ in range(10):
        eng.infer(rgbs[0])
    assert eng._probe.errors == []  # a repeated frame is idle: nothing to probe
    still = [np.clip(rgbs[0].astype(np.int16) + d, 0, 255).astype(np.uint8) for d in (0, 16, 0, 16, 0, 16, 0, 16, 0)]
    for rgb in still:  # a flicker above the input floor and coherence: delta frames, each one exactly right
        eng.infer(rgb)
    assert eng._probe.errors and max(eng._probe.errors) <= 0.05
    assert eng.filter_pct > 50.0
