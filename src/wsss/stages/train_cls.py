"""Stage 1: train the classifier of ``method.name`` on images and image-level labels -> ``cls/model.pt``."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from wsss.data.datasets import drop_unlabelled
from wsss.data.io import load_image
from wsss.engine.train import fit_classifier
from wsss.errors import DataError
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
