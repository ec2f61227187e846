"""The darknet YOLO family (Yolo-Fastest, yolov3-tiny, yolov4-tiny, ...): cfg + .weights as a Detector.

Pre-processing (darknet / cv2.dnn.blobFromImage without crop): plain bilinear resize of the RGB frame to the
input size (no letterbox, the aspect ratio may change), float32 / 255, NCHW. Post-processing: darknet's [yolo]
decode, score = objectness * sigmoid(class logit), score threshold, class-wise NMS, boxes to source pixels.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from deluceva.errors import ModelError
from deluceva.zoo.base import Detections, Detector, Geometry, head_rows, nms_per_class
from deluceva.zoo.darknet_cfg import parse_cfg
from deluceva.zoo.darknet_net import DarknetNetwork, YoloSpec, load_weights


def decode_head(
    out: torch.Tensor, head: YoloSpec, input_hw: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One raw head map (1, A*(5+C), h, w) -> boxes (h*w*A, 4) cxcywh in input pixels and scores (h*w*A, C).

    Rows are ordered (y, x, anchor), as cv2.dnn's yolo output. Darknet: cx = (x + s*sig(tx) - (s-1)/2) * W/w
    with s = scale_x_y, width = exp(tw) * anchor_w (anchors are network-input pixels), score = sig(obj) *
    sig(cls). With new_coords (the head conv already applied a logistic): width = 4 * tw^2 * anchor_w and no
    further sigmoid.
    """
    _, ch, h, w = out.shape
    a = len(head.anchors)
    t = head_rows(out).float().reshape(h, w, a, ch // a)  # (h, w, A, 5+C)
    anchors = torch.tensor(head.anchors, dtype=torch.float32)  # (A, 2)
    gy, gx = torch.meshgrid(
        torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij"
    )
    grid = torch.stack((gx, gy), -1)[:, :, None, :]  # (h, w, 1, 2)
    cell = torch.tensor([input_hw[1] / w, input_hw[0] / h])
    s = head.scale_x_y
    if head.new_coords:
        xy, wh = t[..., 0:2], 4.0 * t[..., 2:4] ** 2 * anchors
        obj, cls = t[..., 4:5], t[..., 5:]
    else:
        xy, wh = torch.sigmoid(t[..., 0:2]), torch.exp(t[..., 2:4]) * anchors
        obj, cls = torch.sigmoid(t[..., 4:5]), torch.sigmoid(t[..., 5:])
    cxcy = (grid + xy * s - (s - 1) / 2) * cell
    boxes = torch.cat((cxcy, wh), -1).reshape(-1, 4)
    scores = (obj * cls).reshape(-1, head.classes)
    return boxes.numpy(), scores.numpy()


def _read_names(path: Path | None, classes: int) -> list[str]:
    if path is None:
        return [f"class{i}" for i in range(classes)]
    if not path.is_file():
        raise ModelError(f"names file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != classes:
        raise ModelError(
            f"{path}: {len(names)} class names, but the cfg's [yolo] layers have {classes} classes"
        )
    return names


class YoloDarknet(Detector):
    """A darknet YOLO detector. `network` is a DarknetNetwork; `heads` its [yolo] specs in output order."""

    family = "darknet"

    def __init__(self, network: DarknetNetwork, class_names: list[str], name: str) -> None:
        self.network = network.eval()
        self.heads = network.heads
        self.class_names = class_names
        self.native_hw = network.native_hw
        self.name = name

    def fit(self, rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
        """uint8 (H, W, 3) RGB -> the plain-resized (cv2 INTER_LINEAR) uint8 image filling the input."""
        src_h, src_w = rgb.shape[:2]
        h, w = input_hw
        img = rgb if (src_h, src_w) == (h, w) else cv2.resize(rgb, (w, h), interpolation=cv2.INTER_LINEAR)
        return np.ascontiguousarray(img), Geometry((src_h, src_w), (h, w), (w / src_w, h / src_h), (0.0, 0.0))

    def to_input(self, img: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """/255 float32 (1, 3, h, w)."""
        return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)[None]

    def decode(
        self, outputs: tuple[torch.Tensor, ...], input_hw: tuple[int, int]
    ) -> tuple[np.ndarray, np.ndarray]:
        """All heads -> boxes (N, 4) cxcywh input pixels, per-class scores (N, C); heads in output order."""
        parts = [decode_head(o, head, input_hw) for o, head in zip(outputs, self.heads, strict=True)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def postprocess(self, outputs: tuple[torch.Tensor, ...], geometry: Geometry) -> Detections:
        """Raw head maps -> detections (every class above the threshold, as darknet), source-frame pixels."""
        boxes, scores = self.decode(outputs, geometry.input_hw)
        rows, cls = np.nonzero(scores > self.conf_threshold)
        if len(rows) == 0:
            return Detections()
        b = boxes[rows]
        xyxy = np.concatenate((b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2), 1)
        sc = scores[rows, cls]
        keep = nms_per_class(xyxy, sc, cls, self.iou_threshold)
        return Detections(
            geometry.to_source(xyxy[keep]), sc[keep].astype(np.float32), cls[keep].astype(np.int64)
        )


def load_darknet(
    cfg_path: str | Path, weights_path: str | Path | None = None, names_path: str | Path | None = None
) -> Detector:
    """A YoloDarknet from a cfg; weights default to the .weights beside it with the same stem.

    Names default to `coco.names` or `<stem>.names` beside the cfg when present, else class0, class1, ...
    """
    cfg_path = Path(cfg_path)
    sections = parse_cfg(cfg_path)
    weights = Path(weights_path) if weights_path is not None else cfg_path.with_suffix(".weights")
    if not weights.is_file():
        raise ModelError(f"darknet weights not found: {weights} (needed by {cfg_path.name})")
    network = DarknetNetwork(sections)
    load_weights(network, weights)
    classes = {h.classes for h in network.heads}
    if len(classes) != 1:
        raise ModelError(f"{cfg_path}: [yolo] layers disagree on the number of classes {sorted(classes)}")
    if names_path is None:
        names_path = next(
            (p for p in (cfg_path.with_suffix(".names"), cfg_path.parent / "coco.names") if p.is_file()), None
        )
    names = _read_names(Path(names_path) if names_path is not None else None, classes.pop())
    return YoloDarknet(network, names, cfg_path.stem)
