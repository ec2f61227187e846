"""YOLOX detectors from ONNX (Megvii export): pre-processing, the imported head-cut network, decoding.

Pre-processing (upstream, legacy=False): r = min(H/h, W/w), resize to (int(w*r), int(h*r)) with INTER_LINEAR,
paste at the top left of an HxW canvas of 114, BGR, float32 0..255, NCHW.
Network outputs (cut before the exporter's reshape): per level (1, 5+C, h, w) = [dx, dy, log w, log h] raw,
sigmoid(obj), sigmoid(cls) x C; largest map (stride 8) first.
Decode: xy = (dxy + grid) * stride, wh = exp(.) * stride, score = obj * cls of the best class; score > 0.3
(YOLOX demo), class-wise NMS IoU 0.45.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from deluceva.errors import ModelError
from deluceva.zoo.base import Detections, Detector, Geometry, canvas_tensor, head_rows
from deluceva.zoo.onnx_family import class_names, grid_xy, select_detections, static_input_hw
from deluceva.zoo.onnx_import import import_onnx
from deluceva.zoo.onnx_load import load_onnx

NATIVE_HW = (416, 416)
PAD_VALUE = 114


def yolox_fit(rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """uint8 (h, w, 3) RGB -> the resized uint8 RGB image (it goes at the top left) and its geometry. Resizing acts on
    each channel alone, so resizing RGB and then reversing the channels equals upstream's BGR resize."""
    h, w = rgb.shape[:2]
    H, W = input_hw
    r = min(H / h, W / w)
    nw, nh = int(w * r), int(h * r)
    img = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_LINEAR)
    return img, Geometry((h, w), (H, W), (nw / w, nh / h), (0.0, 0.0))


def yolox_letterbox(rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """uint8 (h, w, 3) RGB -> uint8 (H, W, 3) BGR canvas (image at the top left) and its geometry."""
    img, geo = yolox_fit(rgb, input_hw)
    canvas = np.full((*input_hw, 3), PAD_VALUE, np.uint8)
    canvas[: img.shape[0], : img.shape[1]] = img[..., ::-1]
    return canvas, geo


def yolox_rows(outputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Head maps -> the exporter's output rows (N, 5+C): levels in order, each flattened row-major (y, x)."""
    return np.concatenate([head_rows(o).cpu().numpy() for o in outputs], axis=0)


def yolox_decode(rows: np.ndarray, level_hw: list[tuple[int, int]], strides: list[float]) -> np.ndarray:
    """Raw rows (N, 5+C) -> rows with boxes (cx, cy, w, h) in input pixels; obj and cls unchanged."""
    grid = np.concatenate([grid_xy(h, w) for h, w in level_hw], axis=0)
    stride = np.concatenate([np.full((h * w, 1), s, np.float32) for (h, w), s in zip(level_hw, strides, strict=True)])
    if len(grid) != len(rows):
        raise ValueError(f"{len(rows)} rows but the levels {level_hw} have {len(grid)} cells")
    out = rows.astype(np.float32).copy()
    out[:, :2] = (rows[:, :2] + grid) * stride
    out[:, 2:4] = np.exp(rows[:, 2:4]) * stride
    return out


class YoloxDetector(Detector):
    """A YOLOX ONNX model: head-cut torch network + YOLOX pre/post-processing."""

    family = "yolox"
    conf_threshold = 0.3
    iou_threshold = 0.45
    input_scale = 1.0  # 0..255 float inputs

    def __init__(self, network: torch.nn.Module, class_names: list[str], native_hw: tuple[int, int], name: str):
        self.network = network
        self.class_names = class_names
        self.native_hw = native_hw
        self.name = name

    def fit(self, rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
        return yolox_fit(rgb, input_hw)

    def to_input(self, img: np.ndarray, geometry: Geometry) -> torch.Tensor:
        return canvas_tensor(img, geometry.input_hw, 0, 0, PAD_VALUE, bgr=True)

    def detections_from_rows(
        self, rows: np.ndarray, level_hw: list[tuple[int, int]], geometry: Geometry, conf: float | None = None
    ) -> Detections:
        """Raw exporter rows (N, 5+C) of the given levels -> detections in source pixels (conf: score threshold)."""
        strides = [geometry.input_hw[0] / h for h, _ in level_hw]
        dec = yolox_decode(rows, level_hw, strides)
        thr = self.conf_threshold if conf is None else conf
        return select_detections(dec[:, :4], dec[:, 4], dec[:, 5:], geometry, thr, self.iou_threshold)

    def postprocess(self, outputs: tuple[torch.Tensor, ...], geometry: Geometry) -> Detections:
        level_hw = [(int(o.shape[2]), int(o.shape[3])) for o in outputs]
        return self.detections_from_rows(yolox_rows(outputs), level_hw, geometry)


def load_yolox(path: str | Path, names_path: str | Path | None = None) -> YoloxDetector:
    """A YOLOX detector from an ONNX export; class names from `names_path`, the ONNX metadata, or class_<i>."""
    model = load_onnx(path)
    native = static_input_hw(model) or NATIVE_HW
    net = import_onnx(model, probe_hw=native, cut="heads", source_name=Path(path).name)
    channels = {s[1] for s in net.meta["output_shapes"]}
    if len(channels) != 1 or min(channels) < 6:
        raise ModelError(
            f"{Path(path).name}: head maps {net.meta['output_shapes']} do not look like YOLOX "
            "outputs (1, 5+classes, h, w)"
        )
    names = class_names(model, names_path, channels.pop() - 5, f"{Path(path).name} (YOLOX)")
    return YoloxDetector(net, names, native, Path(path).stem)
