"""YOLOv5 detectors from ONNX (Ultralytics export): letterbox, the imported head-cut network, anchor decoding.

Pre-processing (upstream letterbox, auto=False): r = min(H/h, W/w), resize to (round(w*r), round(h*r)) with
INTER_LINEAR, pad centred with 114 (top = round(dh/2 - 0.1), bottom = round(dh/2 + 0.1), same for left/right),
RGB, float32 / 255, NCHW.
Network outputs (the head convs, cut before the exporter's reshape): per level (1, A*(5+C), h, w), largest map
(stride 8) first. Decode: s = sigmoid(all), xy = (2 s - 0.5 + grid) * stride, wh = (2 s)^2 * anchor (pixels);
score = obj * cls of the best class, score > 0.25, class-wise NMS IoU 0.45. Anchors come from the ONNX file (the
exporter's anchor_grid constants) when present, else the standard P3-P5 anchors.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import torch
from onnx import numpy_helper

from deluceva.errors import ModelError
from deluceva.zoo.base import Detections, Detector, Geometry, canvas_tensor, head_rows
from deluceva.zoo.onnx_family import class_names, grid_xy, select_detections, static_input_hw
from deluceva.zoo.onnx_import import import_onnx
from deluceva.zoo.onnx_load import load_onnx

NATIVE_HW = (640, 640)
PAD_VALUE = 114
# Standard YOLOv5 P3/8, P4/16, P5/32 anchors in pixels (w, h).
DEFAULT_ANCHORS = np.array(
    [[[10, 13], [16, 30], [33, 23]], [[30, 61], [62, 45], [59, 119]], [[116, 90], [156, 198], [373, 326]]],
    np.float32,
)


def yolov5_fit(rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """uint8 (h, w, 3) RGB -> the resized uint8 RGB image and the geometry of its centred letterbox."""
    h, w = rgb.shape[:2]
    H, W = input_hw
    r = min(H / h, W / w)
    nw, nh = round(w * r), round(h * r)
    img = rgb if (nw, nh) == (w, h) else cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR)
    top, left = round((H - nh) / 2 - 0.1), round((W - nw) / 2 - 0.1)
    return np.ascontiguousarray(img), Geometry((h, w), (H, W), (nw / w, nh / h), (float(left), float(top)))


def yolov5_letterbox(rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
    """uint8 (h, w, 3) RGB -> uint8 (H, W, 3) RGB letterboxed (centred, pad 114) and its geometry."""
    img, geo = yolov5_fit(rgb, input_hw)
    (H, W), (nh, nw) = input_hw, img.shape[:2]
    left, top = int(geo.pad_xy[0]), int(geo.pad_xy[1])
    out = cv2.copyMakeBorder(img, top, H - nh - top, left, W - nw - left, cv2.BORDER_CONSTANT,
                             value=(PAD_VALUE,) * 3)
    return out, geo


def onnx_anchors(model: onnx.ModelProto, num_levels: int, num_anchors: int | None = None) -> np.ndarray | None:
    """The export's pixel anchors (levels, A, 2), smallest first, or None if the file has no anchor constants.

    Ultralytics exports hold one anchor_grid constant per level, (1, A, 1, 1, 2) (or (1, A, h, w, 2) repeated over
    the grid, or one (levels, 1, A, 1, 1, 2) tensor). Upstream keeps anchors in stride order, so sorting the levels by
    anchor area matches them to the head maps ordered by stride.
    """
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    arrays += [
        numpy_helper.to_array(a.t)
        for n in model.graph.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    levels: list[np.ndarray] = []
    for a in arrays:
        if a.dtype.kind != "f" or a.shape[-1:] != (2,) or (a <= 0).any():
            continue
        if a.ndim == 5 and a.shape[0] == 1 and np.allclose(a, a[:, :, :1, :1, :]):
            levels.append(a[0, :, 0, 0, :])
        elif a.ndim == 6 and a.shape[0] == num_levels and a.shape[1] == 1 and np.allclose(a, a[:, :, :, :1, :1, :]):
            levels.extend(a[i, 0, :, 0, 0, :] for i in range(num_levels))
    if num_anchors is not None:
        levels = [lv for lv in levels if len(lv) == num_anchors]
    if len(levels) != num_levels or len({len(lv) for lv in levels}) != 1:
        return None
    levels.sort(key=lambda lv: float((lv[:, 0] * lv[:, 1]).mean()))
    return np.stack(levels).astype(np.float32)


def _anchor_major(o: torch.Tensor, na: int) -> torch.Tensor:
    """A head map (1, A*(5+C), h, w) as a view (A, h*w, 5+C) (NCHW or channels-last maps alike: no copy)."""
    _, ch, h, w = o.shape
    if o.is_contiguous():
        return o.reshape(na, ch // na, h * w).permute(0, 2, 1)
    return head_rows(o).reshape(h * w, na, ch // na).permute(1, 0, 2)


def yolov5_decode(outputs: tuple[torch.Tensor, ...], input_hw: tuple[int, int], anchors: np.ndarray,
                  min_obj: float | None = None) -> np.ndarray:
    """Head maps -> the exporter's output rows (N, 5+C): [cx, cy, w, h] in input pixels, sigmoid obj, cls.

    Row order as the export: levels in order, then anchor, then y, then x. min_obj: keep only the rows whose
    objectness exceeds it (same values and order as the full decode's rows; a post-processing threshold on
    obj * cls cannot pass the others), decoding those alone (~10x less work at 768x448).
    """
    rows = []
    for o, anc in zip(outputs, anchors, strict=True):
        _, ch, h, w = o.shape
        na = len(anc)
        stride = np.float32(input_hw[0] / h)
        raw = _anchor_major(o.detach().float(), na)  # (A, HW, 5+C)
        if min_obj is None:
            s = torch.sigmoid(raw).cpu().numpy()  # (A, HW, 5+C)
            grid, anc_wh = grid_xy(h, w)[None], anc[:, None, :]
        else:
            a, p = (torch.sigmoid(raw[:, :, 4]) > min_obj).nonzero(as_tuple=True)  # row order: anchor, then pixel
            s = torch.sigmoid(raw[a, p]).cpu().numpy()  # (K, 5+C)
            grid, anc_wh = grid_xy(h, w)[p.numpy()], anc[a.numpy()]
        xy = (s[..., :2] * 2 - 0.5 + grid) * stride
        wh = (s[..., 2:4] * 2) ** 2 * anc_wh
        rows.append(np.concatenate([xy, wh, s[..., 4:]], axis=-1).reshape(-1, ch // na))
    return np.concatenate(rows, axis=0)


class Yolov5Detector(Detector):
    """A YOLOv5 ONNX model: head-cut torch network + YOLOv5 pre/post-processing."""

    family = "yolov5"
    conf_threshold = 0.25
    iou_threshold = 0.45

    def __init__(
        self,
        network: torch.nn.Module,
        class_names: list[str],
        native_hw: tuple[int, int],
        name: str,
        anchors: np.ndarray,
    ):
        self.network = network
        self.class_names = class_names
        self.native_hw = native_hw
        self.name = name
        self.anchors = anchors  # (levels, A, 2) pixels, in the order of the network's outputs

    def fit(self, rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry]:
        return yolov5_fit(rgb, input_hw)

    def to_input(self, img: np.ndarray, geometry: Geometry) -> torch.Tensor:
        top, left = int(geometry.pad_xy[1]), int(geometry.pad_xy[0])
        return canvas_tensor(img, geometry.input_hw, top, left, PAD_VALUE, 255.0)

    def decode(self, outputs: tuple[torch.Tensor, ...], input_hw: tuple[int, int], min_obj: float | None = None
               ) -> np.ndarray:
        """Head maps -> decoded rows (N, 5+C), as the full ONNX model outputs them (min_obj: see yolov5_decode)."""
        return yolov5_decode(outputs, input_hw, self.anchors, min_obj)

    def detections_from_rows(self, rows: np.ndarray, geometry: Geometry) -> Detections:
        """Decoded rows (N, 5+C) -> detections in source pixels."""
        return select_detections(
            rows[:, :4], rows[:, 4], rows[:, 5:], geometry, self.conf_threshold, self.iou_threshold
        )

    def postprocess(self, outputs: tuple[torch.Tensor, ...], geometry: Geometry) -> Detections:
        rows = self.decode(outputs, geometry.input_hw, min_obj=self.conf_threshold)
        return self.detections_from_rows(rows, geometry)


def load_yolov5(path: str | Path, names_path: str | Path | None = None) -> Yolov5Detector:
    """A YOLOv5 detector from an ONNX export; class names from `names_path`, the ONNX metadata, or class_<i>."""
    model = load_onnx(path)
    native = static_input_hw(model) or NATIVE_HW
    net = import_onnx(model, probe_hw=native, cut="heads", source_name=Path(path).name)
    shapes = net.meta["output_shapes"]
    channels = {s[1] for s in shapes}
    anchors = onnx_anchors(model, len(shapes))
    if anchors is None and len(shapes) == len(DEFAULT_ANCHORS):
        anchors = DEFAULT_ANCHORS
    if (
        anchors is None
        or len(channels) != 1
        or min(channels) % anchors.shape[1]
        or min(channels) // anchors.shape[1] < 6
    ):
        raise ModelError(
            f"{Path(path).name}: head maps {shapes} do not look like YOLOv5 outputs "
            "(1, anchors*(5+classes), h, w) at strides 8, 16, 32"
        )
    nc = min(channels) // anchors.shape[1] - 5
    names = class_names(model, names_path, nc, f"{Path(path).name} (YOLOv5)")
    return Yolov5Detector(net, names, native, Path(path).stem, anchors)
