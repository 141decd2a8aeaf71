"""Adversarial Erasing (Wei et al., "Object Region Mining with Adversarial Erasing: A Simple Classification to Semantic
Segmentation Approach", CVPR 2017): several rounds, each a FRESH classifier trained on the training images with the
regions found by the earlier rounds erased, so that every round has to find new evidence of the object.

Round k (k >= 2) trains on images whose cumulative erase mask -- the union of what rounds 1..k-1 found, each round's
region mined on that round's own (already erased) inputs -- is filled with the dataset's mean colour in the original
image, before augmentation. The final localization map is the per-class max of the max-normalised maps of all
rounds. This module holds the method (per round: the plain CAM classifier and loss) and the array rules of the
recipe; the rounds themselves are stage outputs (:mod:`wsss.stages.train_cls` trains them and mines each round's
train-split maps, :mod:`wsss.stages.maps` builds the union maps of every split), so a killed run resumes at the round
and epoch where it stopped.

Where we differ from the paper, and why:

- The paper's classifier is a DeepLab-style VGG with CAM; ours is the wsss CAM classifier on the configured backbone,
  and each round's maps come from the shared localizer and multi-scale settings (``maps.*``), so any localizer works.
- The paper erases "the pixels with the top 20% of heatmap values" by a hard threshold on the heatmap; we read this as
  a threshold on the max-normalised map (``erase_threshold`` = 0.8: pixels above 80% of the class peak), which keeps
  the threshold's meaning equal to the rest of wsss (fractions of the class peak). The other reading (the 20% of
  pixels with the largest values) erases far more of a large object per round.
- Multi-label images (the paper's figures show one object) erase the union over all of the image's classes.
- The paper merges rounds as the union of the binary mined regions and takes background from a saliency model; we
  keep soft maps (per-class max) so that the pseudo-mask rule, the threshold sweep and the CRF apply unchanged.
  Its online prohibitive segmentation learning (PSL) is not implemented here.
- Over-erasing guard (not in the paper): an image whose cumulative erase covers more than ``max_erased_fraction`` of
  its pixels is dropped from that round's training, with a warning and listed by id in the round report. A
  classifier trained on (nearly) blank images with positive labels learns the fill colour or the dataset's
  co-occurrence statistics, not the object.
- Val/test images (no training) go through the same chain at map time: round 1 maps the original image, round k maps
  the image erased by rounds < k, with the classes of round 1 (``maps.labels=pred`` decides them on the unerased
  image: erasing deliberately removes evidence, so later rounds' scores are no presence test).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from wsss.errors import ConfigError
from wsss.methods.base import METHODS, Method


@dataclass
class AdversarialErasingOptions:
    #: classifiers trained in sequence; round k sees the regions of rounds < k erased (the paper uses 3)
    rounds: int = 3
    #: a pixel is erased where any of the image's max-normalised class maps is above this
    erase_threshold: float = 0.8
    #: an image whose cumulative erase covers more than this fraction of its pixels is dropped from that round
    max_erased_fraction: float = 0.9

    def __post_init__(self):
        if self.rounds < 1:
            raise ConfigError(f"method.options.rounds: must be at least 1, got {self.rounds}")
        if not 0.0 < self.erase_threshold < 1.0:
            raise ConfigError(f"method.options.erase_threshold: must be in (0, 1) (a fraction of each class map's "
                              f"peak), got {self.erase_threshold}")
        if not 0.0 < self.max_erased_fraction <= 1.0:
            raise ConfigError(f"method.options.max_erased_fraction: must be in (0, 1], got {self.max_erased_fraction}")


@METHODS.register("adv_erase")
class AdversarialErasing(Method):
    """Per round, the CAM baseline's model and loss; the rounds are run by the classifier and maps stages."""

    name = "adv_erase"
    Options = AdversarialErasingOptions

    @classmethod
    def check_config(cls, cfg) -> None:
        check_maps_config(cfg.maps)


def check_maps_config(maps_cfg) -> None:
    """Erase thresholds and the union compare maps across classes and rounds as fractions of each class's peak."""
    if maps_cfg.normalize != "max":
        raise ConfigError(f"method adv_erase needs maps.normalize=max (its erase_threshold and the union of rounds "
                          f"are fractions of each class map's peak), got maps.normalize={maps_cfg.normalize}")


def erase_region(maps: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) bool: pixels where any class map of ``maps`` (P, H, W) is above ``threshold`` (P = 0: nothing)."""
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], bool)
    return (maps > threshold).any(axis=0)


def union_maps(rounds: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-class max over rounds of ``(maps (P_r, H, W), classes (P_r,))``. A class missing from a round contributes
    nothing there (maps are >= 0). Returns float32 maps over the sorted union of classes."""
    if not rounds:
        raise ValueError("union_maps needs at least one round")
    h, w = rounds[0][0].shape[1:]
    classes = np.unique(np.concatenate([np.asarray(c, np.int64) for _, c in rounds]))
    out = np.zeros((len(classes), h, w), np.float32)
    for maps, cls in rounds:
        if maps.shape[1:] != (h, w):
            raise ValueError(f"round maps of different sizes: {maps.shape[1:]} vs {(h, w)}")
        rows = np.searchsorted(classes, np.asarray(cls, np.int64))
        np.maximum.at(out, rows, maps.astype(np.float32))
    return out, classes


def erase_summary(fractions: Mapping[str, float], max_erased_fraction: float) -> dict:
    """Erased area per image (fraction of its pixels) -> the round's report; ``dropped`` lists the over-erased ids."""
    values = np.array(list(fractions.values()), np.float64)
    dropped = sorted(i for i, f in fractions.items() if f > max_erased_fraction)
    return {
        "images": len(values),
        "fraction_mean": round(float(values.mean()), 4) if len(values) else 0.0,
        "fraction_max": round(float(values.max()), 4) if len(values) else 0.0,
        "max_erased_fraction": max_erased_fraction,
        "over_erased": len(dropped),
        "dropped": dropped,
    }


__all__ = ["AdversarialErasing", "AdversarialErasingOptions", "check_maps_config", "erase_region", "erase_summary",
           "union_maps"]
