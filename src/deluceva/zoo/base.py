"""What every zoo detector provides: a traceable network plus pre- and post-processing kept apart.

Only `network` is delta-converted; pre-processing (resize/letterbox) and post-processing (box decoding, NMS) run
densely around it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn

from deluceva.delta.kernels._jit import HAVE_NUMBA, jit
from deluceva.errors import DelucevaError


@dataclass(frozen=True)
class Geometry:
    """How a source frame was mapped onto the network input: input = source * scale + pad (per axis)."""

    source_hw: tuple[int, int]
    input_hw: tuple[int, int]
    scale_xy: tuple[float, float]
    pad_xy: tuple[float, float]

    def to_source(self, boxes_xyxy: np.ndarray) -> np.ndarray:
        """Map (K, 4) boxes from network-input pixels back to source pixels, clipped to the frame."""
        b = boxes_xyxy.astype(np.float32).copy()
        b[:, [0, 2]] = (b[:, [0, 2]] - self.pad_xy[0]) / self.scale_xy[0]
        b[:, [1, 3]] = (b[:, [1, 3]] - self.pad_xy[1]) / self.scale_xy[1]
        h, w = self.source_hw
        b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
        b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
        return b


@dataclass
class Detections:
    """Detections of one frame: boxes (K, 4) xyxy in source pixels, scores (K,), class_ids (K,) int."""

    boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.float32))
    scores: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.float32))
    class_ids: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))

    def __len__(self) -> int:
        return len(self.scores)

    def to_records(self, names: list[str]) -> list[dict]:
        """The DESIGN.md record per detection: {label, class_id, score, box: [x1, y1, x2, y2]}."""
        return [
            {
                "label": names[int(c)] if 0 <= int(c) < len(names) else str(int(c)),
                "class_id": int(c),
                "score": round(float(s), 5),
                "box": [round(float(v), 2) for v in b],
            }
            for b, s, c in zip(self.boxes, self.scores, self.class_ids, strict=True)
        ]

    @classmethod
    def from_records(cls, records: list[dict]) -> Detections:
        if not records:
            return cls()
        return cls(
            boxes=np.array([r["box"] for r in records], np.float32).reshape(-1, 4),
            scores=np.array([r["score"] for r in records], np.float32),
            class_ids=np.array([r["class_id"] for r in records], np.int64),
        )


def nms_per_class(
    boxes_xyxy: np.ndarray, scores: np.ndarray, class_ids: np.ndarray, iou: float, max_det: int = 300
) -> np.ndarray:
    """Indices kept by class-wise NMS (OpenCV's NMSBoxesBatched), best score first."""
    if len(scores) == 0:
        return np.zeros((0,), np.int64)
    xywh = boxes_xyxy.astype(np.float32).copy()
    xywh[:, 2:] -= xywh[:, :2]
    keep = cv2.dnn.NMSBoxesBatched(
        xywh.tolist(), scores.astype(np.float32).tolist(), class_ids.astype(np.int32).tolist(), 0.0, iou
    )
    keep = np.asarray(keep, np.int64).reshape(-1)
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return keep[:max_det]


def parse_imgsz(spec: str | int | tuple[int, int] | None, native_hw: tuple[int, int]) -> tuple[int, int] | str:
    """Parse --imgsz: None -> the model's native (H, W); N -> (N, N); 'WxH' -> (H, W); 'native' -> 'native'.

    Every size must be a multiple of 32.
    """
    if spec is None:
        return native_hw
    if isinstance(spec, tuple):
        hw = spec
    elif isinstance(spec, int):
        hw = (spec, spec)
    else:
        s = spec.strip().lower()
        if s == "native":
            return "native"
        try:
            if "x" in s:
                w, h = (int(v) for v in s.split("x"))
                hw = (h, w)
            else:
                hw = (int(s), int(s))
        except ValueError:
            raise DelucevaError(f"--imgsz must be N, WxH or 'native', got {spec!r}") from None
    if hw[0] <= 0 or hw[1] <= 0 or hw[0] % 32 or hw[1] % 32:
        raise DelucevaError(f"--imgsz {hw[1]}x{hw[0]} (WxH): both sides must be positive multiples of 32")
    return hw


def native_input_hw(source_hw: tuple[int, int]) -> tuple[int, int]:
    """'native' input size: the video's own size rounded up to a multiple of 32 (the frame is letterboxed in)."""
    return tuple(int(-(-v // 32) * 32) for v in source_hw)  # type: ignore[return-value]


@jit
def _canvas_nb(img, x, top, left, lut, bgr):  # pragma: no cover - compiled
    """x[c, top + i, left + j] = lut[img[i, j, c']] (c' = 2 - c when bgr), the rest lut[256] (the pad value), one
    pass over the canvas. lut (257,) float32: each grey level already divided as NumPy divides (bit-identical to
    dividing the canvas; a table, as float division kept the loop at 1.3 ms)."""
    _, big_h, big_w = x.shape
    h, w, _ = img.shape
    fill = lut[256]
    c0, c2 = (2, 0) if bgr else (0, 2)
    p0, p1, p2 = x[0], x[1], x[2]
    for i in range(big_h):
        r0, r1, r2 = p0[i], p1[i], p2[i]
        if i < top or i >= top + h:
            r0[:] = fill
            r1[:] = fill
            r2[:] = fill
            continue
        for j in range(left):
            r0[j] = r1[j] = r2[j] = fill
        for j in range(left + w, big_w):
            r0[j] = r1[j] = r2[j] = fill
        line = img[i - top]
        for j in range(w):
            r0[left + j] = lut[line[j, c0]]
            r1[left + j] = lut[line[j, 1]]
            r2[left + j] = lut[line[j, c2]]


def canvas_tensor(img: np.ndarray, input_hw: tuple[int, int], top: int, left: int, pad: int,
                  divisor: float | None = None, bgr: bool = False) -> torch.Tensor:
    """uint8 (h, w, 3) RGB image at (top, left) of a float32 (1, 3, H, W) canvas filled with `pad` grey levels,
    channels reversed when `bgr`, divided by `divisor` when given. Bit-identical to building the uint8 canvas and
    converting it (`torch.from_numpy(canvas).permute(2, 0, 1)[None].float() / divisor`), without its copies: one
    numba pass through a table of the 256 grey levels (0.7 ms at 768x448, allocation included; the NumPy copies
    and division took 1.1 ms).

    Built outside PyTorch (single-threaded): a handful of tiny PyTorch ops here would each wake PyTorch's OpenMP
    pool, whose workers then busy-wait on the cores ONNX Runtime's threads need (with 2 threads the dense engine's
    frames took up to 2x longer); and the other way round, ONNX Runtime's spinning workers made these ops take
    milliseconds."""
    H, W = input_hw
    h, w = img.shape[:2]
    x = np.empty((3, H, W), np.float32)
    if HAVE_NUMBA and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.strides[2] == 1:
        lut = np.append(np.arange(256, dtype=np.float32), np.float32(pad))
        if divisor is not None:
            np.divide(lut, np.float32(divisor), out=lut)
        _canvas_nb(img, x, top, left, lut, bool(bgr))
        return torch.from_numpy(x)[None]
    x[:, :top, :] = pad
    x[:, top + h:, :] = pad
    x[:, top:top + h, :left] = pad
    x[:, top:top + h, left + w:] = pad
    inner = x[:, top:top + h, left:left + w]
    planes = cv2.split(img)
    for c, plane in enumerate(planes[::-1] if bgr else planes):
        np.copyto(inner[c], plane, casting="unsafe")
    if divisor is not None:
        np.divide(x, np.float32(divisor), out=x)
    return torch.from_numpy(x)[None]


def head_rows(o: torch.Tensor) -> torch.Tensor:
    """A head map (1, C, h, w) as rows (h*w, C), row-major over (y, x): a view of a channels-last map (the delta
    network's outputs), a transposed copy of an NCHW one."""
    return o.detach()[0].permute(1, 2, 0).reshape(-1, o.shape[1])


class Detector:
    """A zoo or user detector. Subclasses (one per family) implement pre- and post-processing.

    network: an fx-traceable nn.Module, `network(x) -> tuple[Tensor, ...]` with x float32 (1, 3, H, W) for any H, W
    that are multiples of 32; the outputs are the raw head maps (1, C, h, w), decoded by `postprocess`.
    """

    name: str
    family: str
    class_names: list[str]
    native_hw: tuple[int, int]
    network: nn.Module
    license: str = ""
    conf_threshold: float = 0.25
    iou_threshold: float = 0.45
    input_scale: float = 1.0 / 255.0  # network input units per grey level (0..1 inputs: 1/255; 0..255 inputs: 1)

    def input_hw(self, imgsz: str | int | tuple[int, int] | None, source_hw: tuple[int, int]) -> tuple[int, int]:
        hw = parse_imgsz(imgsz, self.native_hw)
        return native_input_hw(source_hw) if hw == "native" else hw  # type: ignore[return-value]

    def preprocess(self, rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[torch.Tensor, Geometry]:
        """uint8 (H, W, 3) RGB frame -> float32 (1, 3, h, w) network input and its geometry."""
        fitted = self.fit(rgb, input_hw)
        if fitted is None:
            raise NotImplementedError
        return self.to_input(*fitted), fitted[1]

    def fit(self, rgb: np.ndarray, input_hw: tuple[int, int]) -> tuple[np.ndarray, Geometry] | None:
        """The first half of `preprocess`: the uint8 (h, w, 3) image the network input holds unchanged (resized,
        not padded, not converted), its top-left corner at (geometry.pad_xy[1], geometry.pad_xy[0]) of the input;
        None if the family does not split its pre-processing. `preprocess(rgb) == (to_input(*fit(rgb)), geometry)`.
        The delta engine compares these images in uint8 to find frames that change nothing (deluceva.delta.inputs
        .InputMirror) before it builds the float input."""
        return None

    def to_input(self, img: np.ndarray, geometry: Geometry) -> torch.Tensor:
        """The second half of `preprocess`: `fit`'s image -> the float32 (1, 3, H, W) network input."""
        raise NotImplementedError

    def postprocess(self, outputs: tuple[torch.Tensor, ...], geometry: Geometry) -> Detections:
        """Raw head maps -> detections in source-frame pixels (score threshold, class-wise NMS)."""
        raise NotImplementedError

    def __call__(self, rgb: np.ndarray, input_hw: tuple[int, int] | None = None) -> Detections:
        """Dense reference inference on one frame."""
        x, geo = self.preprocess(rgb, input_hw or self.native_hw)
        with torch.inference_mode():
            out = self.network(x)
        return self.postprocess(out, geo)
