"""Dense CRF refinement of localization maps (or of a mask) into pseudo masks: the ``crf`` refiner.

The model is the fully connected CRF of Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with
Gaussian Edge Potentials", NIPS 2011: a unary term per pixel plus a pairwise Potts term between *every* pair of
pixels, weighted by two Gaussian kernels -- an appearance (bilateral) kernel over position and RGB colour, which
pulls pixels of similar colour that are near each other to the same label, and a smoothness kernel over position
alone, which removes small isolated regions. Mean-field inference with high-dimensional filtering makes this linear
in the number of pixels. We use the authors' implementation through ``pydensecrf`` (PyPI: ``pydensecrf2``).

How weakly supervised segmentation uses it:

- DeepLab (Chen et al., 2015/2018) introduced it as a post-processing of network scores; its defaults (bilateral
  sxy 80, srgb 13, compat 10; Gaussian sxy 3, compat 3; 10 iterations) are ours too.
- PSA (Ahn & Kwak, CVPR 2018) and IRN (Ahn et al., CVPR 2019) run it on CAMs twice, with a *low* and a *high*
  background score, to get *confident* regions: foreground that survives a strong background is confidently
  foreground, background that survives a weak background is confidently background; the rest is left unlabelled
  for the next step to decide (see :func:`crf_pseudo_mask`).
- IRN refines a *label* map the same way (``crf_inference_label``): the unary gives probability ``gt_prob`` to the
  given label and spreads the rest over the image's other labels. That is what the ``crf`` refiner does when an
  earlier refiner gave a mask (``pseudo.refiners: [saliency, crf]``), see :func:`crf_refine_mask`.

As a refiner (:class:`DenseCrf`, ``pseudo.refiners: [crf]``) it takes maps or a mask and gives a mask; its kernels
are the top-level ``crf`` section (shared with ``seg.crf_postprocess`` and SEC's constrain loss), its own option is
``gt_prob`` (``pseudo.options.crf``). It runs in ``crf.workers`` processes over images.

Where we differ:

- The unary is ``-log softmax(maps / temperature)`` over the image's classes plus a constant background channel
  (``bg_threshold``), not PSA's ``(1 - max cam) ** alpha`` background nor IRN's padded-threshold arg-max; with the
  temperature the arg-max without CRF is exactly the threshold rule of :func:`wsss.pseudo.pseudo_mask`.
- Datasets without a background class (MSRC-21) get the CRF over the image's classes only.
- With confident regions, a pixel on which the two CRFs disagree in *any* way is ignored (255). IRN keeps the
  high-threshold foreground label even where the low-threshold CRF says background; that only happens where the
  CRF is not monotone in the background score, and we do not trust such pixels either.
- The image must be the original 8-bit RGB image. A mean-subtracted float image cast to ``uint8`` wraps around and
  silently corrupts the colour kernel (a classic bug in WSSS code); :func:`dense_crf` refuses anything but
  ``uint8`` so that the cast has to be made, and seen, by the caller.
- On a mask, ignore pixels get a uniform unary (the CRF does not trust them) and stay ignore afterwards; pixels an
  earlier refiner fixed (zero saliency) keep their label.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from wsss.config.schema import CrfConfig
from wsss.data.io import load_image
from wsss.data.spec import DatasetSpec
from wsss.errors import ConfigError, DataError
from wsss.pseudo import pseudo_mask
from wsss.refine.base import MAPS, MASK, REFINERS, Item, Refiner

log = logging.getLogger("wsss.refine")

#: probabilities are clipped to this before the log (as in pydensecrf.utils.unary_from_softmax)
PROB_CLIP = 1e-5


def check_crf_config(cfg: CrfConfig) -> None:
    """Raise :class:`ConfigError` naming the ``crf.*`` key of the first out-of-range value."""

    def bad(key: str, why: str, value: Any) -> ConfigError:
        return ConfigError(f"crf.{key}: {why}, got {value!r}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)

    for key in ("temperature", "gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
        v = getattr(cfg, key)
        if not (number(v) and v > 0):
            raise bad(key, "must be a number > 0", v)
    for key in ("gaussian_compat", "bilateral_compat"):
        v = getattr(cfg, key)
        if not (number(v) and v >= 0):
            raise bad(key, "must be a number >= 0", v)
    it = cfg.iterations
    if isinstance(it, bool) or not isinstance(it, int) or not 1 <= it <= 100:
        raise bad("iterations", "must be an integer in 1..100", it)
    w = cfg.workers
    if isinstance(w, bool) or not isinstance(w, int) or w < 0:
        raise bad("workers", "must be an integer >= 0 (0 = in the main process)", w)
    low, high = cfg.confident_bg_low, cfg.confident_bg_high
    if (low is None) != (high is None):
        missing = "confident_bg_low" if low is None else "confident_bg_high"
        raise ConfigError(f"crf.{missing}: crf.confident_bg_low and crf.confident_bg_high must both be set or both "
                          f"be null, got low={low!r}, high={high!r}")
    if low is not None:
        for key, v in (("confident_bg_low", low), ("confident_bg_high", high)):
            if not (number(v) and 0 < v < 1):
                raise bad(key, "must be a number in (0, 1)", v)
        if not low < high:
            raise ConfigError(f"crf.confident_bg_low: must be below crf.confident_bg_high, got low={low!r}, "
                              f"high={high!r}")


def dense_crf(image: np.ndarray, probs: np.ndarray, cfg: CrfConfig) -> np.ndarray:
    """Refine ``probs`` (C, H, W) on ``image`` (H, W, 3) **uint8 RGB**; returns (C, H, W) float32 marginals.

    Unary ``-log(clip(probs))``, then the Gaussian (``gaussian_sxy``, ``gaussian_compat``) and bilateral
    (``bilateral_sxy``, ``bilateral_srgb``, ``bilateral_compat``) Potts terms, ``iterations`` mean-field steps.
    Raises TypeError for an image that is not HxWx3 uint8 (pass the image as loaded, never a normalised tensor),
    ValueError for probabilities of the wrong shape.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        what = f"dtype {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise TypeError(f"dense_crf: image must be an HxWx3 uint8 RGB array (the image as loaded, not a normalised "
                        f"or mean-subtracted one), got {what}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise TypeError(f"dense_crf: image must be an HxWx3 uint8 RGB array, got shape {image.shape}")
    probs = np.asarray(probs)
    h, w = image.shape[:2]
    if probs.ndim != 3 or probs.shape[1:] != (h, w):
        raise ValueError(f"dense_crf: probabilities of shape {probs.shape} do not match the {h}x{w} image; "
                         f"expected (C, {h}, {w})")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"dense_crf: probabilities must be floats, got dtype {probs.dtype}")
    c = probs.shape[0]
    if c <= 1:
        return np.ones((c, h, w), np.float32)  # one label: nothing to refine

    import pydensecrf.densecrf as dcrf

    unary = -np.log(np.clip(probs, PROB_CLIP, 1.0)).reshape(c, -1)
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
    d.addPairwiseGaussian(sxy=float(cfg.gaussian_sxy), compat=float(cfg.gaussian_compat))
    d.addPairwiseBilateral(sxy=float(cfg.bilateral_sxy), srgb=float(cfg.bilateral_srgb),
                           rgbim=np.ascontiguousarray(image), compat=float(cfg.bilateral_compat))
    q = d.inference(int(cfg.iterations))
    return np.asarray(q, dtype=np.float32).reshape(c, h, w)


def maps_to_probs(
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    bg_threshold: float | None,
    temperature: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised ``maps`` (P, H, W) of mask classes ``classes`` (P,) -> (probs (C, H, W) float32, labels (C,)).

    ``probs`` is the softmax of ``scores / temperature`` over the channels; for a dataset with background the
    channels are a constant ``bg_threshold`` background score followed by the maps (C = P + 1), else the maps alone
    (C = P). ``labels`` holds the mask class index of each channel.
    """
    maps = np.asarray(maps, dtype=np.float32)
    classes = np.asarray(classes, dtype=np.int64)
    if maps.ndim != 3 or len(classes) != len(maps):
        raise ValueError(f"maps_to_probs: maps {maps.shape} and classes {classes.shape} do not match")
    if spec.background is not None:
        if bg_threshold is None:
            raise ValueError("a dataset with a background class needs a background threshold")
        scores = np.concatenate([np.full((1, *maps.shape[1:]), bg_threshold, np.float32), maps])
        labels = np.concatenate([[spec.background], classes]).astype(np.int64)
    else:
        scores, labels = maps, classes
    if len(scores) == 0:
        return scores.copy(), labels
    z = scores / np.float32(temperature)
    z -= z.max(0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(0, keepdims=True)).astype(np.float32), labels


def _crf_labels(image, maps, classes, spec, bg_threshold, cfg) -> np.ndarray:
    probs, labels = maps_to_probs(maps, classes, spec, bg_threshold, cfg.temperature)
    if len(labels) == 0:
        return np.full(image.shape[:2], spec.ignore_index, np.uint8)
    return labels[dense_crf(image, probs, cfg).argmax(0)].astype(np.uint8)


def crf_pseudo_mask(
    image: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    bg_threshold: float | None,
    cfg: CrfConfig,
    ignore_below: float | None = None,
) -> np.ndarray:
    """(H, W) uint8 pseudo mask: arg-max of the dense CRF of :func:`maps_to_probs` on ``image`` (HxWx3 uint8 RGB).

    Confident regions (dataset with background and ``cfg.confident_bg_low`` / ``confident_bg_high`` set; the
    PSA/IRN scheme): the CRF runs twice, with the background score at ``low`` and at ``high``.

    - A *low* background score lets foreground win easily: its foreground is large (over-grown), so its
      **background** is the confident background.
    - A *high* background score lets background win easily: its background is large, so its **foreground** is the
      confident foreground (foreground even though the background was strong).
    - A pixel keeps its label where the two results agree (both background: confident background; both the same
      class: confident foreground, which is then foreground in the high result). Everywhere else -- typically
      foreground at low but background at high, the uncertain rim of objects -- it is ignore (255).

    ``bg_threshold`` is then unused except by ``ignore_below``.

    ``ignore_below`` keeps the meaning it has in :func:`wsss.pseudo.pseudo_mask` on the *raw* maps: pixels that rule
    marks ignore are ignore here too (uncertain in the maps stays uncertain after the CRF).

    Without background: the CRF over the image's classes; an image without classes is all ignore.
    """
    h, w = image.shape[:2]
    if maps.shape[1:] != (h, w):
        raise ValueError(f"crf_pseudo_mask: maps of shape {maps.shape} do not match the {h}x{w} image")
    ignore = spec.ignore_index
    low, high = cfg.confident_bg_low, cfg.confident_bg_high
    if spec.background is not None and low is not None and high is not None:
        at_low = _crf_labels(image, maps, classes, spec, low, cfg)
        at_high = _crf_labels(image, maps, classes, spec, high, cfg)
        mask = np.where(at_low == at_high, at_high, ignore).astype(np.uint8)
    else:
        mask = _crf_labels(image, maps, classes, spec, bg_threshold, cfg)
    if ignore_below is not None:
        mask[pseudo_mask(maps, classes, spec, bg_threshold, ignore_below) == ignore] = ignore
    return mask


def crf_job(job: dict) -> np.ndarray:
    """Worker entry point: ``job`` holds ``image`` (a path), ``maps``, ``classes``, ``spec``, ``bg_threshold``,
    ``cfg`` and ``ignore_below``; returns the pseudo mask. The image is read here, in the worker."""
    image = load_image(job["image"])
    if image.shape[:2] != job["maps"].shape[1:]:
        raise DataError(f"{job['image']}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its maps are "
                        f"{job['maps'].shape[2]}x{job['maps'].shape[1]}; rerun `wsss maps`")
    return crf_pseudo_mask(image, job["maps"], job["classes"], job["spec"], job["bg_threshold"], job["cfg"],
                           job.get("ignore_below"))


def mask_probs(mask: np.ndarray, labels: np.ndarray, gt_prob: float, ignore_index: int) -> np.ndarray:
    """(C, H, W) float32 CRF unary probabilities of a ``mask`` over the channel ``labels`` (C,): ``gt_prob`` on the
    pixel's label, ``(1 - gt_prob) / (C - 1)`` on each other one; ignore pixels uniform (1 / C)."""
    c = len(labels)
    lut = np.full(256, -1, np.int64)
    lut[labels] = np.arange(c)
    channel = lut[mask]
    if ((channel < 0) & (mask != ignore_index)).any():
        bad = np.unique(mask[(channel < 0) & (mask != ignore_index)]).tolist()
        raise ValueError(f"mask_probs: mask values {bad} are not among the channel labels {labels.tolist()}")
    if c == 1:
        return np.ones((1, *mask.shape), np.float32)
    probs = np.full((c, *mask.shape), (1.0 - gt_prob) / (c - 1), np.float32)
    known = channel >= 0
    np.put_along_axis(probs, np.where(known, channel, 0)[None], np.float32(gt_prob), 0)
    probs[:, ~known] = 1.0 / c
    return probs


def crf_refine_mask(
    image: np.ndarray,
    mask: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    cfg: CrfConfig,
    gt_prob: float,
    fixed: np.ndarray | None = None,
) -> np.ndarray:
    """(H, W) uint8: the dense CRF of ``mask`` on ``image`` (HxWx3 uint8 RGB), over the background (if the dataset
    has one) and the image's ``classes``, with the unary of :func:`mask_probs`. Ignore pixels stay ignore; pixels
    where ``fixed`` is true keep their label."""
    bg = [] if spec.background is None else [spec.background]
    labels = np.unique(np.concatenate([bg, np.asarray(classes, np.int64)]).astype(np.int64))
    if len(labels) == 0:
        return mask.copy()
    probs = mask_probs(mask, labels, gt_prob, spec.ignore_index)
    out = labels[dense_crf(image, probs, cfg).argmax(0)].astype(np.uint8)
    out[mask == spec.ignore_index] = spec.ignore_index
    if fixed is not None:
        out[fixed] = mask[fixed]
    return out


@dataclass
class CrfOptions:
    #: when the CRF refines a mask (e.g. ``[saliency, crf]``): probability of the mask's label in the unary, the
    #: rest spread evenly over the image's other labels (IRN's gt_prob)
    gt_prob: float = 0.7

    def __post_init__(self):
        if not (np.isfinite(self.gt_prob) and 0 < self.gt_prob < 1):
            raise ConfigError(f"pseudo.options.crf.gt_prob: must be a number in (0, 1), got {self.gt_prob!r}")


@REFINERS.register("crf")
class DenseCrf(Refiner):
    name = "crf"
    Options = CrfOptions
    takes = (MAPS, MASK)
    gives = MASK
    sections = ("crf",)

    def check(self, ctx: Any) -> None:
        check_crf_config(self.cfg.crf)
        if self.cfg.crf.confident_bg_low is None:
            return
        if self.given == MASK:
            log.warning("pseudo: crf.confident_bg_low/high apply to the CRF of maps, not of a mask; ignored")
        elif ctx.spec.background is None:
            log.warning("pseudo: crf.confident_bg_low/high apply to datasets with a background class only; ignored")

    def workers(self) -> int:
        return self.cfg.crf.workers

    def key(self) -> dict:
        crf = {k: v for k, v in super().key()["crf"].items() if k != "workers"}  # workers cannot change a mask
        # gt_prob only shapes the unary of a mask
        return {"crf": crf, **({"options": {"gt_prob": self.options.gt_prob}} if self.given == MASK else {})}

    def refine(self, x: Item) -> Item:
        crf = self.cfg.crf
        if x.mask is None:
            mask = crf_pseudo_mask(x.image, x.maps, x.classes, x.spec, x.bg_threshold, crf, x.ignore_below)
        else:
            mask = crf_refine_mask(x.image, x.mask, x.classes, x.spec, crf, self.options.gt_prob, x.fixed)
        return x.replace(mask=mask)
