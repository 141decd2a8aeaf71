"""Pseudo masks from localization maps.

- With a background class (VOC, COCO): the background gets a constant score ``bg_threshold`` and each pixel takes
  the arg-max over background and the image's classes (the CAM/IRN convention; maps are max-normalised so the
  threshold means "fraction of the class's peak").
- Without one (MSRC-21): arg-max over the image's classes only.
- ``ignore_below`` marks uncertain pixels 255 so the segmentation network does not learn them: without background,
  pixels whose winning score is below it; with background, background pixels whose best class score is in
  [ignore_below, bg_threshold) (not confidently background either).
"""

from __future__ import annotations

import numpy as np

from wsss.data.spec import DatasetSpec


def best_class(maps: np.ndarray, classes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the winning class (mask index) among the image's classes and its score. ``maps`` (P, H, W) with
    P >= 1. Computed once per image; every threshold rule below only compares ``score``."""
    best = maps.argmax(0)
    return classes[best], np.take_along_axis(maps, best[None], 0)[0]


def threshold_mask(
    label: np.ndarray,
    score: np.ndarray,
    spec: DatasetSpec,
    bg_threshold: float | None = None,
    ignore_below: float | None = None,
) -> np.ndarray:
    """The pseudo-mask rule applied to :func:`best_class`'s output (see the module docstring)."""
    ignore = spec.ignore_index
    if spec.background is not None:
        if bg_threshold is None:
            raise ValueError("a dataset with a background class needs a background threshold")
        mask = np.where(score > bg_threshold, label, spec.background).astype(np.uint8)
        if ignore_below is not None:
            mask[(score >= ignore_below) & (score <= bg_threshold)] = ignore
        return mask
    mask = label.astype(np.uint8)
    if ignore_below is not None:
        mask[score < ignore_below] = ignore
    return mask


def pseudo_mask(
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    bg_threshold: float | None = None,
    ignore_below: float | None = None,
) -> np.ndarray:
    """``maps`` (P, H, W) normalised scores of mask classes ``classes`` (P,) -> (H, W) uint8 mask."""
    h, w = maps.shape[1:]
    if spec.background is not None and bg_threshold is None:
        raise ValueError("a dataset with a background class needs a background threshold")
    if maps.shape[0] == 0:
        fill = spec.background if spec.background is not None else spec.ignore_index
        return np.full((h, w), fill, np.uint8)
    label, score = best_class(maps, classes)
    return threshold_mask(label, score, spec, bg_threshold, ignore_below)
