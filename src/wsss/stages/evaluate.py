"""Stage 4: score everything against ground truth -> ``metrics.json``.

Per split with maps: classifier mAP (from the scores stored with the maps), a threshold sweep, and the maps turned
into masks by the same rule as the pseudo masks (with the threshold chosen on the selection split). For the pseudo
split, the written pseudo masks themselves. Each split is one confusion matrix; each map file is read once.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from PIL import Image

from wsss.data.datasets import label_vector
from wsss.evaluation import ThresholdSweep, average_precision, confusion_matrix, segmentation_scores
from wsss.layout import MAPS, PRED, PSEUDO, SEG
from wsss.pseudo import pseudo_mask
from wsss.runs import Stage, atomic_write_json
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


def _score_split(ctx: RunContext, maps, split: str, bg_threshold) -> dict:
    spec = ctx.spec
    sweep = ThresholdSweep(spec, ctx.cfg.eval.sweep)
    conf = np.zeros((spec.num_classes, spec.num_classes), np.int64)
    scores, targets = [], []
    has_gt = True
    for s, m in maps_stage.iter_maps(maps, ctx, split):
        scores.append(m["scores"])
        targets.append(label_vector(s.labels or (), spec).numpy())
        if s.mask is None:
            has_gt = False
            continue
        gt = ctx.reader.load_mask(s, m["maps"].shape[1:])
        sweep.add(m["maps"], m["classes"], gt)
        pred = pseudo_mask(m["maps"], m["classes"], spec, bg_threshold)
        conf += confusion_matrix(gt, pred, spec.num_classes, spec.ignore_index)
    ap = average_precision(np.stack(scores), np.stack(targets))
    out = {
        "images": len(scores),
        "classifier": {
            "mAP": None if np.all(np.isnan(ap)) else round(float(np.nanmean(ap)) * 100, 2),
            "ap": {n: (None if np.isnan(v) else round(float(v) * 100, 2)) for n, v in zip(spec.fg_names, ap)},
        },
    }
    if has_gt:
        out["maps"] = segmentation_scores(conf, spec.classes)
        out["sweep"] = sweep.results()
    return out


def score_mask_folder(ctx: RunContext, folder, split: str) -> dict:
    """Scores of a folder of mask PNGs (pseudo masks, predictions) against the ground truth of a split: one confusion
    matrix over the images that have ground truth."""
    conf = np.zeros((ctx.spec.num_classes,) * 2, np.int64)
    for s in ctx.reader.samples(split):
        if s.mask is None:
            continue
        pred = np.asarray(Image.open(folder / f"{s.id}.png"))
        conf += confusion_matrix(ctx.reader.load_mask(s, pred.shape), pred, ctx.spec.num_classes, ctx.spec.ignore_index)
    return segmentation_scores(conf, ctx.spec.classes)


def _score_predictions(ctx: RunContext, pred: Stage, seg: Stage) -> dict:
    """The segmentation network alone on ``seg.predict_split`` (never trained on)."""
    info = pred.info()
    split = info["split"]
    return {"split": split, "masks": ctx.cfg.seg.masks, "backbone": f"DeepLabV3/{ctx.cfg.seg.backbone}",
            **score_mask_folder(ctx, pred.dir / split, split),
            "predict_images_per_s": info.get("images_per_s"), "train_seconds": seg.info().get("train_seconds")}


def inputs(cfg) -> tuple[str, ...]:
    return (MAPS, PSEUDO, SEG, PRED) if cfg.seg.enabled else (MAPS, PSEUDO)


def compute(ctx: RunContext, inputs: dict, stage=None) -> dict:
    """``inputs``: every stage of the run so far (an uncached stage gets them all), whose records (keys, timings)
    go into metrics.json beside the scores."""
    t0 = time.perf_counter()
    pseudo, maps = inputs[PSEUDO], inputs[MAPS]
    info = pseudo.info()
    bg = info.get("bg_threshold")
    cfg = ctx.cfg
    records = {n: s.info() for n, s in inputs.items() if isinstance(s, Stage)}
    metrics: dict = {
        "run": cfg.name,
        "dataset": ctx.spec.name,
        "method": cfg.method.name,
        "backbone": f"{cfg.model.backbone} OS{cfg.model.output_stride}",
        "localizer": cfg.maps.localizer,
        "seed": cfg.seed,
        "image_labels": cfg.maps.labels,
        "selection": {k: info.get(k) for k in ("bg_threshold", "chosen_on", "reason", "miou_on_selection_split",
                                               "saliency_threshold", "saliency_chosen_on",
                                               "saliency_miou_on_selection_split")
                      if info.get(k) is not None},
        "stage_keys": {n: r.get("key") for n, r in records.items()},
        "splits": {},
    }
    for role in cfg.maps.splits:
        split = ctx.split_name(role)
        metrics["splits"][split] = _score_split(ctx, maps, split, bg)
    # the pseudo masks as written (ignore band included)
    split = info["split"]
    if any(s.mask is not None for s in ctx.reader.samples(split)):
        metrics["pseudo"] = {"split": split, **score_mask_folder(ctx, pseudo.dir / split, split)}
    metrics["timing"] = {
        "maps": maps.info().get("splits"),
        "eval_seconds": round(time.perf_counter() - t0, 2),
    }
    if SEG in inputs:
        metrics["seg"] = _score_predictions(ctx, inputs[PRED], inputs[SEG])
    classifiers = [r for r in records.values() if r.get("role") == "classifier"]
    if classifiers:
        train_s = sum(r.get("train_seconds") or 0.0 for r in classifiers)
        epochs = sum(r.get("epochs") or 0 for r in classifiers)
        metrics["timing"]["train_seconds"] = round(train_s, 1)
        metrics["timing"]["train_seconds_per_epoch"] = round(train_s / max(epochs, 1), 2)
    metrics["stages"] = {n: {k: v for k, v in r.items() if k != "entries"} for n, r in records.items()}
    atomic_write_json(ctx.layout.metrics, metrics)
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """The headline numbers, for the terminal."""
    lines = [f"run {metrics['run']}: {metrics['method']} / {metrics['backbone']} / {metrics['localizer']} "
             f"on {metrics['dataset']} (seed {metrics['seed']})"]
    if metrics.get("selection", {}).get("bg_threshold") is not None:
        sel = metrics["selection"]
        lines.append(f"  background threshold {sel['bg_threshold']} (chosen on {sel.get('chosen_on')})")
    for split, s in metrics["splits"].items():
        parts = [f"  {split:>8}: classifier mAP {s['classifier']['mAP']}"]
        if "maps" in s:
            parts.append(f"map mIoU {s['maps']['miou']}  class-avg acc {s['maps']['class_avg_acc']}  "
                         f"pixel acc {s['maps']['pixel_acc']}")
        lines.append("  ".join(parts))
    if "pseudo" in metrics:
        p = metrics["pseudo"]
        lines.append(f"  pseudo masks ({p['split']}): mIoU {p['miou']}")
    if "seg" in metrics:
        s = metrics["seg"]
        lines.append(f"  segmentation network ({s['backbone']}, trained on {s['masks']} masks) on {s['split']}: "
                     f"mIoU {s['miou']}  class-avg acc {s['class_avg_acc']}  pixel acc {s['pixel_acc']}")
    return lines
