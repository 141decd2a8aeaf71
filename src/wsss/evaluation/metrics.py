"""Segmentation and classification metrics.

A split is scored with ONE confusion matrix accumulated over all its images (not a mean of per-image scores), the
ignore index excluded. From it: IoU, precision and recall per class, mIoU, pixel accuracy and class-average
accuracy (mean recall). A class that appears neither in the ground truth nor in the prediction of the split has an
undefined IoU (NaN) and is left out of the means.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) counts, rows = ground truth, columns = prediction. Pixels whose ground truth is
    ``ignore_index`` are skipped; predicted ``ignore_index`` (an unlabelled pseudo-mask pixel) counts nowhere."""
    gt = np.asarray(gt).ravel().astype(np.int64)
    pred = np.asarray(pred).ravel().astype(np.int64)
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth has {gt.size} pixels, prediction {pred.size}")
    keep = (gt != ignore_index) & (pred != ignore_index)
    bad = keep & ((gt >= num_classes) | (pred >= num_classes) | (gt < 0) | (pred < 0))
    if bad.any():
        raise ValueError(f"labels outside 0..{num_classes - 1}: {np.unique(np.concatenate([gt[bad], pred[bad]]))[:10]}")
    return np.bincount(gt[keep] * num_classes + pred[keep], minlength=num_classes**2).reshape(num_classes, num_classes)


def _nan_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b > 0, a / np.maximum(b, 1), np.nan)


def _num(x: float) -> float | None:
    return None if np.isnan(x) else round(float(x) * 100, 2)


def segmentation_scores(conf: np.ndarray, class_names: Sequence[str]) -> dict:
    """Scores in percent; per-class entries are None where undefined."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt_count = conf.sum(1)
    pred_count = conf.sum(0)
    iou = _nan_div(tp, gt_count + pred_count - tp)
    precision = _nan_div(tp, pred_count)
    recall = _nan_div(tp, gt_count)
    total = conf.sum()
    return {
        "miou": _num(np.nanmean(iou)) if not np.all(np.isnan(iou)) else None,
        "pixel_acc": _num(tp.sum() / total) if total else None,
        "class_avg_acc": _num(np.nanmean(recall)) if not np.all(np.isnan(recall)) else None,
        "per_class": {
            name: {"iou": _num(iou[i]), "precision": _num(precision[i]), "recall": _num(recall[i])}
            for i, name in enumerate(class_names)
        },
        "pixels": int(total),
    }


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per-class average precision (area under the precision-recall curve, step-wise, as in VOC >= 2010).
    ``scores``, ``targets``: (N, K). Classes without positives give NaN."""
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets) > 0
    out = np.full(scores.shape[1], np.nan)
    for k in range(scores.shape[1]):
        pos = targets[:, k].sum()
        if pos == 0:
            continue
        order = np.argsort(-scores[:, k], kind="stable")
        hit = targets[order, k]
        tp = np.cumsum(hit)
        precision = tp / np.arange(1, len(hit) + 1)
        out[k] = float((precision * hit).sum() / pos)
    return out
