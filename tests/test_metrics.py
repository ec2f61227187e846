"""The detection error metric (weighted AP@0.5 against reference detections) and top-1 disagreement."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deluceva.eval.metrics import (
    average_precision,
    box_iou,
    match_frame,
    per_class_ap50,
    top1_disagreement,
    weighted_ap50,
)
from deluceva.zoo.base import Detections, nms_per_class

DATA = Path(__file__).parent / "data"


def det(*rows: tuple[float, float, float, float, float, int]) -> Detections:
    """Detections from (x1, y1, x2, y2, score, class_id) rows."""
    if not rows:
        return Detections()
    a = np.array(rows, np.float64)
    return Detections(a[:, :4].astype(np.float32), a[:, 4].astype(np.float32), a[:, 5].astype(np.int64))


def yolox_reference(threshold: float = 0.01) -> list[Detections]:
    """Real detections: YOLOX-Nano's shipped reference outputs on 20 car-detection.mp4 frames, decoded
    (grid + stride, score = obj * cls), thresholded and class-wise NMS'd. Boxes in 416x416 input pixels."""
    out = np.load(DATA / "yolox-nano-coco" / "reference_outputs.npz")["out/output"][:, 0]
    grids = []
    for stride in (8, 16, 32):
        n = 416 // stride
        yy, xx = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack([xx.ravel(), yy.ravel(), np.full(n * n, stride)], 1))
    g = np.concatenate(grids).astype(np.float32)
    frames = []
    for o in out:
        xy = (o[:, :2] + g[:, :2]) * g[:, 2:]
        wh = np.exp(o[:, 2:4]) * g[:, 2:]
        cls_scores = o[:, 4:5] * o[:, 5:]
        cls, score = cls_scores.argmax(1), cls_scores.max(1)
        keep = score > threshold
        boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
        k = nms_per_class(boxes, score[keep], cls[keep], 0.45)
        frames.append(Detections(boxes[k], score[keep][k], cls[keep][k].astype(np.int64)))
    return frames


def test_box_iou_values() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    b = np.array([[0, 0, 10, 5], [5, 0, 15, 10], [20, 20, 30, 30], [3, 3, 3, 8]], np.float32)
    iou = box_iou(a, b)
    assert iou.shape == (2, 4)
    np.testing.assert_allclose(iou[0], [0.5, 50 / 150, 0.0, 0.0])
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 4)


def test_identical_is_one_on_real_detections() -> None:
    ref = yolox_reference()
    assert sum(len(d) for d in ref) > 30 and len({int(c) for d in ref for c in d.class_ids}) > 5
    assert weighted_ap50(ref, ref) == pytest.approx(1.0)
    assert all(c.ap == pytest.approx(1.0) for c in per_class_ap50(ref, ref).values())


def test_dropped_box() -> None:
    ref = [
        det((0, 0, 10, 10, 0.9, 0), (20, 20, 30, 30, 0.8, 0)),
        det((0, 0, 10, 10, 0.7, 0), (50, 50, 70, 70, 0.6, 0)),
    ]
    pred = [ref[0], det((0, 0, 10, 10, 0.7, 0))]
    assert weighted_ap50(ref, pred) == pytest.approx(0.75)  # recall 3/4 at precision 1


def test_shifted_box_below_iou_threshold_is_a_miss_and_a_false_positive() -> None:
    ref = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.8, 0))]
    # shifted by half the width: IoU 1/3
    pred_low = [det((0, 0, 10, 10, 0.9, 0), (45, 40, 55, 50, 0.8, 0))]
    assert weighted_ap50(ref, pred_low) == pytest.approx(0.5)  # TP then FP: 1/2 recall at precision 1
    pred_high = [det((0, 0, 10, 10, 0.8, 0), (45, 40, 55, 50, 0.9, 0))]
    assert weighted_ap50(ref, pred_high) == pytest.approx(0.25)  # FP first: 1/2 recall at precision 1/2
    # exactly IoU 0.5 still matches
    pred_half = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 45, 0.8, 0))]
    assert weighted_ap50(ref, pred_half) == pytest.approx(1.0)


def test_extra_false_positive() -> None:
    ref = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.8, 0))]
    fp_low = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.8, 0), (100, 100, 120, 120, 0.3, 0))]
    assert weighted_ap50(ref, fp_low) == pytest.approx(1.0)  # ranked after every TP: costs nothing
    fp_high = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.8, 0), (100, 100, 120, 120, 0.95, 0))]
    assert weighted_ap50(ref, fp_high) == pytest.approx(2 / 3)  # precision 1/2, 2/3 -> interpolated 2/3
    duplicate = [det((0, 0, 10, 10, 0.95, 0), (0, 0, 10, 10.5, 0.9, 0), (40, 40, 50, 50, 0.8, 0))]
    # a second hit on one box is an FP: TP, FP, TP -> precision 1 and 2/3 at the TPs
    assert weighted_ap50(ref, duplicate) == pytest.approx((1 + 2 / 3) / 2)
    wrong_class = [det((0, 0, 10, 10, 0.9, 0), (40, 40, 50, 50, 0.8, 3))]
    assert weighted_ap50(ref, wrong_class) == pytest.approx(0.5)


def test_class_weighting_by_reference_counts() -> None:
    ref = [det(*[(10 * i, 0, 10 * i + 8, 8, 0.9, 0) for i in range(9)], (0, 50, 20, 70, 0.9, 1))]
    pred = [det(*[(10 * i, 0, 10 * i + 8, 8, 0.9, 0) for i in range(9)])]  # the single class-1 box is missed
    classes = per_class_ap50(ref, pred)
    assert classes[0].ap == pytest.approx(1.0) and classes[1].ap == 0.0
    assert (classes[0].n_ref, classes[1].n_ref, classes[0].n_tp, classes[1].n_pred) == (9, 1, 9, 0)
    assert weighted_ap50(ref, pred) == pytest.approx(0.9)  # an unweighted mean would say 0.5


def test_edge_cases() -> None:
    empty = [Detections(), Detections()]
    some = [Detections(), det((0, 0, 10, 10, 0.5, 2))]
    assert weighted_ap50(empty, empty) == 1.0
    assert weighted_ap50(empty, some) == 0.0
    assert weighted_ap50(some, empty) == 0.0
    assert weighted_ap50([], []) == 1.0
    # a class that exists only in the predictions carries no weight when references exist
    ref = [det((0, 0, 10, 10, 0.9, 0))]
    pred = [det((0, 0, 10, 10, 0.9, 0), (50, 50, 60, 60, 0.99, 7))]
    assert weighted_ap50(ref, pred) == pytest.approx(1.0)
    assert per_class_ap50(ref, pred)[7].n_ref == 0
    with pytest.raises(ValueError):
        weighted_ap50(ref, pred + pred)


def test_match_frame_greedy_by_score() -> None:
    ref = det((0, 0, 10, 10, 1, 0), (6, 0, 16, 10, 1, 0))
    # prediction 1 (higher score) overlaps both references, best with the second
    pred = det((7, 0, 17, 10, 0.5, 0), (5, 0, 15, 10, 0.9, 0))
    tp = match_frame(ref, pred)
    # pred 1 takes ref 1 (IoU 0.818 vs 0.333); pred 0 then has only ref 0 left (IoU 0.176): an FP
    assert tp.tolist() == [False, True]
    # COCO-style: a prediction whose best reference is taken falls back to the next one with IoU >= 0.5
    ref2 = det((0, 0, 10, 10, 1, 0), (2, 0, 12, 10, 1, 0))
    pred2 = det((2, 0, 12, 10, 0.9, 0), (1.5, 0, 11.5, 10, 0.5, 0))  # second: IoU 0.905 (taken), 0.739
    assert match_frame(ref2, pred2).tolist() == [True, True]


def test_average_precision_all_point_interpolation() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    tp = np.array([True, False, True, False, True])
    # precisions at TPs: 1, 2/3, 3/5; interpolated: 1, 2/3, 3/5; n_ref 4
    assert average_precision(scores, tp, 4) == pytest.approx((1 + 2 / 3 + 3 / 5) / 4)
    assert average_precision(scores, tp, 0) == 0.0


def test_degrades_monotonically_with_perturbation_on_real_detections() -> None:
    ref = yolox_reference()
    rng = np.random.default_rng(0)
    values = []
    for sigma in (0.0, 0.05, 0.15, 0.4):
        pred = []
        for d in ref:
            wh = (d.boxes[:, 2:] - d.boxes[:, :2]).repeat(2, axis=0).reshape(-1, 4)
            jitter = rng.normal(0, sigma, d.boxes.shape).astype(np.float32) * wh
            pred.append(Detections(d.boxes + jitter, d.scores, d.class_ids))
        values.append(weighted_ap50(ref, pred))
    assert values[0] == pytest.approx(1.0)
    assert values == sorted(values, reverse=True) and values[-1] < 0.6


def _coco_ap50_per_class(reference: list[Detections], predicted: list[Detections]) -> dict[int, float]:
    fce = pytest.importorskip("faster_coco_eval")
    images = [{"id": i + 1, "width": 416, "height": 416} for i in range(len(reference))]
    cats = sorted({int(c) for d in reference for c in d.class_ids})

    def anns(frames: list[Detections], with_score: bool) -> list[dict]:
        out = []
        for i, d in enumerate(frames):
            for b, s, c in zip(d.boxes, d.scores, d.class_ids, strict=True):
                x1, y1, x2, y2 = (float(v) for v in b)
                a = {"id": len(out) + 1, "image_id": i + 1, "category_id": int(c), "iscrowd": 0,
                     "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1)}
                if with_score:
                    a["score"] = float(s)
                out.append(a)
        return out

    categories = [{"id": c} for c in cats]
    gt = fce.COCO({"images": images, "categories": categories, "annotations": anns(reference, False)})
    dt = gt.loadRes(anns(predicted, True))
    ev = fce.COCOeval_faster(gt, dt, "bbox")
    ev.params.iouThrs = np.array([0.5])
    ev.params.maxDets = [1000]
    ev.params.areaRng = [[0, 1e10]]
    ev.params.areaRngLbl = ["all"]
    ev.evaluate()
    ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, 0]  # (recall thresholds, categories)
    return {c: float(np.where(prec[:, k] < 0, 0, prec[:, k]).mean()) for k, c in enumerate(ev.params.catIds)}


def test_agrees_with_faster_coco_eval_on_perturbed_real_detections() -> None:
    ref = yolox_reference(threshold=0.005)
    rng = np.random.default_rng(1)
    pred = []
    for d in ref:
        keep = rng.random(len(d)) > 0.2
        wh = np.tile(d.boxes[:, 2:] - d.boxes[:, :2], 2)
        boxes = d.boxes + rng.normal(0, 0.12, d.boxes.shape).astype(np.float32) * wh
        scores = np.clip(d.scores + rng.normal(0, 0.05, len(d)), 0.001, 1).astype(np.float32)
        fp = rng.uniform(0, 380, (2, 2)).astype(np.float32)
        fp_boxes = np.concatenate([fp, fp + 30], 1)
        fp_classes = d.class_ids[:2] if len(d) >= 2 else np.zeros(2, np.int64)
        pred.append(Detections(np.concatenate([boxes[keep], fp_boxes]),
                               np.concatenate([scores[keep], rng.uniform(0, 0.5, 2).astype(np.float32)]),
                               np.concatenate([d.class_ids[keep], fp_classes])))
    ours = per_class_ap50(ref, pred)
    coco = _coco_ap50_per_class(ref, pred)
    n = {c: ours[c].n_ref for c in coco}
    assert sum(n.values()) > 50
    ours_w = weighted_ap50(ref, pred)
    coco_w = sum(n[c] * coco[c] for c in coco) / sum(n.values())
    assert 0.2 < ours_w < 0.95
    assert ours_w == pytest.approx(coco_w, abs=0.02)
    for c in coco:  # 101-point vs all-point interpolation: loose per class
        assert ours[c].ap == pytest.approx(coco[c], abs=0.05 + 1.0 / max(1, n[c]) * 0.5), c


def test_top1_disagreement() -> None:
    assert top1_disagreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.25
    assert top1_disagreement(np.array([5, 5]), np.array([5, 5])) == 0.0
    assert top1_disagreement([], []) == 0.0
    with pytest.raises(ValueError):
        top1_disagreement([1, 2], [1])
