"""The model zoo: shipped detectors by name, and user models by path (ONNX of a known family, or Darknet cfg)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deluceva.errors import ModelError
from deluceva.zoo.base import Detector

WEIGHTS = Path(__file__).parent / "weights"
# AGPL-3.0 models live outside the package, in the repository's models/ folder (see models/yolov5n-coco/LICENSE.md).
REPO_MODELS = Path(__file__).resolve().parents[3] / "models"
FAMILIES = ("yolox", "yolov5", "darknet")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    family: str
    path: Path
    native_hw: tuple[int, int]
    license: str
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("yolox-nano", "yolox", WEIGHTS / "yolox-nano-coco" / "yolox_nano.onnx", (416, 416),
                 "Apache-2.0", "YOLOX-Nano, COCO 80 classes, 0.91M params (default model)"),
        ZooEntry("yolo-fastest-xl", "darknet", WEIGHTS / "yolo-fastest-1.1-xl-coco" / "yolo-fastest-1.1-xl.cfg",
                 (320, 320), "public domain", "Yolo-Fastest 1.1 XL (Darknet), COCO 80 classes"),
        ZooEntry("yolov5n", "yolov5", REPO_MODELS / "yolov5n-coco" / "yolov5n.onnx", (640, 640),
                 "AGPL-3.0", "YOLOv5n, COCO 80 classes, regular convs"),
    ]
}
DEFAULT_MODEL = "yolox-nano"


def _names_beside(path: Path) -> Path | None:
    for cand in (path.parent / "coco.names", path.with_suffix(".names")):
        if cand.is_file():
            return cand
    return None


def _load_family(family: str, path: Path, names: Path | None) -> Detector:
    if family == "yolox":
        from deluceva.zoo.yolox import load_yolox

        return load_yolox(path, names)
    if family == "yolov5":
        from deluceva.zoo.yolov5 import load_yolov5

        return load_yolov5(path, names)
    if family == "darknet":
        from deluceva.zoo.darknet import load_darknet

        return load_darknet(path, names_path=names)
    raise ModelError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def load_model(spec: str | None = None, family: str | None = None, names: str | Path | None = None) -> Detector:
    """A detector from a zoo name or a path (.onnx with `family`, or a Darknet .cfg with its .weights beside it)."""
    spec = spec or DEFAULT_MODEL
    names_path = Path(names) if names else None
    if names_path is not None and not names_path.is_file():
        raise ModelError(f"names file not found: {names_path}")
    if spec in ZOO:
        entry = ZOO[spec]
        if not entry.path.is_file():
            raise ModelError(f"zoo model {spec!r} needs {entry.path}, which is missing (run from a full checkout)")
        det = _load_family(entry.family, entry.path, names_path or _names_beside(entry.path))
        det.name, det.license = entry.name, entry.license
        return det
    path = Path(spec)
    if not path.exists():
        raise ModelError(f"unknown model {spec!r}: not a zoo model ({', '.join(ZOO)}) and no such file")
    if not path.is_file():
        raise ModelError(f"model path {spec!r} is not a file")
    suffix = path.suffix.lower()
    if suffix == ".cfg":
        fam = family or "darknet"
    elif suffix == ".onnx":
        if family is None:
            raise ModelError(f"{path.name}: an ONNX model needs --family ({'|'.join(FAMILIES[:2])}) for its "
                             "pre- and post-processing")
        fam = family
    elif suffix == ".weights":
        raise ModelError(f"{path.name}: give the Darknet .cfg file (the .weights file is found beside it)")
    else:
        raise ModelError(f"{path.name}: unsupported model file type {suffix or '(none)'}; use .onnx or .cfg")
    det = _load_family(fam, path, names_path or _names_beside(path))
    det.name = path.stem
    return det
