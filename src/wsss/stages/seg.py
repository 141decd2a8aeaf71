"""Stages 4 and 5: train the segmentation network on pseudo masks (or ground truth: the fully supervised upper bound)
-> ``seg/model.pt``; predict a split with the network alone (no image labels) -> ``pred/<split>/<id>.png``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm import tqdm

from wsss.config import config_hash
from wsss.data.datasets import SegmentationDataset
from wsss.data.io import load_image, load_mask, save_mask_png
from wsss.data.readers import Reader, Sample
from wsss.data.transforms import TrainTransform, to_tensor
from wsss.engine.checkpoint import load_checkpoint
from wsss.engine.train import LoopSettings, TrainTask, fit
from wsss.errors import DataError
from wsss.runs import Stage
from wsss.seg.model import DeepLabV3, predict_probs, seg_meta
from wsss.stages import pseudo as pseudo_stage
from wsss.stages.context import RunContext, without

log = logging.getLogger("wsss.stages")

#: images larger than this many pixels are downscaled for prediction (and the prediction upscaled back)
MAX_PREDICT_PIXELS = 2048 * 2048


class PseudoMasks:
    """Reads ``<dir>/<id>.png`` and checks it against its image."""

    def __init__(self, folder: Path, num_classes: int, ignore_index: int):
        self.folder, self.num_classes, self.ignore_index = Path(folder), num_classes, ignore_index

    def __call__(self, s: Sample, hw) -> np.ndarray:
        return load_mask(self.folder / f"{s.id}.png", self.num_classes, self.ignore_index, hw)


class GroundTruthMasks:
    def __init__(self, reader: Reader):
        self.reader = reader

    def __call__(self, s: Sample, hw) -> np.ndarray:
        return self.reader.load_mask(s, hw)


class SegTask(TrainTask):
    name = "deeplabv3"

    def __init__(self, cfg, samples, spec, masks):
        sc = cfg.seg
        super().__init__(cfg, LoopSettings(sc.epochs, sc.batch_size, sc.lr, sc.head_lr_mult, cfg.train.momentum,
                                           cfg.train.weight_decay, cfg.train.poly_power), seg_meta(sc, spec.classes))
        self.samples, self.spec, self.masks = samples, spec, masks

    def build_model(self):
        return DeepLabV3(self.cfg.seg, self.spec.num_classes)

    def dataset(self):
        sc = self.cfg.seg
        return SegmentationDataset(self.samples, self.masks,
                                   TrainTransform(sc.crop_size, sc.scale_range, True, self.spec.ignore_index))

    def loss(self, out, batch):
        loss = F.cross_entropy(out["logits"].float(), batch["mask"], ignore_index=self.spec.ignore_index)
        return loss, {"ce": float(loss.detach())}


def seg_key(ctx: RunContext) -> str:
    c = ctx.cfg
    source = ctx.pseudo_key() if c.seg.masks == "pseudo" else config_hash(without(c.data, "workers"), "gt")
    engine = {k: getattr(c.train, k) for k in ("precision", "channels_last", "devices", "momentum", "weight_decay",
                                                "poly_power")}
    return config_hash(source, without(c.seg, "scales", "flip", "predict_split"), engine, c.seed)


def check_pseudo_folder(folder: Path, samples: list[Sample]) -> None:
    """Every training image needs its pseudo mask; extra files are reported and ignored."""
    have = {p.stem for p in folder.glob("*.png")}
    want = {s.id for s in samples}
    missing = sorted(want - have)
    extra = sorted(have - want)
    if missing:
        raise DataError(f"{folder}: {len(missing)} pseudo mask(s) missing for training images: "
                        f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (rerun `wsss pseudo`)")
    if extra:
        log.warning("%s: %d pseudo mask(s) belong to no training image and are ignored: %s", folder, len(extra),
                    ", ".join(extra[:10]))


def train(ctx: RunContext, after_epoch=None) -> Stage:
    cfg = ctx.cfg
    stage = Stage(ctx.run_dir, "seg", seg_key(ctx))
    if stage.complete:
        log.info("seg: reusing %s (config unchanged)", stage.dir)
        return stage
    split = ctx.split_name(cfg.pseudo.split)
    samples = ctx.reader.samples(split)
    if cfg.seg.masks == "pseudo":
        pseudo = pseudo_stage.run(ctx)
        folder = pseudo.dir / pseudo.info()["split"]
        check_pseudo_folder(folder, samples)
        masks = PseudoMasks(folder, ctx.spec.num_classes, ctx.spec.ignore_index)
    else:
        samples = [s for s in samples if s.mask is not None]
        if not samples:
            raise DataError(f"seg.masks=gt: split '{split}' has no ground-truth masks")
        masks = GroundTruthMasks(ctx.reader)
    stage.open()
    log.info("seg: training DeepLabV3/%s on %d images with %s masks", cfg.seg.backbone, len(samples), cfg.seg.masks)
    result = fit(SegTask(cfg, samples, ctx.spec, masks), stage.dir, after_epoch)
    stage.finish(images=len(samples), masks=cfg.seg.masks,
                 train_seconds=round(sum(r["seconds"] for r in result["history"]), 1))
    return stage


def load_segmenter(ctx: RunContext, stage: Stage) -> DeepLabV3:
    state = load_checkpoint(stage.dir / "model.pt", seg_meta(ctx.cfg.seg, ctx.spec.classes))
    model = DeepLabV3(ctx.cfg.seg, ctx.spec.num_classes, pretrained=False)
    model.load_state_dict(state["model"])
    return model.eval()


def predict(ctx: RunContext) -> Stage:
    """Segment ``seg.predict_split`` with the network alone; image labels are never read."""
    cfg = ctx.cfg
    seg = train(ctx)
    split = ctx.split_name(cfg.seg.predict_split)
    stage = Stage(ctx.run_dir, "pred", config_hash(seg.key, cfg.seg.scales, cfg.seg.flip, split))
    if stage.complete:
        log.info("pred: reusing %s (config unchanged)", stage.dir)
        return stage
    stage.open()
    model = load_segmenter(ctx, seg)
    out = stage.dir / split
    palette = ctx.spec.palette_bytes()
    samples = ctx.reader.samples(split)
    t0 = time.perf_counter()
    done = downscaled = 0
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16")
    for s in tqdm(samples, desc=f"predict {split}", leave=False, disable=not cfg.train.progress, mininterval=1.0):
        if (out / f"{s.id}.png").exists():
            continue
        rgb = load_image(s.image)
        x = to_tensor(rgb)[None]
        h, w = rgb.shape[:2]
        if h * w > MAX_PREDICT_PIXELS:
            f = (MAX_PREDICT_PIXELS / (h * w)) ** 0.5
            x = F.interpolate(x, size=(int(h * f), int(w * f)), mode="bilinear", align_corners=False)
            log.warning("predict: %s is %dx%d; predicted at %dx%d to fit memory, upscaled back", s.image, w, h,
                        x.shape[-1], x.shape[-2])
            downscaled += 1
        with autocast:
            probs = predict_probs(model, x, cfg.seg.scales, cfg.seg.flip)
        if probs.shape[-2:] != (h, w):
            probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
        save_mask_png(out / f"{s.id}.png", probs[0].argmax(0).numpy().astype(np.uint8), palette)
        done += 1
    elapsed = time.perf_counter() - t0
    stage.finish(split=split, images=len(samples), downscaled=downscaled,
                 images_per_s=round(done / max(elapsed, 1e-9), 2))
    return stage
