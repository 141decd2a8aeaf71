"""Trivial baselines: what a segmentation score must beat before it says anything about a method.

Three predictors that never look at an image's pixels, scored on the same splits with the same confusion-matrix
scorer (:mod:`wsss.evaluation.metrics`) as the maps, the pseudo masks and the segmentation network:

``most_frequent``
    the training split's most frequent pixel class, everywhere.
``label_frequency``
    "image labels + class frequency": every pixel of an image gets the image's labelled class with the largest pixel
    share in the training masks (an image without labels: the most frequent class).
``spatial_prior``
    the label-conditioned spatial prior of DESIGN.md. Per class, the mean of its mask over the training images that
    hold it, each mask resized to a ``grid`` x ``grid`` grid (the class's share of each cell): where the class lies
    when it is in the image. Every pixel of an image gets the image's labelled class with the highest prior at its
    cell; where the dataset has a background class, background competes too. It learns where classes lie from the
    training *masks*: a reference for what location alone gives, not a WSSS result. (Averaged over all training
    images instead, a rare class would lose every pixel to common ones: 41.0 instead of 54.2 test mIoU on MSRC-21.)

``label_frequency`` and ``spatial_prior`` are given each image's ground-truth image-level labels, as the maps are
(``maps.labels=gt``); the segmentation network predicts without them, so against it they are generous references.

The training split's statistics are computed once (:func:`training_stats`); each scored split is then one pass
over its masks (:class:`BaselineScorer`), vectorised per image. Without training masks, the class frequency is the
number of training images labelled with each class (a background class counts as present in every image) and
there is no spatial prior.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from wsss.evaluation.metrics import segmentation_scores

#: side of the grid the spatial prior is computed on
PRIOR_GRID = 32
#: the baselines, in the order they are reported
BASELINES = ("most_frequent", "label_frequency", "spatial_prior")
#: short names, for tables and the terminal
LABELS = {"most_frequent": "most frequent class everywhere", "label_frequency": "image labels + class frequency",
          "spatial_prior": "spatial prior of the training masks"}
#: what each baseline is, in words (metrics.json and the report)
DESCRIPTIONS = {
    "most_frequent": "the most frequent training class everywhere",
    "label_frequency": "image labels + class frequency: the image's labelled class with the largest training pixel share",
    "spatial_prior": "label-conditioned spatial prior from the training masks (a reference, not a WSSS result)",
}


@dataclass(frozen=True)
class TrainingStats:
    """What the baselines learn from the training split."""

    #: (C,) pixel count per class over the training masks (or, without masks, images labelled with the class)
    frequency: np.ndarray
    #: "pixels" or "image labels": what ``frequency`` counts
    source: str
    #: (grid * grid, C) mean of each class's share of each cell over the training masks that hold the class; None
    #: without masks
    prior: np.ndarray | None
    grid: int
    #: training images counted (with masks, for "pixels")
    images: int

    @property
    def most_frequent(self) -> int:
        return int(np.argmax(self.frequency))

    def summary(self, class_names: Sequence[str]) -> dict:
        total = float(self.frequency.sum()) or 1.0
        return {"images": self.images, "frequency_from": self.source, "grid": self.grid if self.prior is not None else None,
                "most_frequent": class_names[self.most_frequent],
                "share": {n: round(100 * float(v) / total, 2) for n, v in zip(class_names, self.frequency)}}


@lru_cache(maxsize=64)
def _cells(h: int, w: int, grid: int) -> np.ndarray:
    """(h, w) index of the grid cell of every pixel (rows by height, columns by width)."""
    rows = (np.arange(h) * grid) // h
    cols = (np.arange(w) * grid) // w
    out = rows[:, None] * grid + cols[None, :]
    out.setflags(write=False)
    return out


def cell_shares(mask: np.ndarray, num_classes: int, ignore_index: int, grid: int = PRIOR_GRID) -> np.ndarray:
    """(grid * grid, C): the share of each class among the labelled pixels of each cell of ``mask`` resized to the
    grid (area average; a mask smaller than the grid is first enlarged by pixel repetition so that every cell holds
    pixels). A cell with no labelled pixel has share 0 for every class."""
    mask = np.asarray(mask)
    h, w = mask.shape
    if h < grid:
        mask = np.repeat(mask, -(-grid // h), axis=0)
    if w < grid:
        mask = np.repeat(mask, -(-grid // w), axis=1)
    cells = _cells(*mask.shape, grid)
    keep = mask != ignore_index
    counts = np.bincount(cells[keep] * num_classes + mask[keep].astype(np.int64),
                         minlength=grid * grid * num_classes).reshape(grid * grid, num_classes)
    return counts / np.maximum(counts.sum(1, keepdims=True), 1)


def training_stats(items: Iterable[tuple[np.ndarray | None, Sequence[int]]], num_classes: int, ignore_index: int,
                   background: int | None, grid: int = PRIOR_GRID) -> TrainingStats:
    """The statistics of the training split from its (mask or None, image labels) pairs, in one pass."""
    pixels = np.zeros(num_classes, np.int64)
    labelled = np.zeros(num_classes, np.int64)
    prior = np.zeros((grid * grid, num_classes), np.float64)
    holding = np.zeros(num_classes, np.int64)
    n_masks = n_images = 0
    for mask, labels in items:
        n_images += 1
        labelled[list(labels)] += 1
        if mask is None:
            continue
        m = np.asarray(mask)
        hist = np.bincount(m[m != ignore_index].astype(np.int64), minlength=num_classes)[:num_classes]
        pixels += hist
        holding += hist > 0
        prior += cell_shares(m, num_classes, ignore_index, grid)
        n_masks += 1
    if n_masks:
        return TrainingStats(pixels, "pixels", prior / np.maximum(holding, 1), grid, n_masks)
    if background is not None:
        labelled[background] = n_images
    return TrainingStats(labelled, "image labels", None, grid, n_images)


class BaselineScorer:
    """Confusion matrices of every baseline over one split: :meth:`add` each image's mask and labels, then
    :meth:`scores`."""

    def __init__(self, stats: TrainingStats, num_classes: int, ignore_index: int, background: int | None):
        self.stats = stats
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.background = background
        names = BASELINES if stats.prior is not None else BASELINES[:2]
        self.conf = {n: np.zeros((num_classes, num_classes), np.int64) for n in names}
        self.images = 0

    def label_frequency_class(self, labels: Sequence[int]) -> int:
        if not len(labels):
            return self.stats.most_frequent
        labels = sorted(labels)
        return int(labels[int(np.argmax(self.stats.frequency[labels]))])

    def prior_mask(self, hw: tuple[int, int], labels: Sequence[int]) -> np.ndarray:
        """The spatial-prior prediction of an image of size ``hw`` with ``labels`` (ties: the lower class index)."""
        cand = sorted(set(labels) | ({self.background} if self.background is not None else set()))
        if not cand:
            return np.full(hw, self.stats.most_frequent, np.uint8)
        cand = np.asarray(cand)
        table = np.asarray(self.stats.prior)[:, cand]  # (cells, k)
        winner = cand[np.argmax(table, axis=1)]  # the winning class of each cell
        return winner[_cells(hw[0], hw[1], self.stats.grid)].astype(np.uint8)

    def add(self, gt: np.ndarray, labels: Sequence[int]) -> None:
        gt = np.asarray(gt)
        keep = gt != self.ignore_index
        g = gt[keep].astype(np.int64)
        hist = np.bincount(g, minlength=self.num_classes)[: self.num_classes]
        # a prediction constant over the image puts the image's whole ground-truth histogram in one column
        self.conf["most_frequent"][:, self.stats.most_frequent] += hist
        self.conf["label_frequency"][:, self.label_frequency_class(labels)] += hist
        if "spatial_prior" in self.conf:
            pred = self.prior_mask(gt.shape, labels)[keep].astype(np.int64)
            n = self.num_classes
            self.conf["spatial_prior"] += np.bincount(g * n + pred, minlength=n * n).reshape(n, n)
        self.images += 1

    def scores(self, class_names: Sequence[str]) -> dict:
        """``{baseline: segmentation scores}`` plus ``best`` (the highest mIoU among the image-label baselines,
        :data:`TRIVIAL`) and ``images``."""
        out: dict = {n: segmentation_scores(c, class_names) for n, c in self.conf.items()}
        out["best"] = best_baseline(out)
        out["images"] = self.images
        return out


#: the baselines a WSSS score is held against: they use the image-level labels and class frequencies only. The
#: spatial prior learns locations from the training masks, so it is reported beside them as a reference.
TRIVIAL = ("most_frequent", "label_frequency")


def best_baseline(split_scores: dict, names: Sequence[str] = TRIVIAL) -> str | None:
    """The name of the baseline of ``names`` with the highest mIoU in ``split_scores`` (None when none is scored)."""
    scored = [(split_scores[n]["miou"], n) for n in names
              if isinstance(split_scores.get(n), dict) and split_scores[n].get("miou") is not None]
    return max(scored)[1] if scored else None


__all__ = ["BASELINES", "DESCRIPTIONS", "LABELS", "PRIOR_GRID", "TRIVIAL", "BaselineScorer", "TrainingStats", "best_baseline",
           "cell_shares", "training_stats"]
