"""The label check: can image-level labels localize this dataset's classes at all?

A classifier trained on image-level labels learns where a class is from the contrast between images with it and
images without it. A class present in nearly every training image (a road in street scenes, the sky in landscape
photos) has almost no images without it: its label is the same for every image, and its localization maps, the
pseudo masks and the segmentation network learn little about where it is. When most classes are like that, the
whole pipeline scores below predicting the most frequent class everywhere.

:func:`check_labels` measures, per class, the fraction of the training images labelled with it and, where masks
exist, its share of the labelled pixels (from at most :data:`MAX_MASKS` masks, evenly spaced over the split); it
names the classes present in at least ``common_fraction`` of the images, and says whether the run should refuse to
start: when more than ``refuse_fraction`` of the (foreground) classes are that common. ``wsss prepare`` prints it;
the classifier stage checks it before training, records it in its ``stage.json`` (and so in ``metrics.json``) and
refuses unless ``label_check.force`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from wsss.data.spec import DatasetSpec

#: pixel shares are measured on at most this many masks, evenly spaced over the split (image fractions use all)
MAX_MASKS = 2000


def _pct(x: float) -> float:
    return round(100.0 * float(x), 1)


def _image_counts(labels: Sequence[Sequence[int]], num_classes: int) -> np.ndarray:
    counts = np.zeros(num_classes, np.int64)
    for lab in labels:
        counts[list(set(lab))] += 1
    return counts


def label_statistics(labels: Sequence[Sequence[int]], spec: DatasetSpec,
                     masks: Sequence[Callable[[], np.ndarray]] = ()) -> dict:
    """Per class of ``spec``: the percentage of the images (``labels``: each image's label set) labelled with it
    (None for the background, which is no image-level label) and, when ``masks`` (loaders of the masks, in any
    number) are given, its percentage of their labelled pixels."""
    n = len(labels)
    counts = _image_counts(labels, spec.num_classes)
    pixels = None
    if masks:
        def histogram(load: Callable[[], np.ndarray]) -> np.ndarray:
            m = np.asarray(load())
            return np.bincount(m[m != spec.ignore_index].astype(np.int64), minlength=spec.num_classes)[: spec.num_classes]

        with ThreadPoolExecutor(max_workers=4) as pool:
            pixels = np.sum(list(pool.map(histogram, masks)), axis=0)
    total = float(pixels.sum()) if pixels is not None else 0.0
    return {
        name: {"images": None if c == spec.background else _pct(counts[c] / max(n, 1)),
               "pixels": _pct(pixels[c] / total) if pixels is not None and total else None}
        for c, name in enumerate(spec.classes)
    }


def check_labels(samples: Sequence, spec: DatasetSpec, load_mask: Callable | None = None, *, split: str = "train",
                 common_fraction: float = 0.9, refuse_fraction: float = 0.5, force: bool = False) -> dict:
    """The label check of a training split (``samples``: :class:`~wsss.data.readers.Sample` with labels resolved;
    images with an empty label set, which training skips, are left out). ``load_mask(sample)`` reads a mask (pixel
    shares are measured where samples have one). Returns a JSON-able record: per-class ``classes``, the ``common``
    classes (most frequent first), the ``verdict`` (``ok``, ``warn``, ``refuse``, or ``forced`` when
    ``force`` lets a refused run start) and a ``message`` (None when ok)."""
    samples = [s for s in samples if s.labels]
    with_mask = [s for s in samples if s.mask is not None] if load_mask is not None else []
    if len(with_mask) > MAX_MASKS:
        pick = np.unique(np.linspace(0, len(with_mask) - 1, MAX_MASKS).round().astype(int))
        with_mask = [with_mask[i] for i in pick]
    classes = label_statistics([s.labels for s in samples], spec,
                               [lambda s=s: load_mask(s) for s in with_mask])
    counts, n = _image_counts([s.labels for s in samples], spec.num_classes), len(samples)
    common = [spec.classes[c] for c in sorted((c for c in spec.fg_ids if n and counts[c] >= common_fraction * n - 1e-9),
                                              key=lambda c: (-counts[c], spec.classes[c]))]
    refuse = len(common) > refuse_fraction * spec.num_fg
    verdict = "ok" if not common else ("forced" if force else "refuse") if refuse else "warn"
    record = {"split": split, "images": len(samples), "masks": len(with_mask), "common_fraction": common_fraction,
              "refuse_fraction": refuse_fraction, "classes": classes, "common": common, "verdict": verdict}
    record["message"] = _message(record, spec) if common else None
    return record


def _message(r: dict, spec: DatasetSpec) -> str:
    common = r["common"]
    named = ", ".join(f"{n} ({r['classes'][n]['images']:g}%)" for n in common)
    head = (f"label check: {len(common)} of {spec.num_fg} classes appear in at least {100 * r['common_fraction']:g}% "
            f"of the {r['images']} training images of split '{r['split']}': {named}. ")
    listed = ",".join(common)
    advice = (f"Consider mapping them to background with data.to_background=[{listed}] (as configs/msrc21-objects.yaml "
              "does for MSRC-21's stuff classes), or giving pixel labels for them.")
    if r["verdict"] in ("refuse", "forced"):
        text = (head + "Image-level labels are then nearly the same for every image: a classifier cannot learn where "
                "these classes are, and the maps, pseudo masks and segmentation network will score near or below "
                "the trivial baselines (e.g. the most frequent class everywhere). " + advice)
        if r["verdict"] == "refuse":
            text += (f" The run refuses to start because more than {100 * r['refuse_fraction']:g}% of the classes "
                     "are like that; set label_check.force=true to run anyway.")
        else:
            text += " Running anyway (label_check.force=true)."
        return text
    return (head + "Image-level labels cannot localize them: their label is the same for almost every image, so "
            "their maps and masks will be poor. " + advice)


def format_check(r: dict) -> list[str]:
    """The check as report lines: one row per class (image %, pixel %), then the message."""
    lines = [f"label check (split {r['split']}: {r['images']} labelled images"
             + (f", pixel shares from {r['masks']} masks" if r["masks"] else ", no masks") + ")"]
    width = max((len(n) for n in r["classes"]), default=5)
    lines.append(f"  {'class':<{width}}  images  pixels")

    def pct(v):
        return "     –" if v is None else f"{v:5.1f}%"

    for name, v in r["classes"].items():
        flag = "  <- in nearly every image" if name in r["common"] else ""
        lines.append(f"  {name:<{width}}  {pct(v['images'])}  {pct(v['pixels'])}{flag}")
    if r["message"]:
        lines.append(f"  warning: {r['message']}")
    return lines


__all__ = ["MAX_MASKS", "check_labels", "format_check", "label_statistics"]
