"""Stages 4 and 5: train the segmentation network on pseudo masks (or ground truth: the fully supervised upper bound)
-> ``seg/model.pt``; predict a split with the network alone (no image labels) -> ``pred/<split>/<id>.png``.

``seg.loss: sec`` trains with SEC's losses (:mod:`wsss.seg.sec`) instead of cross-entropy: the "masks" are then the
sparse localization cues computed from the maps stage (:class:`SeedCues`), and the image-level labels of the
training images feed the expansion loss. Prediction still uses the network alone; ``seg.crf_postprocess`` refines
its scores with the dense CRF on the image (as DeepLab and SEC do at test time)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.config.runtime import autocast as runtime_autocast
from wsss.config.schema import split_name
from wsss.config.typed import to_dict
from wsss.data.datasets import InferenceDataset, SegmentationDataset, loader_workers, stack
from wsss.data.io import load_image, load_mask, save_mask_png
from wsss.data.readers import Reader, Sample
from wsss.data.transforms import TrainTransform
from wsss.engine import shard
from wsss.engine.checkpoint import load_checkpoint, load_classifier_backbone
from wsss.engine.train import LoopSettings, TrainTask, fit
from wsss.errors import ConfigError, DataError
from wsss.layout import CLS, MAPS, PSEUDO, SEG
from wsss.localize import load_maps
from wsss.models.backbones import check_weights
from wsss.pseudo import pseudo_mask
from wsss.refine import check_crf_config, dense_crf
from wsss.runs import Stage
from wsss.seg.model import DeepLabV3, predict_probs, seg_meta
from wsss.seg.sec import SecLosses
from wsss.stages import maps as maps_stage
from wsss.stages.context import RunContext
from wsss.stages.train_cls import check_images

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


def without(section, *names: str) -> dict:
    d = to_dict(section)
    for n in names:
        d.pop(n, None)
    return d


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

    def __init__(self, cfg, samples, spec, masks, init: Path | None = None, backbone_from: Path | None = None):
        """``init``: a segmentation checkpoint (``model.pt``) whose weights the network starts from, instead of the
        ``seg.model`` initial weights (self-training's ``init: previous``). ``backbone_from``: a classifier
        checkpoint whose backbone replaces the ``seg.model`` initial weights of the backbone (``seg.init:
        classifier``); the head starts as usual."""
        cfg = dataclasses.replace(cfg, seed=seg_seed(cfg))
        sc, t = cfg.seg, cfg.seg.train
        super().__init__(cfg, LoopSettings(t.epochs, t.batch_size, t.lr, t.head_lr_mult, t.momentum, t.weight_decay,
                                           t.poly_power), seg_meta(sc.model, spec.classes))
        self.samples, self.spec, self.masks, self.init, self.backbone_from = samples, spec, masks, init, backbone_from
        self.sec = None
        if sc.loss == "sec":
            self.name = "deeplabv3-sec"
            c = sc.sec
            self.sec = SecLosses(spec.background, spec.ignore_index, cfg.crf, c.seed, c.expand, c.constrain,
                                 c.fg_decay, c.bg_decay, c.loss_stride)
            self.present = present_classes(samples, spec)

    def build_model(self):
        if self.init is None and self.backbone_from is None:
            return DeepLabV3(self.cfg.seg.model, self.spec.num_classes)
        untrained = dataclasses.replace(self.cfg.seg.model, pretrained=False, weights_file=None)
        model = DeepLabV3(untrained, self.spec.num_classes)
        if self.init is not None:
            model.load_state_dict(load_checkpoint(self.init, self.meta)["model"])
        else:
            load_classifier_backbone(model.backbone, self.backbone_from)
        return model

    def dataset(self):
        t = self.cfg.seg.train
        return SegmentationDataset(self.samples, self.masks,
                                   TrainTransform(t.crop_size, t.scale_range, t.hflip, self.spec.ignore_index))

    def loss(self, out, batch):
        if self.sec is not None:
            present = self.present[batch["index"].cpu()].to(out["logits_low"].device)
            return self.sec(out["logits_low"], batch["mask"], present, batch["image"])
        logits = out["logits"].float()
        if not (batch["mask"] != self.spec.ignore_index).any():
            # every pixel of the batch ignored (confidence-filtered masks): no gradient, not NaN
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, batch["mask"], ignore_index=self.spec.ignore_index)
        return loss, {"ce": float(loss.detach())}


def classifier_init(cfg) -> tuple[str, ...]:
    """The classifier stage, where the segmentation network's backbone starts from it (``seg.init: classifier``)."""
    return (CLS,) if cfg.seg.init == "classifier" else ()


def seg_seed(cfg) -> int:
    """The seed of the segmentation network's training: ``seg.seed``, or the run's ``seed`` when that is null."""
    return cfg.seed if cfg.seg.seed is None else cfg.seg.seed


def train_inputs(cfg) -> tuple[str, ...]:
    """What the segmentation network trains on: SEC's cues come from the maps, CE from the pseudo masks (or the
    ground truth: the fully supervised upper bound reads no stage)."""
    if cfg.seg.loss == "sec":
        return (MAPS, *classifier_init(cfg))
    return (PSEUDO,) * (cfg.seg.masks == "pseudo") + classifier_init(cfg)


def train_settings(cfg) -> dict:
    """What changes the trained network besides its inputs: the seg section (network, schedule, loss; minus inference
    settings), the runtime's numerics and, per source of masks, what picks them."""
    seg = without(cfg.seg, "scales", "flip", "predict_split", "crf_postprocess", "seed")
    if cfg.seg.loss != "sec":
        seg.pop("sec")  # SEC settings cannot change a cross-entropy training
    engine = {k: getattr(cfg.runtime, k) for k in ("precision", "channels_last", "devices")}
    source: dict = {"split": cfg.pseudo.split, "train_split": cfg.data.train_split}
    if cfg.seg.loss == "sec" and cfg.seg.sec.constrain:
        source["crf"] = without(cfg.crf, "workers")
    if cfg.seg.masks == "gt" and cfg.seg.loss != "sec":
        source["data"] = without(cfg.data, "workers", "val_split", "test_split")
    return {"seg": seg, "engine": engine, "source": source, "seed": seg_seed(cfg)}


def predict_settings(cfg) -> dict:
    out = {"scales": cfg.seg.scales, "flip": cfg.seg.flip, "split": split_name(cfg, cfg.seg.predict_split)}
    if cfg.seg.crf_postprocess:
        out["crf"] = without(cfg.crf, "workers")
    return out


def check_train(ctx: RunContext) -> None:
    """Before anything runs: the training split has what the chosen loss needs."""
    cfg = ctx.cfg
    split = ctx.split_name(cfg.pseudo.split)
    samples = ctx.reader.samples(split)
    if cfg.seg.loss == "sec":
        if cfg.seg.masks != "pseudo":
            raise ConfigError("seg.loss=sec trains on localization cues from the maps; it needs seg.masks=pseudo")
        if cfg.pseudo.split not in cfg.maps.splits and split not in cfg.maps.splits:
            raise ConfigError(f"seg.loss=sec reads the maps of '{split}'; add '{cfg.pseudo.split}' to maps.splits")
        if cfg.seg.sec.constrain:
            check_crf_config(cfg.crf)
    elif cfg.seg.masks == "gt" and not any(s.mask is not None for s in samples):
        raise DataError(f"seg.masks=gt: split '{split}' has no ground-truth masks")
    if cfg.seg.init == "classifier":
        differ = [k for k in ("backbone", "output_stride") if getattr(cfg.seg.model, k) != getattr(cfg.model, k)]
        if differ:
            raise ConfigError("seg.init=classifier starts the segmentation network from the classifier's backbone, but "
                              + "; ".join(f"seg.model.{k}={getattr(cfg.seg.model, k)!r} differs from "
                                          f"model.{k}={getattr(cfg.model, k)!r}" for k in differ)
                              + "; set them alike, or seg.init=weights")
    else:
        check_weights(cfg.seg.model, section="seg.model")


def compute_train(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    cfg = ctx.cfg
    split = ctx.split_name(cfg.pseudo.split)
    samples = ctx.reader.samples(split)
    if cfg.seg.loss == "sec":
        folder = inputs[MAPS].dir / split
        missing = [s.id for s in samples if not (folder / f"{s.id}.npz").exists()]
        if missing:
            raise DataError(f"{folder}: no maps for {len(missing)} training image(s): {', '.join(missing[:10])}; add "
                            f"'{cfg.pseudo.split}' to maps.splits")
        samples = [s for s in samples if s.labels]
        masks = SeedCues(folder, ctx.spec, cfg.seg.sec.seed_threshold, cfg.seg.sec.bg_cue_threshold)
    elif cfg.seg.masks == "pseudo":
        pseudo = inputs[PSEUDO]
        folder = pseudo.dir / pseudo.info()["split"]
        check_pseudo_folder(folder, samples)
        masks = PseudoMasks(folder, ctx.spec.num_classes, ctx.spec.ignore_index)
    else:
        samples = [s for s in samples if s.mask is not None]
        masks = GroundTruthMasks(ctx.reader)
    log.info("seg: training DeepLabV3/%s on %d images with %s", cfg.seg.model.backbone, len(samples),
             "SEC losses" if cfg.seg.loss == "sec" else f"{cfg.seg.masks} masks")
    result = fit(SegTask(cfg, samples, ctx.spec, masks, backbone_from=backbone_init(inputs)), stage.dir,
                 ctx.after_epoch)
    return {"role": "seg", "images": len(samples), "masks": cfg.seg.masks, "loss": cfg.seg.loss,
            "epochs": len(result["history"]), "train_seconds": round(sum(r["seconds"] for r in result["history"]), 1)}


def backbone_init(inputs: dict) -> Path | None:
    """The classifier checkpoint the segmentation network's backbone starts from, if the stage reads one."""
    return inputs[CLS].dir / "model.pt" if CLS in inputs else None


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


def load_segmenter(ctx: RunContext, stage: Stage) -> DeepLabV3:
    state = load_checkpoint(stage.dir / "model.pt", seg_meta(ctx.cfg.seg.model, ctx.spec.classes))
    # the checkpoint holds every weight: don't read or fetch initial ones just to overwrite them
    untrained = dataclasses.replace(ctx.cfg.seg.model, pretrained=False, weights_file=None)
    model = DeepLabV3(untrained, ctx.spec.num_classes)
    model.load_state_dict(state["model"])
    return model.eval()


def check_predict(ctx: RunContext) -> None:
    cfg = ctx.cfg
    if cfg.seg.crf_postprocess:
        check_crf_config(cfg.crf)
    split = ctx.split_name(cfg.seg.predict_split)
    check_images(ctx, ctx.reader.samples(split), f"split '{split}' (seg.predict_split)")


def segmenter_on_device(ctx: RunContext, stage: Stage) -> tuple[DeepLabV3, torch.device]:
    """The trained network of a segmentation stage, in eval mode on the inference device (channels_last where the
    runtime asks for it)."""
    device = maps_stage.inference_device(ctx.cfg)
    model = load_segmenter(ctx, stage).to(device)
    if ctx.cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, device


def downscale_to_fit(x: torch.Tensor, what: str, ids=()) -> torch.Tensor:
    """``x`` (B, 3, H, W), downscaled with a warning when an image is over :data:`MAX_PREDICT_PIXELS`."""
    h, w = x.shape[-2:]
    if h * w <= MAX_PREDICT_PIXELS:
        return x
    f = (MAX_PREDICT_PIXELS / (h * w)) ** 0.5
    x = F.interpolate(x, size=(int(h * f), int(w * f)), mode="bilinear", align_corners=False)
    log.warning("%s: %d image(s) of %dx%d predicted at %dx%d to fit memory, upscaled back (%s)", what, len(x), w, h,
                x.shape[-1], x.shape[-2], ", ".join(ids))
    return x


def predict_tensor(model, x: torch.Tensor, scales, flip: bool, runtime, what: str = "", ids=()) -> tuple[torch.Tensor, bool]:
    """Softmax of ``x`` (B, 3, H, W, normalised, on the model's device) averaged over ``scales`` (and mirrors), float32
    (B, C, H, W) on that device; bf16 autocast where ``runtime.precision`` asks for it, channels_last where
    ``runtime.channels_last`` does; an image over :data:`MAX_PREDICT_PIXELS` is predicted downscaled (with a warning)
    and upscaled back. Also returns whether that happened."""
    h, w = x.shape[-2:]
    x = downscale_to_fit(x, what, ids)
    if runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = runtime_autocast(x.device, runtime.precision)
    with torch.no_grad(), autocast:
        probs = predict_probs(model, x, scales, flip)
    if probs.shape[-2:] != (h, w):
        probs = F.interpolate(probs, size=(h, w), mode="bilinear", align_corners=False)
    return probs.float(), x.shape[-2:] != (h, w)


def predict_batches(ctx: RunContext, model, device, samples: list[Sample], indices, scales, flip: bool,
                    what: str, sharded: bool = False) -> Iterator[tuple[dict, np.ndarray]]:
    """``(batch, probs)`` for the images ``samples[i]``, ``i`` in ``indices``: batches of equal-sized images, the
    softmax of :func:`predict_tensor` as float32 (B, C, H, W) on the CPU. ``batch["downscaled"]`` says whether the
    images were predicted downscaled. ``sharded``: under torchrun, only this process's share of the batches one
    process would form (:mod:`wsss.engine.shard`), so that every prediction equals one process's."""
    cfg = ctx.cfg
    batches = maps_stage.size_batches(samples, indices, cfg.maps.batch_size)
    if sharded:
        batches = shard.shard(batches)
    loader = DataLoader(InferenceDataset(samples, ctx.spec), batch_sampler=batches, num_workers=loader_workers(cfg.data.workers),
                        collate_fn=stack)
    bar = tqdm(total=sum(map(len, batches)), desc=what, leave=False, disable=not cfg.runtime.progress,
               mininterval=1.0)
    for batch in loader:
        probs, batch["downscaled"] = predict_tensor(model, batch["image"].to(device), scales, flip, cfg.runtime, what,
                                                    batch["id"])
        yield batch, probs.cpu().numpy()
        bar.update(len(batch["id"]))
    bar.close()


def compute_predict(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    """Segment ``seg.predict_split`` with the network alone (image labels are never read): batches of equal-sized
    images on the inference device, bf16 autocast where ``runtime.precision`` asks for it."""
    cfg = ctx.cfg
    split = ctx.split_name(cfg.seg.predict_split)
    model, device = segmenter_on_device(ctx, inputs[SEG])
    out = stage.dir / split
    palette = ctx.spec.palette_bytes()
    samples = ctx.reader.samples(split)
    # under torchrun (wsss.engine.shard) every process knows what is left before any file is written, then predicts
    # its share of the batches (predict_batches)
    todo = shard.undone(range(len(samples)), lambda i: (out / f"{samples[i].id}.png").exists())
    t0 = time.perf_counter()
    done = downscaled = 0
    for batch, probs in predict_batches(ctx, model, device, samples, todo, cfg.seg.scales, cfg.seg.flip,
                                        f"predict {split}", sharded=True):
        downscaled += len(batch["id"]) if batch["downscaled"] else 0
        for b, sample_id in enumerate(batch["id"]):
            p = probs[b]
            if cfg.seg.crf_postprocess:
                p = dense_crf(load_image(samples[batch["index"][b]].image), p, cfg.crf)
            save_mask_png(out / f"{sample_id}.png", p.argmax(0).astype(np.uint8), palette)
        done += len(batch["id"])
    done, downscaled = (sum(c) for c in zip(*shard.gather((done, downscaled)), strict=True))  # every share written
    elapsed = time.perf_counter() - t0
    maps_stage.verify_complete(samples, out, ".png", "prediction")
    return {"split": split, "images": len(samples), "downscaled": downscaled, "crf_postprocess": cfg.seg.crf_postprocess,
            "device": str(device), "images_per_s": round(done / max(elapsed, 1e-9), 2)}
