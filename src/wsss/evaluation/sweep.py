"""Threshold sweeps: many thresholds scored from one pass over the maps.

For a dataset with background the swept value is the background threshold; without background it is the
``ignore_below`` confidence threshold, reported with the fraction of labelled pixels that keep a label (coverage).
Each image's maps are read once; the confusion matrices of all thresholds are accumulated together.

The same sweep scores any other thresholded rule (:meth:`ThresholdSweep.add_masks`): a refiner that chooses a
threshold on the selection split (the saliency threshold of :mod:`wsss.refine.saliency`) hands it a function of
the threshold, having computed what does not depend on it once per image.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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
        """One image scored by the pseudo-mask rule at every threshold."""
        spec = self.spec
        # the arg-max over classes is the same for every threshold: once per image
        best = best_class(maps, classes) if len(classes) else None

        def mask_at(t: float) -> np.ndarray:
            bg, low = (t, None) if spec.background is not None else (None, t)
            if best is None:
                return pseudo_mask(maps, classes, spec, bg, low)
            return threshold_mask(*best, spec, bg, low)

        self.add_masks(gt, mask_at)

    def add_masks(self, gt: np.ndarray, mask_at: Callable[[float], np.ndarray]) -> None:
        """One image scored at every threshold ``t``, its mask being ``mask_at(t)``."""
        spec = self.spec
        valid = gt != spec.ignore_index
        self.total += int(valid.sum())
        for i, t in enumerate(self.thresholds):
            pred = mask_at(t)
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
        """The threshold of highest mIoU, the first of equals (not meaningful for the confidence threshold, which
        trades coverage for precision)."""
        res = self.results()
        return max(res, key=lambda r: -1 if r["miou"] is None else r["miou"])
