"""Drawing detections on RGB frames with OpenCV (boxes and 'label score' tags)."""

from __future__ import annotations

import cv2
import numpy as np

from deluceva.zoo.base import Detections

_FONT = cv2.FONT_HERSHEY_SIMPLEX


def class_color(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread RGB colour per class id (golden-ratio hue walk)."""
    hue = int((class_id * 0.618033988749895 % 1.0) * 180)
    hsv = np.uint8([[[hue, 220, 255]]])
    r, g, b = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0]
    return int(r), int(g), int(b)


def as_records(detections: Detections | list[dict], names: list[str] | None = None) -> list[dict]:
    """Detections (or DESIGN.md records) as records {label, class_id, score, box}."""
    if isinstance(detections, Detections):
        return detections.to_records(names or [])
    return detections


def draw_detections(rgb: np.ndarray, records: list[dict], caption: str | None = None) -> np.ndarray:
    """A copy of uint8 (H, W, 3) `rgb` with each record's box and 'label score' drawn, plus an optional
    caption at the top left. Line width and text size scale with the frame height."""
    out = np.ascontiguousarray(rgb).copy()
    h = out.shape[0]
    thick = max(1, round(h / 360))
    scale = max(0.4, h / 900)
    for r in records:
        color = class_color(int(r.get("class_id", 0)))
        x1, y1, x2, y2 = (round(float(v)) for v in r["box"])
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick, cv2.LINE_AA)
        text = f"{r.get('label', r.get('class_id', ''))} {float(r.get('score', 0.0)):.2f}"
        (tw, th), base = cv2.getTextSize(text, _FONT, scale, thick)
        ty = y1 - th - base - 2 if y1 - th - base - 2 >= 0 else y1
        cv2.rectangle(out, (x1, ty), (x1 + tw + 4, ty + th + base + 2), color, cv2.FILLED)
        cv2.putText(out, text, (x1 + 2, ty + th + 1), _FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
    if caption:
        (tw, th), base = cv2.getTextSize(caption, _FONT, scale, thick)
        cv2.rectangle(out, (0, 0), (tw + 8, th + base + 8), (0, 0, 0), cv2.FILLED)
        cv2.putText(out, caption, (4, th + 4), _FONT, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return out
