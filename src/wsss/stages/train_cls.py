"""Stage 1: train the classifier of ``method.name`` on images and image-level labels -> ``cls/model.pt``.

``check`` runs before anything is trained: the training split has labelled images, its labels can localize its
classes (the label check of :mod:`wsss.data.label_check`: classes on nearly every image are warned about, a split
where most classes are refuses unless ``label_check.force``; the record goes into ``stage.json``), every image
decodes (a corrupt file fails in seconds, naming every bad file, rather than hours later inside a loader worker),
and the backbone's initial weights are there (and, for a method that learns from saliency, the saliency source can give
every training image a map). Training itself is the shared loop (:mod:`wsss.engine.train`): checkpoints
every epoch, resume, devices, precision.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from wsss.data.datasets import drop_unlabelled
from wsss.data.io import load_image
from wsss.engine.train import fit_classifier
from wsss.errors import DataError
from wsss.methods import METHODS
from wsss.models.backbones import check_weights
from wsss.runs import Stage, atomic_write_json
from wsss.saliency import build_source, source_key
from wsss.stages.context import RunContext
from wsss.stages.declare import select

#: the settings that key the classifier (plus the saliency source's for a method that learns from saliency)
KEYED_BY = ("data", "-data.val_split", "-data.test_split", "model", "method", "train", "runtime", "seed")

log = logging.getLogger("wsss.stages")


def check_images(ctx: RunContext, samples, what: str = "the training split") -> None:
    """Decode every image once so that a corrupt file fails before any work, naming every bad file. Images this
    command already decoded (another stage's check, e.g. the test split for maps and for prediction) are skipped."""
    samples = [s for s in samples if str(s.image) not in ctx.decoded_images]

    def probe(s):
        try:
            load_image(s.image)
            return None
        except DataError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=4) as pool:
        errors = [e for e in pool.map(probe, samples) if e]
    if errors:
        raise DataError(f"{len(errors)} unreadable image(s) in {what}:\n  " + "\n  ".join(errors))
    ctx.decoded_images.update(str(s.image) for s in samples)


def training_samples(ctx: RunContext):
    """(labelled samples, ids skipped for an empty label set) of the training split; DataError when none is left."""
    split = ctx.split_name("train")
    samples, skipped = drop_unlabelled(ctx.reader.samples(split), f"{split} split")
    if not samples:
        raise DataError(f"split '{split}' of {ctx.cfg.data.root} has no image with a label")
    return samples, skipped


def check_label_spread(ctx: RunContext) -> dict:
    """The label check (:mod:`wsss.data.label_check`): warns naming the classes present in nearly every training
    image; refuses (DataError) when most classes are, unless ``label_check.force``. Returns the record."""
    record = ctx.label_check
    if record["verdict"] == "refuse":
        raise DataError(record["message"])
    if record["message"]:
        log.warning("%s", record["message"])
    return record


def key_settings(cfg) -> dict:
    """The classifier's key: :data:`KEYED_BY`, and for a method that learns from saliency what determines the maps
    (:func:`wsss.saliency.source_key`; not the refiner's threshold or bands). Other methods' keys are as before
    saliency could reach a classifier, so their run directories stay valid."""
    settings = select(cfg, KEYED_BY)
    if METHODS.get(cfg.method.name).uses_saliency:
        settings["saliency"] = source_key(cfg.saliency)
    return settings


def check(ctx: RunContext) -> None:
    samples, _ = training_samples(ctx)
    check_label_spread(ctx)
    check_images(ctx, samples, f"split '{ctx.split_name('train')}'")
    check_weights(ctx.cfg.model)
    if METHODS.get(ctx.cfg.method.name).uses_saliency:
        # built here: a model file that is missing and cannot be fetched, or a folder without some image's map,
        # fails before anything is trained
        build_source(ctx.cfg.saliency).check(samples)


def train_classifier(ctx: RunContext, task_or_samples, out_dir, skipped: list[str]) -> dict:
    """Train (or resume) into ``out_dir``; ``task_or_samples``: the training samples (the method's own task) or a
    prepared :class:`~wsss.engine.train.TrainTask` (a recipe's round). Returns the stage info."""
    from wsss.engine.train import TrainTask, fit

    if isinstance(task_or_samples, TrainTask):
        result = fit(task_or_samples, out_dir, ctx.after_epoch)
    else:
        result = fit_classifier(ctx.cfg, task_or_samples, ctx.spec, out_dir, after_epoch=ctx.after_epoch)
    atomic_write_json(out_dir / "summary.json", {"skipped_empty_labels": skipped, **result})
    history = result["history"]
    return {"role": "classifier", "images": result["images"], "skipped_empty_labels": len(skipped),
            "epochs": len(history), "train_seconds": round(sum(r["seconds"] for r in history), 1),
            "final_loss": history[-1]["loss"] if history else None}


def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    samples, skipped = training_samples(ctx)
    log.info("cls: training %s/%s on %d images (%d skipped: empty label set)", ctx.cfg.method.name,
             ctx.cfg.model.backbone, len(samples), len(skipped))
    return {**train_classifier(ctx, samples, stage.dir, skipped), "label_check": ctx.label_check}


__all__ = ["KEYED_BY", "check", "check_images", "check_label_spread", "compute", "key_settings", "train_classifier",
           "training_samples"]
