"""Exactness of the delta engine on the real zoo: at 0% filtering the delta network equals the dense network on
every one of 300 consecutive frames of each shipped video, for every zoo model at native size and at 768x448."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

from deluceva.convert import convert
from deluceva.video import open_source
from deluceva.zoo.registry import ZOO, load_model

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ["one-by-one-person-detection.mp4", "car-detection.mp4", "vtest_pets09_s2l1.avi"]
SIZES = ["native", "768x448"]
FRAMES = 300
REL_TOL = 1e-4


@cache
def _detector(name: str):
    torch.set_num_threads(2)
    return load_model(name)


def _boxes_equal(a, b) -> bool:
    if len(a) != len(b):
        return False
    return bool(np.array_equal(a.class_ids, b.class_ids) and np.allclose(a.boxes, b.boxes, atol=0.05)
                and np.allclose(a.scores, b.scores, atol=1e-4))


@pytest.mark.slow
@pytest.mark.parametrize("video", VIDEOS)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("model", list(ZOO))
def test_delta_equals_dense_on_300_frames(model: str, size: str, video: str) -> None:
    det = _detector(model)
    net = None
    worst = 0.0
    n = 0
    with open_source(str(ROOT / "assets/video" / video), max_frames=FRAMES) as src, torch.inference_mode():
        hw = det.input_hw(None if size == "native" else size, src.source_hw)
        for frame in src:
            x, geo = det.preprocess(frame.rgb, hw)
            if net is None:
                net = convert(det.network, x)
            dense = det.network(x)
            delta = net(x)
            for r, d in zip(dense, delta, strict=True):
                err = float((r - d).abs().max()) / max(float(r.abs().max()), 1e-6)
                worst = max(worst, err)
                assert err <= REL_TOL, f"frame {frame.index}: relative error {err:.2e}"
            assert _boxes_equal(det.postprocess(dense, geo), det.postprocess(delta, geo)), f"frame {frame.index}"
            n += 1
    assert n == FRAMES
    print(f"{model} {size} {video}: worst relative error {worst:.2e} over {n} frames")
