"""Stages 4 and 5: train the segmentation network on pseudo masks (or ground truth: the fully supervised upper bound)
-> ``seg/model.pt``; predict a split with the network alone (no image labels) -> ``pred/<split>/<id>.png``.

``seg.loss: sec`` trains with SEC's losses (:mod:`wsss.seg.sec`) instead of cross-entropy: the "masks" are then the
sparse localization cues computed from the maps stage (:class:`SeedCues`), and the image-level labels of the
training images feed the expansion loss. Prediction still uses the network alone; ``seg.crf_postprocess`` refines
its scores with the dense CRF on the image (as DeepLab and SEC do at test time)."""

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
from wsss.errors import ConfigError, DataError
from wsss.localize import load_maps
from wsss.pseudo import pseudo_mask
from wsss.refine import check_crf_config, dense_crf
from wsss.runs import Stage
from wsss.seg.model import DeepLabV3, predict_probs, seg_meta
from wsss.seg.sec import SecLosses
from wsss.stages import maps as maps_stage
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


class SeedCues:
    """SEC localization cues of an image from its maps (``<maps dir>/<id>.npz``): the best class where its normalised
    map is at least ``seed_threshold``; with a background class, background where every map is below
    ``bg_cue_threshold``; ignore (255) elsewhere. The same threshold rule as pseudo masks, with a wide ignore band."""

    def __init__(self, folder: Path, spec, seed_threshold: float, bg_cue_threshold: float):
        self.folder, self.spec = Path(folder), spec
        self.seed_threshold, self.bg_cue_threshold = seed_threshold, bg_cue_threshold

    def __call__(self, s: Sample, hw) -> np.ndarray:
        path = self.folder / f"{s.id}.npz"
        m = load_maps(path)
        if m["maps"].shape[1:] != tuple(hw):
            raise DataError(f"{path}: maps are {m['maps'].shape[1:]} but the image is {tuple(hw)}; rerun `wsss maps`")
        if self.spec.background is None:
            return pseudo_mask(m["maps"], m["classes"], self.spec, None, self.seed_threshold)
        # fg above seed_threshold, ignore in [bg_cue_threshold, seed_threshold], background below
        return pseudo_mask(m["maps"], m["classes"], self.spec, self.seed_threshold, self.bg_cue_threshold)


def present_classes(samples: list[Sample], spec) -> torch.Tensor:
    """(N, C) bool over mask classes: the image-level labels, plus the background class where there is one."""
    present = torch.zeros(len(samples), spec.num_classes, dtype=torch.bool)
    for i, s in enumerate(samples):
        present[i, list(s.labels or ())] = True
    if spec.background is not None:
        present[:, spec.background] = True
    return present


class SegTask(TrainTask):
    name = "deeplabv3"

    def __init__(self, cfg, samples, spec, masks):
        sc = cfg.seg
        super().__init__(cfg, LoopSettings(sc.epochs, sc.batch_size, sc.lr, sc.head_lr_mult, cfg.train.momentum,
                                           cfg.train.weight_decay, cfg.train.poly_power), seg_meta(sc, spec.classes))
        self.samples, self.spec, self.masks = samples, spec, masks
        self.sec = None
        if sc.loss == "sec":
            self.name = "deeplabv3-sec"
            c = sc.sec
            self.sec = SecLosses(spec.background, spec.ignore_index, cfg.crf, c.seed, c.expand, c.constrain,
                                 c.fg_decay, c.bg_decay, c.output_stride)
            self.present = present_classes(samples, spec)

    def build_model(self):
        return DeepLabV3(self.cfg.seg, self.spec.num_classes)

    def dataset(self):
        sc = self.cfg.seg
        return SegmentationDataset(self.samples, self.masks,
                                   TrainTransform(sc.crop_size, sc.scale_range, True, self.spec.ignore_index))

    def loss(self, out, batch):
        if self.sec is not None:
            present = self.present[batch["index"].cpu()].to(out["logits_low"].device)
            return self.sec(out["logits_low"], batch["mask"], present, batch["image"])
        loss = F.cross_entropy(out["logits"].float(), batch["mask"], ignore_index=self.spec.ignore_index)
        return loss, {"ce": float(loss.detach())}


def seg_key(ctx: RunContext) -> str:
    c = ctx.cfg
    if c.seg.loss == "sec":
        crf = without(c.crf, "workers", "enabled") if c.seg.sec.constrain else None
        source = config_hash(ctx.maps_key(), ctx.split_name(c.pseudo.split), crf)
    elif c.seg.masks == "pseudo":
        source = ctx.pseudo_key()
    else:
        source = config_hash(without(c.data, "workers"), "gt")
    engine = {k: getattr(c.train, k) for k in ("precision", "channels_last", "devices", "momentum", "weight_decay",
                                                "poly_power")}
    seg = without(c.seg, "scales", "flip", "predict_split", "crf_postprocess")
    if c.seg.loss != "sec":
        seg.pop("sec")  # SEC settings cannot change a cross-entropy training (keeps earlier runs' keys)
    return config_hash(source, seg, engine, c.seed)


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
    if cfg.seg.loss == "sec":
        if cfg.seg.masks != "pseudo":
            raise ConfigError("seg.loss=sec trains on localization cues from the maps; it needs seg.masks=pseudo")
        if cfg.seg.sec.constrain:
            check_crf_config(cfg.crf)
        maps = maps_stage.run(ctx)
        folder = maps.dir / split
        missing = [s.id for s in samples if not (folder / f"{s.id}.npz").exists()]
        if missing:
            raise DataError(f"{folder}: no maps for {len(missing)} training image(s): {', '.join(missing[:10])}; add "
                            f"'{cfg.pseudo.split}' to maps.splits")
        samples = [s for s in samples if s.labels]
        masks = SeedCues(folder, ctx.spec, cfg.seg.sec.seed_threshold, cfg.seg.sec.bg_cue_threshold)
    elif cfg.seg.masks == "pseudo":
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
    log.info("seg: training DeepLabV3/%s on %d images with %s", cfg.seg.backbone, len(samples),
             "SEC losses" if cfg.seg.loss == "sec" else f"{cfg.seg.masks} masks")
    result = fit(SegTask(cfg, samples, ctx.spec, masks), stage.dir, after_epoch)
    stage.finish(images=len(samples), masks=cfg.seg.masks, loss=cfg.seg.loss,
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
    crf = without(cfg.crf, "workers", "enabled") if cfg.seg.crf_postprocess else None
    if crf is not None:
        check_crf_config(cfg.crf)
    stage = Stage(ctx.run_dir, "pred", config_hash(seg.key, cfg.seg.scales, cfg.seg.flip, split, *([crf] if crf else [])))
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
        probs = probs[0].float().numpy()
        if cfg.seg.crf_postprocess:
            probs = dense_crf(rgb, probs, cfg.crf)
        save_mask_png(out / f"{s.id}.png", probs.argmax(0).astype(np.uint8), palette)
        done += 1
    elapsed = time.perf_counter() - t0
    stage.finish(split=split, images=len(samples), downscaled=downscaled, crf_postprocess=cfg.seg.crf_postprocess,
                 images_per_s=round(done / max(elapsed, 1e-9), 2))
    return stage
