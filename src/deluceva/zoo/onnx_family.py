"""What the ONNX detector families (YOLOX, YOLOv5) share: class names, input size, grids, score + NMS selection."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx

from deluceva.errors import ModelError
from deluceva.zoo.base import Detections, Geometry, nms_per_class


def read_names_file(path: str | Path) -> list[str]:
    """Class names, one per line (blank lines ignored)."""
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"names file not found: {p}")
    return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


def metadata_names(model: onnx.ModelProto) -> list[str] | None:
    """The `names` metadata property (a Python list or {index: name} dict literal, as Ultralytics writes it)."""
    for prop in model.metadata_props:
        if prop.key == "names":
            try:
                val = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return None
            if isinstance(val, dict):
                return [str(val[k]) for k in sorted(val)]
            if isinstance(val, list | tuple):
                return [str(v) for v in val]
    return None


def class_names(model: onnx.ModelProto, names_path: str | Path | None, num_classes: int, what: str) -> list[str]:
    """Names from the names file, else the ONNX metadata, else class_<i>; the count must match the model's."""
    if names_path is not None:
        names, src = read_names_file(names_path), str(names_path)
    else:
        names, src = metadata_names(model), "the ONNX metadata"
        if names is None:
            return [f"class_{i}" for i in range(num_classes)]
    if len(names) != num_classes:
        raise ModelError(
            f"{what} predicts {num_classes} classes but {src} lists {len(names)} names; "
            "give a matching names file (--names)"
        )
    return names


def static_input_hw(model: onnx.ModelProto) -> tuple[int, int] | None:
    """(H, W) of the image input if the ONNX file fixes them, else None."""
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims[2:]):
            return int(dims[2].dim_value), int(dims[3].dim_value)
    return None


def grid_xy(h: int, w: int) -> np.ndarray:
    """(h*w, 2) float32 cell coordinates (x, y), row-major (y outer, x inner)."""
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    return np.stack([xs.reshape(-1), ys.reshape(-1)], axis=1)


def cxcywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """(K, 4) centre/size boxes -> corners."""
    half = b[:, 2:4] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def select_detections(
    boxes_cxcywh: np.ndarray, obj: np.ndarray, cls: np.ndarray, geometry: Geometry, conf: float, iou: float
) -> Detections:
    """Best class per row, score = obj * cls, score > conf, class-wise NMS, boxes to source pixels.

    boxes_cxcywh (N, 4) in network-input pixels; obj (N,); cls (N, C) probabilities.
    """
    cand = obj > conf  # score <= obj: rows below the threshold cannot pass
    boxes, obj, cls = boxes_cxcywh[cand], obj[cand], cls[cand]
    cid = cls.argmax(axis=1) if len(cls) else np.zeros(0, np.int64)
    score = obj * cls[np.arange(len(cls)), cid] if len(cls) else np.zeros(0, np.float32)
    keep = score > conf
    xyxy, score, cid = cxcywh_to_xyxy(boxes[keep]), score[keep], cid[keep]
    idx = nms_per_class(xyxy, score, cid, iou)
    return Detections(
        boxes=geometry.to_source(xyxy[idx]).reshape(-1, 4),
        scores=score[idx].astype(np.float32),
        class_ids=cid[idx].astype(np.int64),
    )
