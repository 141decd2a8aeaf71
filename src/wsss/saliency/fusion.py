"""Saliency-guided pseudo masks: saliency decides *where* the objects are, the localization maps decide *which*.

Oh, Benenson, Khoreva, Akata, Fritz & Schiele, "Exploiting saliency for object segmentation from image level
labels", CVPR 2017. CAMs find the most discriminative part of an object but not its extent; a class-agnostic
saliency map finds object extent but not the class. Fused:

- a pixel is **object** where its saliency is above ``threshold``, else **background**;
- an object pixel takes the class whose normalised map is highest there, among the image's classes (the arg-max
  of :func:`wsss.pseudo.masks.best_class`); an image with a single class gives every salient pixel that class;
- an image without any class is all background (its image-level label says there is no object);
- optional **ignore (255)** where a pixel is uncertain, so the segmentation network does not learn it:
  ``ignore_band`` -- saliency within that distance of the threshold (the fuzzy rim of salient regions);
  ``min_cam`` -- salient pixels whose best class score is below it (salient, but none of the image's classes
  claims them: a salient object of an unlabelled class, or a salient part of the background);
- **zero saliency is background** whatever the maps and the bands say.

Where we differ from Oh et al.: they combine class seeds with the saliency foreground inside a trained "guided
segmentation" system, with extra rules for seeds outside salient regions and salient regions without seeds; we use
the plain per-pixel rule above (saliency gates, maps label), which needs no further training and whose failure
modes the two ignore options expose. The threshold is chosen on the selection split (val) by
:class:`SaliencySweep`, never on the reported split.

With the dense CRF enabled, the fused mask is refined as IRN refines labels (``crf_inference_label``): the unary
gives probability ``gt_prob`` to the fused label and spreads the rest over the image's other labels; ignore pixels
get a uniform unary (the CRF does not trust them) and stay ignore afterwards, and zero-saliency pixels stay
background.

Only datasets with a background class can use this: "not salient" must map to a class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from wsss.config.schema import CrfConfig, SaliencyConfig
from wsss.data.io import load_image
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError, DataError
from wsss.evaluation.metrics import confusion_matrix, segmentation_scores
from wsss.pseudo.masks import best_class
from wsss.saliency.base import SaliencySource


def check_saliency_config(cfg: SaliencyConfig, spec: DatasetSpec) -> None:
    """Raise :class:`ConfigError` naming the key of the first unusable setting (the source's own options are checked
    when it is built)."""
    if spec.background is None:
        raise ConfigError(f"pseudo.method: saliency-guided pseudo masks need a dataset with a background class (non-"
                          f"salient pixels become background); dataset '{spec.name}' has none. Map classes to "
                          "background with data.to_background (as configs/msrc21-objects.yaml does), or use "
                          "pseudo.method: cam")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))

    if cfg.threshold is not None and not (number(cfg.threshold) and 0 <= cfg.threshold < 1):
        raise ConfigError(f"saliency.threshold: must be a number in [0, 1) or null (chosen on val), got {cfg.threshold!r}")
    if cfg.ignore_band is not None and not (number(cfg.ignore_band) and cfg.ignore_band >= 0):
        raise ConfigError(f"saliency.ignore_band: must be a number >= 0 or null, got {cfg.ignore_band!r}")
    if cfg.min_cam is not None and not (number(cfg.min_cam) and cfg.min_cam >= 0):
        raise ConfigError(f"saliency.min_cam: must be a number >= 0 or null, got {cfg.min_cam!r}")
    if not (number(cfg.crf_gt_prob) and 0 < cfg.crf_gt_prob < 1):
        raise ConfigError(f"saliency.crf_gt_prob: must be a number in (0, 1), got {cfg.crf_gt_prob!r}")


def fuse_best(
    saliency: np.ndarray,
    label: np.ndarray | None,
    score: np.ndarray | None,
    spec: DatasetSpec,
    threshold: float,
    ignore_band: float | None = None,
    min_cam: float | None = None,
) -> np.ndarray:
    """The fusion rule on :func:`~wsss.pseudo.masks.best_class`'s output (``label``, ``score`` are None for an image
    without classes), so a threshold sweep computes the arg-max once per image."""
    bg, ignore = spec.background, spec.ignore_index
    if bg is None:
        raise ConfigError(f"saliency fusion needs a dataset with a background class; '{spec.name}' has none")
    if label is None:
        return np.full(saliency.shape, bg, np.uint8)
    salient = saliency > threshold
    mask = np.where(salient, label, bg).astype(np.uint8)
    if min_cam is not None:
        mask[salient & (score < min_cam)] = ignore
    if ignore_band is not None:
        mask[np.abs(saliency - threshold) <= ignore_band] = ignore
    mask[saliency <= 0] = bg
    return mask


def fuse(
    saliency: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    threshold: float,
    ignore_band: float | None = None,
    min_cam: float | None = None,
) -> np.ndarray:
    """(H, W) uint8 pseudo mask from ``saliency`` (H, W) in [0, 1] and normalised ``maps`` (P, H, W) of the image's
    mask classes ``classes`` (P,); see the module docstring for the rule."""
    saliency = np.asarray(saliency)
    maps = np.asarray(maps)
    if saliency.ndim != 2 or maps.ndim != 3 or maps.shape[1:] != saliency.shape or len(classes) != len(maps):
        raise ValueError(f"fuse: saliency {saliency.shape}, maps {maps.shape} and classes {np.shape(classes)} do not "
                         "match; expected (H, W), (P, H, W) and (P,)")
    label, score = best_class(maps, np.asarray(classes)) if len(classes) else (None, None)
    return fuse_best(saliency, label, score, spec, threshold, ignore_band, min_cam)


def image_and_saliency(source: SaliencySource, sample: Any, hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Load ``sample``'s image, check it matches its maps' (H, W) ``hw``, and compute its saliency."""
    image = load_image(sample.image)
    if image.shape[:2] != tuple(hw):
        raise DataError(f"{sample.image}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its maps are "
                        f"{hw[1]}x{hw[0]}; rerun `wsss maps`")
    return image, source(image, sample)


class SaliencySweep:
    """Scores of the fusion at many saliency thresholds from one pass: per image the saliency and the class arg-max
    are computed once, then one confusion matrix per threshold is accumulated."""

    def __init__(self, spec: DatasetSpec, thresholds: Sequence[float], ignore_band: float | None = None,
                 min_cam: float | None = None):
        if spec.background is None:
            raise ConfigError(f"saliency fusion needs a dataset with a background class; '{spec.name}' has none")
        self.spec = spec
        self.thresholds = [float(t) for t in thresholds]
        self.ignore_band, self.min_cam = ignore_band, min_cam
        n = spec.num_classes
        self.conf = np.zeros((len(self.thresholds), n, n), np.int64)

    def add(self, saliency: np.ndarray, maps: np.ndarray, classes: np.ndarray, gt: np.ndarray) -> None:
        label, score = best_class(maps, classes) if len(classes) else (None, None)
        for i, t in enumerate(self.thresholds):
            pred = fuse_best(saliency, label, score, self.spec, t, self.ignore_band, self.min_cam)
            self.conf[i] += confusion_matrix(gt, pred, self.spec.num_classes, self.spec.ignore_index)

    def results(self) -> list[dict]:
        out = []
        for i, t in enumerate(self.thresholds):
            s = segmentation_scores(self.conf[i], self.spec.classes)
            out.append({"threshold": t, "miou": s["miou"], "class_avg_acc": s["class_avg_acc"]})
        return out

    def best(self) -> dict:
        """The threshold of highest mIoU (the first of equals)."""
        return max(self.results(), key=lambda r: -1 if r["miou"] is None else r["miou"])


def fused_probs(mask: np.ndarray, labels: np.ndarray, gt_prob: float, ignore_index: int) -> np.ndarray:
    """(C, H, W) float32 CRF unary probabilities of a fused ``mask`` over the channel ``labels`` (C,): ``gt_prob`` on
    the pixel's label, ``(1 - gt_prob) / (C - 1)`` on each other one; ignore pixels uniform (1 / C)."""
    c = len(labels)
    lut = np.full(256, -1, np.int64)
    lut[labels] = np.arange(c)
    channel = lut[mask]
    if ((channel < 0) & (mask != ignore_index)).any():
        bad = np.unique(mask[(channel < 0) & (mask != ignore_index)]).tolist()
        raise ValueError(f"fused_probs: mask values {bad} are not among the channel labels {labels.tolist()}")
    if c == 1:
        return np.ones((1, *mask.shape), np.float32)
    probs = np.full((c, *mask.shape), (1.0 - gt_prob) / (c - 1), np.float32)
    known = channel >= 0
    np.put_along_axis(probs, np.where(known, channel, 0)[None], np.float32(gt_prob), 0)
    probs[:, ~known] = 1.0 / c
    return probs


def fused_crf_job(job: dict) -> np.ndarray:
    """Worker entry point (module level, for spawn): the dense CRF of a fused mask. ``job`` holds ``image`` (HxWx3
    uint8), ``mask`` (the fused mask), ``classes`` (the image's mask classes), ``zero`` (bool, zero saliency),
    ``spec``, ``cfg`` (:class:`CrfConfig`) and ``gt_prob``."""
    from wsss.refine.crf import dense_crf

    spec: DatasetSpec = job["spec"]
    cfg: CrfConfig = job["cfg"]
    mask = job["mask"]
    labels = np.unique(np.concatenate([[spec.background], np.asarray(job["classes"], np.int64)]))
    probs = fused_probs(mask, labels, job["gt_prob"], spec.ignore_index)
    out = labels[dense_crf(job["image"], probs, cfg).argmax(0)].astype(np.uint8)
    out[mask == spec.ignore_index] = spec.ignore_index
    out[job["zero"]] = spec.background
    return out


def fused_mask_job(job: dict) -> np.ndarray:
    """Without the CRF the fused mask is the pseudo mask."""
    return job["mask"]
