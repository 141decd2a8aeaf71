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


def pseudo_mask(
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    bg_threshold: float | None = None,
    ignore_below: float | None = None,
) -> np.ndarray:
    """``maps`` (P, H, W) normalised scores of mask classes ``classes`` (P,) -> (H, W) uint8 mask."""
    p, h, w = maps.shape
    ignore = spec.ignore_index
    if spec.background is not None:
        if bg_threshold is None:
            raise ValueError("a dataset with a background class needs a background threshold")
        if p == 0:
            return np.full((h, w), spec.background, np.uint8)
        best = maps.argmax(0)
        score = np.take_along_axis(maps, best[None], 0)[0]
        mask = np.where(score > bg_threshold, classes[best], spec.background).astype(np.uint8)
        if ignore_below is not None:
            mask[(score >= ignore_below) & (score <= bg_threshold)] = ignore
        return mask
    if p == 0:
        return np.full((h, w), ignore, np.uint8)
    best = maps.argmax(0)
    mask = classes[best].astype(np.uint8)
    if ignore_below is not None:
        score = np.take_along_axis(maps, best[None], 0)[0]
        mask[score < ignore_below] = ignore
    return mask
