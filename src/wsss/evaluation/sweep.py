"""Threshold sweeps: many thresholds scored from one pass over the maps.

For a dataset with background the swept value is the background threshold; without background it is the
``ignore_below`` confidence threshold, reported with the fraction of labelled pixels that keep a label (coverage).
Each image's maps are read once; the confusion matrices of all thresholds are accumulated together.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from wsss.data.spec import DatasetSpec
from wsss.evaluation.metrics import confusion_matrix, segmentation_scores
from wsss.pseudo.masks import best_class, pseudo_mask, threshold_mask


class ThresholdSweep:
    def __init__(self, spec: DatasetSpec, thresholds: Sequence[float]):
        self.spec = spec
        self.thresholds = [float(t) for t in thresholds]
        n = spec.num_classes
        self.conf = np.zeros((len(self.thresholds), n, n), np.int64)
        self.labelled = np.zeros(len(self.thresholds), np.int64)
        self.total = 0

    def add(self, maps: np.ndarray, classes: np.ndarray, gt: np.ndarray) -> None:
        spec = self.spec
        valid = gt != spec.ignore_index
        self.total += int(valid.sum())
        # the arg-max over classes is the same for every threshold: once per image
        best = best_class(maps, classes) if len(classes) else None
        for i, t in enumerate(self.thresholds):
            bg, low = (t, None) if spec.background is not None else (None, t)
            if best is None:
                pred = pseudo_mask(maps, classes, spec, bg, low)
            else:
                pred = threshold_mask(*best, spec, bg, low)
            self.conf[i] += confusion_matrix(gt, pred, spec.num_classes, spec.ignore_index)
            self.labelled[i] += int((valid & (pred != spec.ignore_index)).sum())

    def results(self) -> list[dict]:
        out = []
        for i, t in enumerate(self.thresholds):
            s = segmentation_scores(self.conf[i], self.spec.classes)
            out.append({"threshold": t, "miou": s["miou"], "class_avg_acc": s["class_avg_acc"],
                        "coverage": round(100 * self.labelled[i] / max(self.total, 1), 2)})
        return out

    def best(self) -> dict:
        """The threshold of highest mIoU (only meaningful for the background threshold)."""
        res = self.results()
        return max(res, key=lambda r: -1 if r["miou"] is None else r["miou"])
