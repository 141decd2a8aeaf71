"""Inter-pixel relations mined from the maps, and the training of an affinity network on them: what IRN
(:mod:`wsss.refine.irn`) and PSA (:mod:`wsss.refine.psa`) do before their random walk.

1. **Confident regions**, per image of the pseudo split, at image resolution (``labels/<id>.png`` in the refiner's
   stage folder, palette PNG, 255 = unknown):

   - *with a background class*: the dense CRF of the maps twice, with a **strong** and a **weak** background score
     (IRN: the constant scores ``conf_fg_threshold`` 0.30 and ``conf_bg_threshold`` 0.05; PSA: ``(1 - max_c map)^a``
     with ``a`` = ``alpha_low`` 4 and ``alpha_high`` 32). A strong background leaves only sure objects: the
     foreground of the strong CRF is confident foreground. A weak background leaves only sure background: where the
     weak CRF still says background (and the strong one agrees), confident background. Everything else is unknown.
   - *without one* (MSRC-21: every pixel is some class): no score says "nothing here", so confidence is relative. A
     pixel is confident where its best class leads the runner-up by ``margin`` **and** the dense CRF of the maps (the
     ``crf`` refiner's CRF, over the image's classes) keeps that class; an image with a single class is that class
     everywhere.

2. **Relation labels**: the pairs of pixels closer than ``label_radius`` at the feature stride
   (:func:`wsss.refine.random_walk.half_offsets`), on the labels of the training crop sampled to the network's grid:
   positive (1) where both pixels are confident and of one class -- *background pairs* and *foreground pairs*
   apart --, negative (0) where both are confident and differ, ignored where either is unknown or outside the crop.

3. **Loss** (both papers): ``-log a`` on positive pairs and ``-log(1 - a)`` on negative ones, each kind averaged on
   its own, ``loss = (mean_bg + mean_fg) / 4 + mean_neg / 2`` (PSA's bg/4 + fg/4 + neg/2; IRN's
   ``((bg + fg) / 2 + neg) / 2`` is the same).

4. **Training** through the shared loop (:func:`wsss.engine.train.fit`: checkpoints, resume, devices, bf16) as the
   cached stage the refiner declares (:meth:`wsss.refine.affinity.AffinityRefiner.stages`): the frozen backbone's
   features, a head trained on random crops (rescale, flip) of the images with their confident regions.

Where we differ:

- The CRF unary is that of :mod:`wsss.refine.crf` (softmax of the scores / ``crf.temperature``, the ``crf.*``
  kernels), not IRN's unary of the thresholded label (gt_prob 0.7, bilateral sxy 50 / srgb 5) nor PSA's scores taken
  as probabilities: one CRF implementation, tuned once.
- A pixel the strong CRF calls foreground and the weak one background is unknown (IRN keeps the foreground, PSA
  gives it background); it only happens where the CRF is not monotone in the background score.
- Without background: the margin rule is ours (both papers need a background class). Its default, 0.25, is the gap
  between IRN's two thresholds. The positive term is the foreground pairs' mean alone (there are no background
  pairs; the papers' formula would halve it).
- Training images are sampled to the network's grid by nearest neighbour (IRN: nearest; PSA: average-pooled CRF
  scores, then arg-max). PSA's colour jitter is not applied.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from wsss.data.datasets import SegmentationDataset
from wsss.data.io import load_image, load_mask, save_mask_png
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import TrainTransform
from wsss.engine import shard
from wsss.engine.train import LoopSettings, TrainTask, fit
from wsss.errors import DataError
from wsss.layout import CLS, MAPS
from wsss.localize import load_maps
from wsss.refine.base import refine_many
from wsss.refine.crf import dense_crf, maps_to_probs
from wsss.refine.random_walk import Offset, gather_offsets, half_offsets
from wsss.runs import Stage

log = logging.getLogger("wsss.refine")

#: added to affinities inside the logs (both papers)
EPS = 1e-5


# -- confident regions ---------------------------------------------------------------------------------------------


def crf_labels(image: np.ndarray, maps: np.ndarray, classes: np.ndarray, spec: DatasetSpec,
               bg_score: float | np.ndarray | None, crf_cfg: Any) -> np.ndarray:
    """(H, W) uint8: the arg-max of the dense CRF of ``maps`` with the background score ``bg_score`` (a number, or
    an (H, W) array of per-pixel scores; unused without a background class)."""
    probs, labels = maps_to_probs(maps, classes, spec, bg_score, crf_cfg.temperature)
    return labels[dense_crf(image, probs, crf_cfg).argmax(0)].astype(np.uint8)


def confident_regions(
    image: np.ndarray,
    maps: np.ndarray,
    classes: np.ndarray,
    spec: DatasetSpec,
    crf_cfg: Any,
    strong_bg: float | np.ndarray | None = None,
    weak_bg: float | np.ndarray | None = None,
    margin: float | None = None,
) -> np.ndarray:
    """(H, W) uint8 confident labels of one image (255 = unknown), see the module docstring. ``image``: HxWx3 uint8
    RGB; ``maps`` (P, H, W) normalised maps of the mask classes ``classes``. With a background class ``strong_bg``
    and ``weak_bg`` are the background scores of the two CRFs; without one ``margin`` is the lead of the best class
    over the runner-up."""
    h, w = image.shape[:2]
    maps = np.asarray(maps, np.float32)
    classes = np.asarray(classes, np.int64)
    if maps.shape[1:] != (h, w):
        raise ValueError(f"confident_regions: maps of shape {maps.shape} for a {h}x{w} image")
    unknown = spec.ignore_index
    if spec.background is not None:
        bg = spec.background
        if len(classes) == 0:  # no object in the image: all of it is background
            return np.full((h, w), bg, np.uint8)
        if strong_bg is None or weak_bg is None:
            raise ValueError("confident_regions: a dataset with a background class needs strong_bg and weak_bg")
        strong = crf_labels(image, maps, classes, spec, strong_bg, crf_cfg)
        weak = crf_labels(image, maps, classes, spec, weak_bg, crf_cfg)
        out = np.full((h, w), unknown, np.uint8)
        fg = (strong != bg) & (weak != bg)
        out[fg] = strong[fg]
        out[(strong == bg) & (weak == bg)] = bg
        return out
    if len(classes) == 0:
        return np.full((h, w), unknown, np.uint8)
    if len(classes) == 1:
        return np.full((h, w), classes[0], np.uint8)
    if margin is None:
        raise ValueError("confident_regions: a dataset without a background class needs a margin")
    top2 = np.partition(maps, -2, axis=0)[-2:]
    lead = top2[1] - top2[0]
    best = classes[maps.argmax(0)].astype(np.uint8)
    keep = (lead >= margin) & (crf_labels(image, maps, classes, spec, None, crf_cfg) == best)
    return np.where(keep, best, unknown).astype(np.uint8)


def confident_job(job: tuple) -> np.ndarray:
    """Worker entry point (module level, for spawn): ``(refiner, image path, maps, classes, spec)`` -> the image's
    confident regions by the refiner's rule. The image is read here, in the worker."""
    refiner, path, maps, classes, spec = job
    image = load_image(path)
    if image.shape[:2] != maps.shape[1:]:
        raise DataError(f"{path}: image is {image.shape[1]}x{image.shape[0]} (WxH) but its maps are "
                        f"{maps.shape[2]}x{maps.shape[1]}; rerun `wsss maps`")
    return refiner.confident_regions(image, maps, classes, spec)


def write_confident_regions(refiner: Any, samples: Sequence[Sample], maps_dir: Path, out_dir: Path,
                            spec: DatasetSpec, workers: int, progress: bool = True) -> int:
    """``out_dir/<id>.png`` for every sample (files already there are kept: a resumed stage); returns how many were
    computed. Under torchrun (:mod:`wsss.engine.shard`) rank 0 says what is left before any file is written, each
    process computes its share, and all return once every file is written."""
    from tqdm import tqdm

    todo = shard.undone(samples, lambda s: (out_dir / f"{s.id}.png").exists())
    mine = shard.shard(todo)
    jobs = ((refiner, s.image, m["maps"], m["classes"], spec)
            for s in mine for m in [load_maps(maps_dir / f"{s.id}.npz")])
    palette = spec.palette_bytes()
    results = refine_many(confident_job, jobs, workers)
    for s, labels in zip(mine, tqdm(results, total=len(mine), desc=f"{refiner.name}: confident regions", leave=False,
                                    disable=not progress, mininterval=1.0), strict=True):
        save_mask_png(out_dir / f"{s.id}.png", labels, palette)
    shard.barrier()  # every process's files are written before region_stats and the training read them
    return len(todo)


def region_stats(samples: Sequence[Sample], labels_dir: Path, spec: DatasetSpec, reader: Any) -> dict:
    """How much of the images the confident regions cover, and, where there is ground truth, how often they are
    right (pixel accuracy of the confident pixels that have a ground-truth label)."""
    total = confident = checked = right = 0
    for s in samples:
        labels = load_mask(labels_dir / f"{s.id}.png", spec.num_classes, spec.ignore_index)
        known = labels != spec.ignore_index
        total += labels.size
        confident += int(known.sum())
        if s.mask is not None:
            gt = reader.load_mask(s, labels.shape)
            valid = known & (gt != spec.ignore_index)
            checked += int(valid.sum())
            right += int((valid & (gt == labels)).sum())
    out = {"confident_fraction": round(confident / max(total, 1), 4)}
    if checked:
        out["confident_accuracy"] = round(100 * right / checked, 2)
    return out


# -- relation labels and loss --------------------------------------------------------------------------------------


def relation_labels(labels: torch.Tensor, offsets: Sequence[Offset], ignore_index: int,
                    background: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels of ``labels`` ``(..., h, w)`` (class indices, ``ignore_index`` = unknown) for the pairs
    ``(y, x) -> (y + dy, x + dx)`` of ``offsets``: ``(background pairs, foreground pairs, negative pairs)``, each a
    ``(..., K, h, w)`` bool. A pair leaving the image, or touching an unknown pixel, is in none of them."""
    other = gather_offsets(labels, offsets, ignore_index)
    src = labels.unsqueeze(-3)
    known = (src != ignore_index) & (other != ignore_index)
    same = known & (src == other)
    bg = same & (src == background) if background is not None else torch.zeros_like(same)
    return bg, same & ~bg, known & (src != other)


def relation_loss(affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor,
                  background: bool) -> tuple[torch.Tensor, dict[str, float]]:
    """The papers' balanced loss of pair affinities ``affinity`` in [0, 1] (same shape as the label masks); without a
    background class the positive term is the foreground pairs' mean alone."""
    a = affinity.float()

    def mean(nll: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return (nll * m).sum() / (m.sum() + EPS)

    pos_nll = -torch.log(a + EPS)
    bg = mean(pos_nll, bg_pos)
    fg = mean(pos_nll, fg_pos)
    ng = mean(-torch.log(1.0 + EPS - a), neg)
    pos = (bg + fg) / 2 if background else fg
    loss = (pos + ng) / 2
    return loss, {"bg_pos": float(bg.detach()), "fg_pos": float(fg.detach()), "neg": float(ng.detach())}


# -- training --------------------------------------------------------------------------------------------------------


class RegionFiles:
    """The confident regions written by :func:`write_confident_regions`, as the masks of a training dataset."""

    def __init__(self, folder: Path, num_classes: int, ignore_index: int):
        self.folder, self.num_classes, self.ignore_index = Path(folder), num_classes, ignore_index

    def __call__(self, s: Sample, hw) -> np.ndarray:
        return load_mask(self.folder / f"{s.id}.png", self.num_classes, self.ignore_index, hw)


class AffinityTask(TrainTask):
    """An affinity refiner's network on random crops of the images and their confident regions."""

    def __init__(self, refiner: Any, samples: list[Sample], spec: DatasetSpec, regions_dir: Path,
                 classifier: Path | None):
        t = refiner.options.train
        super().__init__(refiner.cfg, LoopSettings(t.epochs, t.batch_size, t.lr, t.head_lr_mult, t.momentum,
                                                   t.weight_decay, t.poly_power), refiner.meta(spec))
        self.name = f"{refiner.name} affinity"
        self.refiner, self.samples, self.spec = refiner, samples, spec
        self.regions = RegionFiles(regions_dir, spec.num_classes, spec.ignore_index)
        self.classifier = classifier
        self.offsets = half_offsets(refiner.options.label_radius)

    def build_model(self):
        return self.refiner.build_net(self.spec, self.classifier)

    def dataset(self):
        t = self.refiner.options.train
        return SegmentationDataset(self.samples, self.regions,
                                   TrainTransform(t.crop_size, t.scale_range, t.hflip, self.spec.ignore_index))

    def loss(self, out, batch):
        affinity = self.refiner.pair_affinity(out, self.offsets)
        grid = affinity.shape[-2:]
        # nearest: a label is never averaged into another class (the stride is the network's, crops are padded 255)
        labels = F.interpolate(batch["mask"][:, None].float(), size=grid, mode="nearest")[:, 0].long()
        bg, fg, neg = relation_labels(labels, self.offsets, self.spec.ignore_index, self.spec.background)
        return relation_loss(affinity, bg, fg, neg, self.spec.background is not None)


def train_affinity(refiner: Any, ctx: Any, inputs: dict, stage: Stage) -> dict:
    """The stage of an affinity refiner: confident regions of the pseudo split's images from the complete maps
    stage, then the network trained on them (or resumed) -> ``stage.dir/model.pt``; returns the stage info."""
    cfg, spec = ctx.cfg, ctx.spec
    split = ctx.split_name(cfg.pseudo.split)
    samples = ctx.reader.samples(split)
    if not samples:
        raise DataError(f"split '{split}' (pseudo.split) has no images to train the {refiner.name} network on")
    regions = stage.dir / "labels"
    computed = write_confident_regions(refiner, samples, inputs[MAPS].dir / split, regions, spec, cfg.crf.workers,
                                       cfg.runtime.progress)
    stats = region_stats(samples, regions, spec, ctx.reader)
    log.info("%s: confident regions of %d images (%d computed): %s", refiner.name, len(samples), computed, stats)
    classifier = inputs[CLS].dir / "model.pt" if CLS in inputs else None
    result = fit(AffinityTask(refiner, samples, spec, regions, classifier), stage.dir, ctx.after_epoch)
    history = result["history"]
    seconds = sum(r["seconds"] for r in history)
    return {"role": "affinity", "refiner": refiner.name, "split": split, "images": len(samples), **stats,
            "epochs": len(history), "train_seconds": round(seconds, 1),
            "seconds_per_epoch": round(seconds / max(len(history), 1), 2),
            "final_loss": history[-1]["loss"] if history else None, "world_size": result["world_size"]}


__all__ = ["AffinityTask", "confident_job", "confident_regions", "crf_labels", "region_stats", "relation_labels",
           "relation_loss", "train_affinity", "write_confident_regions"]
