"""Saliency-guided pseudo masks, the ``saliency`` refiner: saliency decides *where* the objects are, the
localization maps decide *which*.

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
modes the two ignore options expose. The threshold is chosen on the selection split (val) by a
:class:`~wsss.evaluation.ThresholdSweep` of the fusion, never on the reported split.

As a refiner (:class:`SaliencyFusion`, ``pseudo.refiners: [saliency]``) it takes maps and gives the fused mask; its
settings are the ``saliency`` section, its source one of :data:`wsss.saliency.SALIENCY_SOURCES`. A model source
(``onnx``, ``u2net``, ``u2netp``) computes every map the stage needs once, up front, and keeps it in the saliency
cache (:mod:`wsss.saliency.cache`), so a pseudo stage recomputed for another threshold or CRF setting, or another
run on the same images, does not run the model again. Followed by the
dense CRF (``[saliency, crf]``), the fused mask is refined as IRN refines labels
(:func:`wsss.refine.crf.crf_refine_mask`); zero-saliency pixels are handed on as fixed, so they stay background.

Only datasets with a background class can use this: "not salient" must map to a class.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np

from wsss.config.schema import SaliencyConfig
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError
from wsss.evaluation.sweep import ThresholdSweep
from wsss.pseudo.masks import best_class
from wsss.refine.base import MAPS, MASK, REFINERS, Item, Refiner, Selection
from wsss.saliency import SaliencySource, build_source, saliency_key


def check_saliency_config(cfg: SaliencyConfig, spec: DatasetSpec) -> None:
    """Raise :class:`ConfigError` naming the key of the first unusable setting (the source's own options are checked
    when it is built)."""
    if spec.background is None:
        raise ConfigError(f"pseudo.refiners: saliency-guided pseudo masks need a dataset with a background class "
                          f"(non-salient pixels become background); dataset '{spec.name}' has none. Map classes to "
                          "background with data.to_background (as configs/msrc21-objects.yaml does), or remove "
                          "saliency from pseudo.refiners")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and bool(np.isfinite(v))

    if cfg.threshold is not None and not (number(cfg.threshold) and 0 <= cfg.threshold < 1):
        raise ConfigError(f"saliency.threshold: must be a number in [0, 1) or null (chosen on val), got {cfg.threshold!r}")
    if cfg.ignore_band is not None and not (number(cfg.ignore_band) and cfg.ignore_band >= 0):
        raise ConfigError(f"saliency.ignore_band: must be a number >= 0 or null, got {cfg.ignore_band!r}")
    if cfg.min_cam is not None and not (number(cfg.min_cam) and cfg.min_cam >= 0):
        raise ConfigError(f"saliency.min_cam: must be a number >= 0 or null, got {cfg.min_cam!r}")


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


@REFINERS.register("saliency")
class SaliencyFusion(Refiner):
    name = "saliency"
    takes = (MAPS,)
    gives = MASK
    sections = ("saliency",)

    def __init__(self, options, cfg, given=MAPS):
        super().__init__(options, cfg, given)
        self.source: SaliencySource | None = None
        self.threshold: float | None = cfg.saliency.threshold
        self.choice: dict = {"saliency_chosen_on": "config"} if self.threshold is not None else {}

    def samples(self, ctx: Any) -> list:
        """Every image that will need a map: the pseudo split's, and the selection split's when the threshold is
        chosen there."""
        cfg = self.cfg
        roles = [cfg.pseudo.split] + ([cfg.eval.select_on] if cfg.saliency.threshold is None else [])
        splits = dict.fromkeys(map(ctx.split_name, roles))
        return [s for split in splits for s in ctx.reader.samples(split)]

    def check(self, ctx: Any) -> None:
        """Settings, the source (built: a model file that is missing and cannot be fetched, or does not fit, fails
        here) and every image that will need a map."""
        check_saliency_config(self.cfg.saliency, ctx.spec)
        build_source(self.cfg.saliency).check(self.samples(ctx))

    def prepare(self, ctx: Any, stages: Any) -> None:
        self.source = build_source(self.cfg.saliency)
        # a model source computes each image's map once, here, with a progress bar, and keeps it in the saliency
        # cache: the threshold sweep, the masks and later runs read it back
        self.source.precompute(self.samples(ctx), progress=self.cfg.runtime.progress)

    def chooses(self) -> str | None:
        return "saliency.threshold" if self.cfg.saliency.threshold is None else None

    def choose(self, selection: Selection) -> None:
        sal = self.cfg.saliency
        sweep = ThresholdSweep(selection.spec, selection.thresholds)
        for x, gt in selection:
            saliency = self.source(x.image, x.sample)
            # the arg-max over classes is the same for every threshold: once per image
            label, score = best_class(x.maps, x.classes) if len(x.classes) else (None, None)
            sweep.add_masks(gt, partial(fuse_best, saliency, label, score, x.spec, ignore_band=sal.ignore_band,
                                        min_cam=sal.min_cam))
        best = sweep.best()
        self.threshold = best["threshold"]
        self.choice = {"saliency_chosen_on": selection.split, "saliency_miou_on_selection_split": best["miou"]}

    def info(self) -> dict:
        return {"saliency_source": self.cfg.saliency.source, "saliency_threshold": self.threshold, **self.choice}

    def key(self) -> dict:
        return {"saliency": saliency_key(self.cfg.saliency)}

    def refine(self, x: Item) -> Item:
        sal = self.cfg.saliency
        saliency = self.source(x.image, x.sample)
        mask = fuse(saliency, x.maps, x.classes, x.spec, self.threshold, sal.ignore_band, sal.min_cam)
        return x.replace(mask=mask, fixed=saliency <= 0)
