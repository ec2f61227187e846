"""The fast pre-processing (resize straight into the float canvas) equals, bit for bit, building the uint8 letterbox
canvas and converting it, on real frames of every shipped video at several input sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deluceva.video import open_source
from deluceva.zoo.registry import load_model
from deluceva.zoo.yolov5 import yolov5_letterbox
from deluceva.zoo.yolox import yolox_letterbox

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ["one-by-one-person-detection.mp4", "car-detection.mp4", "vtest_pets09_s2l1.avi"]
SIZES = ["768x448", None, "native", "416x256"]


def _frames(video: str, n: int = 3):
    with open_source(str(ROOT / "assets/video" / video), max_frames=n) as src:
        return [f.rgb for f in src]


@pytest.mark.parametrize("model", ["yolov5n", "yolox-nano"])
def test_preprocess_matches_uint8_letterbox(model: str) -> None:
    det = load_model(model)
    checked = 0
    for video in VIDEOS:
        for rgb in _frames(video):
            for size in SIZES:
                hw = det.input_hw(size, rgb.shape[:2])
                x, geo = det.preprocess(rgb, hw)
                if model == "yolov5n":
                    canvas, geo_ref = yolov5_letterbox(rgb, hw)
                    ref = torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
                else:
                    canvas, geo_ref = yolox_letterbox(rgb, hw)
                    ref = torch.from_numpy(canvas).permute(2, 0, 1).unsqueeze(0).float()
                assert x.shape == (1, 3, *hw) and x.is_contiguous()
                assert torch.equal(x, ref), f"{model} {video} {size}"
                assert geo == geo_ref
                checked += 1
    assert checked == len(VIDEOS) * 3 * len(SIZES)
