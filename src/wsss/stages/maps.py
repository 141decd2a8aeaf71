"""Stage 2: localization maps of every image of the configured splits -> ``maps/<split>/<id>.npz``.

Images are batched by size (whole images, no padding, so maps are not distorted), loaded by worker processes, and
localized for all their positive classes in one pass per view. Files already written under the same stage key are
kept, so a killed extraction resumes where it stopped. An unreadable image is reported with its file name after the
other images are done; the stage is then left incomplete.

Adversarial Erasing (``method.name=adv_erase``) has one classifier per round: each split goes through the rounds'
chain (round 1 maps the original image, round k the image erased where rounds < k found its classes; per-round files
under ``maps/rounds/<split>/r<k>/``), and ``maps/<split>/`` holds the per-class max of the rounds' maps. The training
split with image-level labels reuses the maps the classifier stage mined on exactly those inputs.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.data.datasets import ErasedInputs, InferenceDataset, batches_by_size, stack
from wsss.data.io import image_size
from wsss.engine.checkpoint import load_checkpoint
from wsss.engine.train import model_meta
from wsss.errors import DataError
from wsss.localize import build_localizer, load_maps, multiscale_maps, save_maps
from wsss.methods import build_method
from wsss.methods.adv_erase import check_maps_config, union_maps
from wsss.runs import Stage
from wsss.stages import train_cls
from wsss.stages.context import RunContext

log = logging.getLogger("wsss.stages")


class _Safe(torch.utils.data.Dataset):
    """Turns a load error into a record, so one bad image does not abort the others."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        try:
            return self.ds[i]
        except DataError as e:
            return {"error": str(e), "index": i}


def _collate(items):
    good = [it for it in items if "error" not in it]
    return {"batch": stack(good) if good else None, "errors": [it["error"] for it in items if "error" in it]}


def load_classifier(ctx: RunContext, checkpoint=None):
    """The trained classifier (``checkpoint``: a ``model.pt``; default: train it if needed and load the stage's)."""
    cfg = ctx.cfg
    if checkpoint is None:
        checkpoint = train_cls.run(ctx).dir / "model.pt"
    state = load_checkpoint(checkpoint, model_meta(cfg, ctx.spec))
    method = build_method(cfg.method.name, cfg.method.options, has_background=ctx.spec.background is not None)
    model = method.build_model(_no_download(cfg.model), ctx.spec.num_fg)
    model.load_state_dict(state["model"])
    return model.eval()


def inference_model(ctx: RunContext, checkpoint=None):
    """:func:`load_classifier` on the inference device, in the training memory format."""
    model = load_classifier(ctx, checkpoint).to(inference_device(ctx.cfg))
    if ctx.cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_device(cfg) -> torch.device:
    wants_gpu = cfg.train.accelerator in ("auto", "cuda", "gpu")
    return torch.device("cuda" if wants_gpu and torch.cuda.is_available() else "cpu")


def _no_download(model_cfg):
    import dataclasses

    # the checkpoint holds every weight: don't fetch ImageNet weights just to overwrite them
    return dataclasses.replace(model_cfg, pretrained=False, weights_file=None)


def class_indices(labels: torch.Tensor, scores: torch.Tensor | None, mode: str, threshold: float):
    """Per image, the classifier-output indices to localize: (B, P) padded with the first index, and a (B, P)
    validity mask."""
    chosen = labels > 0 if mode == "gt" else torch.sigmoid(scores) > threshold
    counts = chosen.sum(1)
    p = max(int(counts.max()), 1)
    idx = torch.zeros(len(labels), p, dtype=torch.long)
    valid = torch.zeros(len(labels), p, dtype=torch.bool)
    for b in range(len(labels)):
        c = chosen[b].nonzero().flatten()
        idx[b, : len(c)] = c
        valid[b, : len(c)] = True
    return idx, valid


def _size_or_unique(path, i: int) -> tuple[int, int]:
    """Header size for batching; an unreadable header gets a batch of its own, whose load then reports the error."""
    try:
        return image_size(path)
    except DataError:
        return (-1, i)


def extract_split(ctx: RunContext, model, split_role: str, stage: Stage) -> dict:
    split = ctx.split_name(split_role)
    return extract(ctx, model, ctx.reader.samples(split), stage.dir / split, ctx.cfg.maps.labels, what=f"split '{split}'")


def extract(ctx: RunContext, model, samples, out_dir, labels: str, erase: ErasedInputs | None = None,
            what: str = "") -> dict:
    """Maps of ``samples`` -> ``out_dir/<id>.npz`` (existing files are kept). ``labels``: gt or pred (which classes
    get maps); ``erase``: erase masks applied to the images first (Adversarial Erasing)."""
    cfg = ctx.cfg
    m = cfg.maps
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [i for i, s in enumerate(samples) if not (out_dir / f"{s.id}.npz").exists()]
    if not todo:
        return {"images": len(samples), "computed": 0}
    sizes = [_size_or_unique(samples[i].image, i) for i in todo]
    batches = [[todo[j] for j in b] for b in batches_by_size(sizes, m.batch_size)]
    loader = DataLoader(_Safe(InferenceDataset(samples, ctx.spec, erase)), batch_sampler=batches,
                        num_workers=cfg.data.workers, collate_fn=_collate)
    localizer = build_localizer(m.localizer, m.target_layer)
    fg_ids = torch.tensor(ctx.spec.fg_ids)
    errors: list[str] = []
    t0 = time.perf_counter()
    done = 0
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=m.precision == "bf16")
    bar = tqdm(total=len(todo), desc=f"maps {m.localizer} {what}", leave=False, disable=not cfg.train.progress,
               mininterval=1.0)
    for item in loader:
        errors += item["errors"]
        batch = item["batch"]
        bar.update(len(item["errors"]))
        if batch is None:
            continue
        x = batch["image"].to(device)
        scores = None
        if labels == "pred":
            with torch.no_grad(), autocast:
                scores = model(x)["logits"].float()
        idx, valid = class_indices(batch["labels"], None if scores is None else scores.cpu(), labels,
                                   m.pred_threshold)
        idx = idx.to(device)
        with autocast:
            maps, logits = multiscale_maps(model, localizer, x, idx, m.scales, m.flip, m.aggregate, m.normalize,
                                           channels_last=cfg.train.channels_last)
        maps, logits, idx = maps.cpu(), logits.cpu(), idx.cpu()
        for b in range(len(x)):
            keep = valid[b]
            save_maps(out_dir / f"{batch['id'][b]}.npz", maps[b][keep].numpy(),
                      fg_ids[idx[b][keep]].numpy(), logits[b].numpy())
        done += len(x)
        bar.update(len(x))
    bar.close()
    elapsed = time.perf_counter() - t0
    if errors:
        raise DataError(f"maps: {len(errors)} image(s) of {what} could not be read (maps of the other "
                        f"{done} are saved; fix or remove these and rerun):\n  " + "\n  ".join(errors))
    return {"images": len(samples), "computed": done, "seconds": round(elapsed, 2),
            "images_per_s": round(done / max(elapsed, 1e-9), 2)}


def run(ctx: RunContext) -> Stage:
    stage = Stage(ctx.run_dir, "maps", ctx.maps_key())
    if stage.complete:
        log.info("maps: reusing %s (config unchanged)", stage.dir)
        return stage
    if ctx.erasing is not None:
        check_maps_config(ctx.cfg.maps)  # before the rounds, which take hours
        rounds = train_cls.train_rounds(ctx)
        resumed = stage.open()
        info = {ctx.split_name(role): _union_split(ctx, rounds, role, stage) for role in ctx.cfg.maps.splits}
        stage.finish(splits=info, resumed=resumed, rounds=len(rounds))
        return stage
    resumed = stage.open()
    model = inference_model(ctx)
    info = {}
    for role in ctx.cfg.maps.splits:
        info[ctx.split_name(role)] = extract_split(ctx, model, role, stage)
        log.info("maps: %s %s", ctx.split_name(role), info[ctx.split_name(role)])
    stage.finish(splits=info, resumed=resumed)
    return stage


def _with_classes_of(samples, maps_dir):
    """``samples`` whose labels are the classes of their maps in ``maps_dir`` (round 1's choice of classes)."""
    out = []
    for s in samples:
        with np.load(maps_dir / f"{s.id}.npz", allow_pickle=False) as z:
            out.append(dataclasses.replace(s, labels=tuple(int(c) for c in z["classes"])))
    return out


def erase_chain(ctx: RunContext, samples, models, out_dir, labels: str, fill) -> list[Path]:
    """Adversarial Erasing's rounds on images no classifier trained on: round 1 maps the images, round k the images
    erased where the maps of rounds < k exceed the erase threshold. ``models``: one checkpoint per round. Returns the
    per-round map folders ``out_dir/r<k>/maps``."""
    dirs: list[Path] = []
    for k, checkpoint in enumerate(models, 1):
        rd = out_dir / f"r{k}"
        erase = None
        if k > 1:
            train_cls.write_erase_masks(samples, dirs[-1], out_dir / f"r{k - 1}" / "erase" if k > 2 else None,
                                        rd / "erase", ctx.erasing.erase_threshold)
            erase = ErasedInputs(rd / "erase", fill)
        todo = [s for s in samples if not (rd / "maps" / f"{s.id}.npz").exists()]
        if todo:
            round_samples = todo if k == 1 or labels == "gt" else _with_classes_of(todo, dirs[0])
            model = inference_model(ctx, checkpoint)
            extract(ctx, model, round_samples, rd / "maps", labels if k == 1 else "gt", erase, what=f"round {k}")
            del model
        dirs.append(rd / "maps")
    return dirs


def write_union(samples, round_dirs, out_dir) -> int:
    """``out_dir/<id>.npz`` = per-class max of the rounds' maps; scores are round 1's (the unerased image)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    n = 0
    for s in samples:
        out = out_dir / f"{s.id}.npz"
        if out.exists():
            continue
        parts = [load_maps(d / f"{s.id}.npz") for d in round_dirs]
        maps, classes = union_maps([(p["maps"], p["classes"]) for p in parts])
        save_maps(out, maps, classes, parts[0]["scores"])
        n += 1
    return n


def _union_split(ctx: RunContext, rounds, role: str, stage: Stage) -> dict:
    cfg = ctx.cfg
    split = ctx.split_name(role)
    samples = ctx.reader.samples(split)
    t0 = time.perf_counter()
    reuse = split == ctx.split_name("train") and cfg.maps.labels == "gt"
    if reuse:
        round_dirs = [mined.dir for _, mined in rounds]
    else:
        fill = train_cls.fill_colour(rounds)
        round_dirs = erase_chain(ctx, samples, [r.dir / "model.pt" for r, _ in rounds], stage.dir / "rounds" / split,
                                 cfg.maps.labels, fill)
    computed = write_union(samples, round_dirs, stage.dir / split)
    elapsed = time.perf_counter() - t0
    info = {"images": len(samples), "computed": computed, "rounds": len(rounds), "reused_mined_maps": reuse,
            "seconds": round(elapsed, 2)}
    log.info("maps: %s %s", split, info)
    return info


def iter_maps(stage: Stage, ctx: RunContext, split: str):
    """(sample, maps dict) for every image of a split, in split order."""
    for s in ctx.reader.samples(split):
        yield s, load_maps(stage.dir / split / f"{s.id}.npz")


__all__ = ["erase_chain", "extract", "inference_model", "iter_maps", "load_classifier", "run", "write_union"]
