"""Stage 1: train the classifier of ``method.name`` on images and image-level labels -> ``cls/model.pt``.

Adversarial Erasing (``method.name=adv_erase``, :mod:`wsss.methods.adv_erase`) trains one classifier per round, each
a cached stage of its own so that a killed run resumes at the round and epoch where it stopped::

    cls/               round 1 on the original images
    cls/mined/         round 1's maps of the training split (the ``maps.*`` settings, image-level labels)
    cls_r<k>/erase/    round k's cumulative erase masks (1 = erased): round k-1's masks plus its mined regions
    cls_r<k>/          round k, trained on the images erased by its masks (filled with the training mean colour)
    cls_r<k>/mined/    round k's maps of the training split, on its erased inputs
    cls_rounds.json    per round: erased area, over-erased images dropped from training, train map mIoU

Images whose cumulative erase covers more than ``max_erased_fraction`` are dropped from that round's training (listed
with a warning). Where the training split has ground truth, the report scores each round's mined maps alone and the
union of the rounds so far (maps arg-maxed over the image's classes; with a background class, at
``pseudo.bg_threshold`` or else the best of ``eval.sweep`` on train -- a diagnostic, not a selection).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from wsss.data.datasets import (
    ClassificationDataset,
    ErasedInputs,
    drop_unlabelled,
    load_erase_mask,
    mean_colour,
    save_erase_mask,
)
from wsss.data.io import load_image
from wsss.data.transforms import TrainTransform
from wsss.engine.train import ClassifierTask, fit, fit_classifier
from wsss.errors import DataError
from wsss.evaluation import ThresholdSweep, confusion_matrix, segmentation_scores
from wsss.localize import load_maps
from wsss.methods.adv_erase import check_maps_config, erase_region, erase_summary, union_maps
from wsss.pseudo import pseudo_mask
from wsss.runs import Stage, atomic_write_json
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


def check_images(samples) -> None:
    """Decode every image once before training so that a corrupt file fails in seconds, naming every bad file,
    rather than after hours inside a loader worker."""

    def probe(s):
        try:
            load_image(s.image)
            return None
        except DataError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = [e for e in pool.map(probe, samples) if e]
    if errors:
        raise DataError(f"{len(errors)} unreadable image(s) in the training split:\n  " + "\n  ".join(errors))


def run(ctx: RunContext, after_epoch=None) -> Stage:
    if ctx.erasing is not None:
        return train_rounds(ctx, after_epoch)[-1][0]
    stage = Stage(ctx.run_dir, "cls", ctx.cls_key())
    if stage.complete:
        log.info("cls: reusing %s (config unchanged)", stage.dir)
        return stage
    stage.open()
    split = ctx.split_name("train")
    samples, skipped = drop_unlabelled(ctx.reader.samples(split), f"{split} split")
    if not samples:
        raise DataError(f"split '{split}' of {ctx.cfg.data.root} has no image with a label")
    check_images(samples)
    log.info("cls: training %s/%s on %d images (%d skipped: empty label set)", ctx.cfg.method.name,
             ctx.cfg.model.backbone, len(samples), len(skipped))
    result = fit_classifier(ctx.cfg, samples, ctx.spec, stage.dir, after_epoch=after_epoch)
    atomic_write_json(stage.dir / "summary.json", {"skipped_empty_labels": skipped, **result})
    stage.finish(images=len(samples), skipped_empty_labels=len(skipped))
    return stage


# -- Adversarial Erasing: one classifier per round -----------------------------------------------------------------


class ErasedClassifierTask(ClassifierTask):
    """The classifier of a round >= 2: images erased by the round's masks before augmentation."""

    def __init__(self, cfg, samples, spec, erase: ErasedInputs):
        super().__init__(cfg, samples, spec)
        self.erase = erase
        self.name = f"{cfg.method.name} {Path(erase.masks_dir).parent.name}"

    def dataset(self):
        t = self.cfg.train
        return ClassificationDataset(self.samples, self.spec,
                                     TrainTransform(t.crop_size, t.scale_range, t.hflip, self.spec.ignore_index),
                                     erase=self.erase)


def write_erase_masks(samples, maps_dir: Path, prev_erase_dir: Path | None, out_dir: Path,
                      threshold: float) -> dict[str, float]:
    """``out_dir/<id>.png`` = the previous round's erase mask OR the pixels where its maps (``maps_dir/<id>.npz``)
    exceed ``threshold`` for any of the image's classes. Files already there are kept (a resumed run). Returns the
    erased fraction of every image."""
    fractions = {}
    for s in samples:
        out = out_dir / f"{s.id}.png"
        if out.exists():
            fractions[s.id] = float(load_erase_mask(out).mean())
            continue
        maps = load_maps(maps_dir / f"{s.id}.npz")["maps"]
        mask = erase_region(maps, threshold)
        if prev_erase_dir is not None:
            mask |= load_erase_mask(prev_erase_dir / f"{s.id}.png", mask.shape)
        save_erase_mask(out, mask)
        fractions[s.id] = float(mask.mean())
    return fractions


def fill_colour(rounds) -> tuple[int, int, int] | None:
    """The erase fill of a run (the training images' mean colour), recorded by its round 2; None with one round."""
    return tuple(rounds[1][0].info()["fill"]) if len(rounds) > 1 else None


def _round_stage(ctx: RunContext, k: int) -> Stage:
    return Stage(ctx.run_dir, "cls" if k == 1 else f"cls_r{k}", ctx.round_key(k))


def train_rounds(ctx: RunContext, after_epoch=None) -> list[tuple[Stage, Stage]]:
    """Train (or reuse) every round of Adversarial Erasing and mine its training-split maps; returns (classifier
    stage, mined-maps stage) per round and writes the per-round report ``cls_rounds.json``."""
    opts = ctx.erasing
    check_maps_config(ctx.cfg.maps)
    split = ctx.split_name("train")
    everything = ctx.reader.samples(split)
    training = None  # (labelled samples, skipped ids), checked once, before the first round that trains
    rounds: list[tuple[Stage, Stage]] = []
    report: list[dict] = []
    for k in range(1, opts.rounds + 1):
        stage = _round_stage(ctx, k)
        if stage.complete:
            log.info("cls round %d: reusing %s (config unchanged)", k, stage.dir)
        else:
            if training is None:
                training = drop_unlabelled(everything, f"{split} split")
                if not training[0]:
                    raise DataError(f"split '{split}' of {ctx.cfg.data.root} has no image with a label")
                check_images(training[0])
            stage.open()
            _train_round(ctx, k, stage, rounds, everything, *training, after_epoch)
        mined = Stage(stage.dir, "mined", ctx.mined_key(k))
        if not mined.complete:
            _mine_round(ctx, k, stage, mined, rounds, everything)
        rounds.append((stage, mined))
        report.append(_round_report(k, stage, mined))
        _log_round(report[-1])
        atomic_write_json(ctx.run_dir / "cls_rounds.json", {"method": "adv_erase", "rounds": report})
    return rounds


def _train_round(ctx: RunContext, k: int, stage: Stage, rounds, everything, labelled, skipped, after_epoch) -> None:
    opts = ctx.erasing
    info: dict = {"round": k, "skipped_empty_labels": len(skipped)}
    samples = labelled
    if k == 1:
        log.info("cls round 1/%d: training %s/%s on %d images (%d skipped: empty label set)", opts.rounds,
                 ctx.cfg.method.name, ctx.cfg.model.backbone, len(samples), len(skipped))
        result = fit_classifier(ctx.cfg, samples, ctx.spec, stage.dir, after_epoch=after_epoch)
    else:
        fill = fill_colour(rounds) if k > 2 else mean_colour(labelled)
        prev, prev_mined = rounds[-1]
        # every image of the split gets a mask: the mined maps (reused by the maps stage) cover the whole split
        fractions = write_erase_masks(everything, prev_mined.dir, prev.dir / "erase" if k > 2 else None,
                                      stage.dir / "erase", opts.erase_threshold)
        summary = erase_summary({s.id: fractions[s.id] for s in labelled}, opts.max_erased_fraction)
        if summary["dropped"]:
            log.warning("cls round %d: %d image(s) erased over %.0f%% of their pixels are dropped from this round's "
                        "training: %s", k, len(summary["dropped"]), 100 * opts.max_erased_fraction,
                        ", ".join(summary["dropped"]))
        dropped = set(summary["dropped"])
        samples = [s for s in labelled if s.id not in dropped]
        if not samples:
            raise DataError(f"adv_erase round {k}: every training image is erased over "
                            f"{opts.max_erased_fraction:.0%} of its pixels; raise method.options.erase_threshold or "
                            "lower method.options.rounds")
        log.info("cls round %d/%d: training on %d erased images (mean erased %.1f%%, fill RGB %s)", k, opts.rounds,
                 len(samples), 100 * summary["fraction_mean"], fill)
        task = ErasedClassifierTask(ctx.cfg, samples, ctx.spec, ErasedInputs(stage.dir / "erase", fill))
        result = fit(task, stage.dir, after_epoch)
        info.update(erase=summary, fill=list(fill))
    atomic_write_json(stage.dir / "summary.json", {"skipped_empty_labels": skipped, **result})
    stage.finish(images=len(samples), **info)


def _mine_round(ctx: RunContext, k: int, stage: Stage, mined: Stage, rounds, samples) -> None:
    from wsss.stages import maps as maps_stage  # the maps stage imports this one

    mined.open()
    erase = ErasedInputs(stage.dir / "erase", tuple(stage.info()["fill"])) if k > 1 else None
    model = maps_stage.inference_model(ctx, stage.dir / "model.pt")
    info = maps_stage.extract(ctx, model, samples, mined.dir, "gt", erase, what=f"round {k} (train)")
    scores = _train_map_scores(ctx, samples, [m.dir for _, m in rounds] + [mined.dir])
    mined.finish(**info, train_map_scores=scores)


def _train_map_scores(ctx: RunContext, samples, round_dirs) -> dict | None:
    """mIoU of the last round's maps alone and of the union of all rounds, on the images with ground truth."""
    samples = [s for s in samples if s.mask is not None]
    if not samples:
        return None
    spec = ctx.spec
    if spec.background is None:
        thresholds: list = [None]
    else:
        fixed = ctx.cfg.pseudo.bg_threshold
        thresholds = [fixed] if fixed is not None else list(ctx.cfg.eval.sweep)
    n = spec.num_classes
    conf = {"round": np.zeros((n, n), np.int64), "union": np.zeros((n, n), np.int64)}
    sweeps = {name: ThresholdSweep(spec, thresholds) for name in conf} if spec.background is not None else None
    for s in samples:
        parts = [load_maps(d / f"{s.id}.npz") for d in round_dirs]
        gt = ctx.reader.load_mask(s, parts[-1]["maps"].shape[1:])
        variants = {"round": (parts[-1]["maps"], parts[-1]["classes"]),
                    "union": union_maps([(p["maps"], p["classes"]) for p in parts])}
        for name, (maps, classes) in variants.items():
            if sweeps is not None:
                sweeps[name].add(maps, classes, gt)
            else:
                conf[name] += confusion_matrix(gt, pseudo_mask(maps, classes, spec), n, spec.ignore_index)
    if sweeps is None:
        return {name: segmentation_scores(c, spec.classes)["miou"] for name, c in conf.items()}
    best = {name: sw.best() for name, sw in sweeps.items()}
    return {**{name: b["miou"] for name, b in best.items()},
            "bg_threshold": {name: b["threshold"] for name, b in best.items()},
            "threshold": "pseudo.bg_threshold" if len(thresholds) == 1 else "best of eval.sweep on train (diagnostic)"}


def _round_report(k: int, stage: Stage, mined: Stage) -> dict:
    info, mined_info = stage.info(), mined.info()
    history = json.loads((stage.dir / "summary.json").read_text())["history"]
    return {
        "round": k,
        "stage": stage.name,
        "images_trained": info.get("images"),
        "erase": info.get("erase"),
        "train_map_miou": mined_info.get("train_map_scores"),
        "train_seconds": round(sum(r["seconds"] for r in history), 1),
        "final_loss": history[-1]["loss"] if history else None,
    }


def _log_round(r: dict) -> None:
    parts = [f"adv_erase round {r['round']} ({r['stage']}): trained on {r['images_trained']} images"]
    e = r["erase"]
    if e:
        parts.append(f"erased mean {100 * e['fraction_mean']:.1f}% max {100 * e['fraction_max']:.1f}%, "
                     f"{e['over_erased']} over {100 * e['max_erased_fraction']:.0f}% dropped")
    s = r["train_map_miou"]
    if s:
        parts.append(f"train map mIoU: this round {s['round']}, union so far {s['union']}")
    log.info("; ".join(parts))


__all__ = ["ErasedClassifierTask", "check_images", "fill_colour", "run", "train_rounds", "write_erase_masks"]
