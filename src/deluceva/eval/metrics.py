"""The project's error measures (DESIGN.md "Error and control").

Detection: AP@0.5 of predicted detections against REFERENCE detections (the dense model's output) taken as
ground truth. Per class, over a set of frames: predictions are matched greedily in descending score order
within their frame, each to the still-unmatched reference box of the same class with the highest IoU, if
that IoU >= 0.5 (COCO-style matching); AP is the VOC all-point interpolated area under the precision/recall
curve. Classes are averaged weighted by their number of reference boxes, so a class seen a handful of times
cannot swing the result.

Edge cases (documented choices):
- a class with reference boxes but no predictions has AP 0;
- a class with predictions but no reference boxes carries no weight (its AP is reported as 0.0 in the
  per-class breakdown, with n_ref = 0);
- no reference boxes at all: 1.0 if there are no predictions either (both agree that nothing is there),
  0.0 if there are any (everything predicted is wrong).

Classification: top-1 disagreement, the fraction of frames whose predicted label differs from the reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deluceva.zoo.base import Detections

IOU_THRESHOLD = 0.5


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box in a (N, 4) with every box in b (M, 4), both xyxy -> (N, M) float64.

    Degenerate (zero-area) pairs have IoU 0.
    """
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(axis=1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(axis=1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def match_frame(
    reference: Detections, predicted: Detections, iou_threshold: float = IOU_THRESHOLD
) -> np.ndarray:
    """True-positive flag (P,) bool per prediction of one frame (in the predictions' own order).

    Predictions are visited by descending score (stable); each takes the unmatched reference box of its class
    with the highest IoU, if that IoU >= iou_threshold.
    """
    n_pred = len(predicted)
    tp = np.zeros(n_pred, bool)
    if n_pred == 0 or len(reference) == 0:
        return tp
    iou = box_iou(predicted.boxes, reference.boxes)
    same = np.asarray(predicted.class_ids)[:, None] == np.asarray(reference.class_ids)[None, :]
    iou = np.where(same & (iou >= iou_threshold), iou, -1.0)
    candidates = np.flatnonzero((iou >= 0).any(axis=1))
    if candidates.size == 0:
        return tp
    order = candidates[np.argsort(-np.asarray(predicted.scores)[candidates], kind="stable")]
    taken = np.zeros(len(reference), bool)
    for i in order:  # greedy by score: inherently sequential, over this frame's matchable predictions only
        row = np.where(taken, -1.0, iou[i])
        j = int(row.argmax())
        if row[j] >= 0:
            tp[i] = True
            taken[j] = True
    return tp


def average_precision(scores: np.ndarray, tp: np.ndarray, n_ref: int) -> float:
    """VOC all-point interpolated AP of predictions with `scores` (K,) and true-positive flags `tp` (K,).

    Each true positive adds 1/n_ref recall at the interpolated precision (the best precision at that recall
    or beyond), so AP = sum of interpolated precision at the true positives / n_ref.
    """
    if n_ref == 0:
        return 0.0
    if len(scores) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = np.asarray(tp, bool)[order]
    ctp = np.cumsum(hits)
    precision = ctp / np.arange(1, len(hits) + 1)
    interp = np.maximum.accumulate(precision[::-1])[::-1]
    return float(interp[hits].sum() / n_ref)


@dataclass(frozen=True)
class ClassAP:
    """One class's result: reference boxes, predictions, true positives, AP@0.5 (0.0 when n_ref == 0)."""

    class_id: int
    n_ref: int
    n_pred: int
    n_tp: int
    ap: float


def per_class_ap50(
    reference: Sequence[Detections], predicted: Sequence[Detections], iou_threshold: float = IOU_THRESHOLD
) -> dict[int, ClassAP]:
    """AP per class over frames (reference[i] and predicted[i] are the same frame), keyed by class id, sorted.

    Contains every class present in either the reference or the predictions.
    """
    if len(reference) != len(predicted):
        raise ValueError(f"reference has {len(reference)} frames, predicted has {len(predicted)}")
    tp = [match_frame(r, p, iou_threshold) for r, p in zip(reference, predicted, strict=True)]
    empty_i = np.zeros(0, np.int64)
    ref_cls = np.concatenate([np.asarray(r.class_ids, np.int64) for r in reference] or [empty_i])
    pred_cls = np.concatenate([np.asarray(p.class_ids, np.int64) for p in predicted] or [empty_i])
    pred_scores = np.concatenate([np.asarray(p.scores, np.float64) for p in predicted] or [np.zeros(0)])
    pred_tp = np.concatenate(tp or [np.zeros(0, bool)])
    # concatenated in frame order; average_precision sorts stably, so equal scores rank by frame
    out: dict[int, ClassAP] = {}
    for c in np.union1d(ref_cls, pred_cls):
        sel = pred_cls == c
        n_ref = int((ref_cls == c).sum())
        ap = average_precision(pred_scores[sel], pred_tp[sel], n_ref)
        out[int(c)] = ClassAP(int(c), n_ref, int(sel.sum()), int(pred_tp[sel].sum()), ap)
    return out


def weighted_ap50(
    reference: Sequence[Detections], predicted: Sequence[Detections], iou_threshold: float = IOU_THRESHOLD
) -> float:
    """Mean over classes of AP@0.5, weighted by each class's number of reference boxes (see module doc for
    the edge cases). 1.0 when the predictions equal the reference."""
    classes = per_class_ap50(reference, predicted, iou_threshold)
    n_ref = sum(c.n_ref for c in classes.values())
    if n_ref == 0:
        return 0.0 if any(c.n_pred for c in classes.values()) else 1.0
    return float(sum(c.n_ref * c.ap for c in classes.values()) / n_ref)


def top1_disagreement(
    ref_labels: Sequence[int] | np.ndarray, pred_labels: Sequence[int] | np.ndarray
) -> float:
    """Fraction of frames whose predicted top-1 label differs from the reference's (0.0 for no frames)."""
    ref = np.asarray(ref_labels).reshape(-1)
    pred = np.asarray(pred_labels).reshape(-1)
    if ref.shape != pred.shape:
        raise ValueError(f"reference has {ref.size} labels, predicted has {pred.size}")
    return float((ref != pred).mean()) if ref.size else 0.0
