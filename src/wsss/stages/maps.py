"""Stage 2: localization maps of every image of the configured splits -> ``maps/<split>/<id>.npz``.

Images are batched by size (whole images, no padding, so maps are not distorted), loaded by worker processes, and
localized for all their positive classes in one pass per view, on the accelerator when there is one. Files already
written under the same stage key are kept, so a killed extraction resumes where it stopped; a kept file that does not
load (damaged outside a normal kill) is recomputed, with a warning naming it. An unreadable image is reported with its
file name after the other images are done; the stage is then left incomplete. ``check`` decodes every image of the
splits and builds the localizer before the classifier trains.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.config.runtime import autocast as runtime_autocast
from wsss.data.datasets import ImageFilter, InferenceDataset, batches_by_size, loader_workers, stack
from wsss.data.io import image_size
from wsss.engine import shard
from wsss.engine.checkpoint import load_checkpoint
from wsss.engine.train import model_meta
from wsss.errors import DataError
from wsss.layout import CLS
from wsss.localize import build_localizer, load_maps, multiscale_maps, save_maps
from wsss.methods import build_method
from wsss.runs import Stage
from wsss.stages.context import RunContext
from wsss.stages.train_cls import check_images

log = logging.getLogger("wsss.stages")


class SafeItems(torch.utils.data.Dataset):
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


def collate_with_errors(items):
    """``{"batch": the stacked good items or None, "errors": the messages of the others}``."""
    good = [it for it in items if "error" not in it]
    return {"batch": stack(good) if good else None, "errors": [it["error"] for it in items if "error" in it]}


def load_classifier(ctx: RunContext, checkpoint):
    """The trained classifier of ``checkpoint`` (a ``model.pt``)."""
    cfg = ctx.cfg
    state = load_checkpoint(checkpoint, model_meta(cfg, ctx.spec))
    method = build_method(cfg.method.name, cfg.method.options, has_background=ctx.spec.background is not None)
    model = method.build_model(_no_download(cfg.model), ctx.spec.num_fg)
    model.load_state_dict(state["model"])
    return model.eval()


def inference_model(ctx: RunContext, checkpoint):
    """:func:`load_classifier` on the inference device, in the training memory format."""
    model = load_classifier(ctx, checkpoint).to(inference_device(ctx.cfg))
    if ctx.cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def inference_device(cfg) -> torch.device:
    wants_gpu = cfg.runtime.accelerator in ("auto", "cuda", "gpu")
    if not (wants_gpu and torch.cuda.is_available()):
        return torch.device("cpu")
    # under torchrun each process on the GPU of its LOCAL_RANK (wsss.engine.shard)
    return torch.device("cuda", shard.local_rank()) if shard.world() > 1 else torch.device("cuda")


def _no_download(model_cfg):
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


def size_batches(samples, indices, batch_size: int) -> list[list[int]]:
    """Batches of ``indices`` (into ``samples``) whose images have one size (read from the headers), so whole images
    stack without padding; an unreadable header gets a batch of its own, whose load then reports the error."""

    def size(i: int) -> tuple[int, int]:
        try:
            return image_size(samples[i].image)
        except DataError:
            return (-1, i)

    indices = list(indices)
    return [[indices[j] for j in b] for b in batches_by_size([size(i) for i in indices], batch_size)]


def extract_split(ctx: RunContext, model, split_role: str, stage: Stage) -> dict:
    split = ctx.split_name(split_role)
    return extract(ctx, model, ctx.reader.samples(split), stage.dir / split, ctx.cfg.maps.labels, what=f"split '{split}'")


def usable_map_file(path: Path) -> bool:
    """Whether a map file kept from an earlier, interrupted extraction loads; a damaged one is deleted (it is
    recomputed) with a warning naming it."""
    if not path.exists():
        return False
    try:
        load_maps(path)
        return True
    except DataError as e:
        log.warning("maps: %s; recomputing it", e)
        path.unlink()
        return False


def extract(ctx: RunContext, model, samples, out_dir, labels: str, image_filter: ImageFilter | None = None,
            what: str = "") -> dict:
    """Maps of ``samples`` -> ``out_dir/<id>.npz`` (existing files that load are kept). ``labels``: gt or pred
    (which classes get maps); ``image_filter``: applied to each image before the model sees it (a recipe's change of
    the inputs). Under torchrun each process maps its share (:func:`wsss.engine.shard.shard`) and the counts are
    every process's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # under torchrun (wsss.engine.shard) each process looks at its share of the kept files, then every process
    # knows what is left (no file is written before that) and maps its share of the same batches one process would
    # form, so that every map equals one process's, bit for bit
    looked = [i for i in shard.shard(range(len(samples))) if not usable_map_file(out_dir / f"{samples[i].id}.npz")]
    left = sorted(i for part in shard.gather(looked) for i in part)
    batches = shard.shard(size_batches(samples, left, ctx.cfg.maps.batch_size))
    todo = [i for b in batches for i in b]
    t0 = time.perf_counter()
    mine_out = _extract(ctx, model, samples, batches, out_dir, labels, image_filter, what) if todo else ([], 0)
    # every process's files are written once this returns, and every process raises the same error
    everyone = shard.gather((len(todo), *mine_out))
    elapsed = time.perf_counter() - t0
    errors = [e for _, errs, _ in everyone for e in errs]
    done = sum(n for _, _, n in everyone)
    if errors:
        raise DataError(f"maps: {len(errors)} image(s) of {what} could not be read (maps of the other "
                        f"{done} are saved; fix or remove these and rerun):\n  " + "\n  ".join(errors))
    if not any(n for n, _, _ in everyone):
        return {"images": len(samples), "computed": 0}
    return {"images": len(samples), "computed": done, "seconds": round(elapsed, 2),
            "images_per_s": round(done / max(elapsed, 1e-9), 2)}


def _extract(ctx: RunContext, model, samples, batches: list[list[int]], out_dir, labels: str,
             image_filter: ImageFilter | None, what: str) -> tuple[list[str], int]:
    """The maps of the images ``samples[i]`` of ``batches`` (lists of indices); returns the messages of the images
    that could not be read and how many maps were written."""
    cfg = ctx.cfg
    m = cfg.maps
    loader = DataLoader(SafeItems(InferenceDataset(samples, ctx.spec, image_filter)), batch_sampler=batches,
                        num_workers=loader_workers(cfg.data.workers), collate_fn=collate_with_errors)
    localizer = build_localizer(m.localizer, m.target_layer)
    fg_ids = torch.tensor(ctx.spec.fg_ids)
    errors: list[str] = []
    done = 0
    device = next(model.parameters()).device
    autocast = runtime_autocast(device, cfg.runtime.precision)
    bar = tqdm(total=sum(map(len, batches)), desc=f"maps {m.localizer} {what}", leave=False, disable=not cfg.runtime.progress,
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
                                           channels_last=cfg.runtime.channels_last)
        maps, logits, idx = maps.cpu(), logits.cpu(), idx.cpu()
        for b in range(len(x)):
            keep = valid[b]
            save_maps(out_dir / f"{batch['id'][b]}.npz", maps[b][keep].numpy(),
                      fg_ids[idx[b][keep]].numpy(), logits[b].numpy())
        done += len(x)
        bar.update(len(x))
    bar.close()
    return errors, done


def check(ctx: RunContext) -> None:
    """Before the classifier trains: the localizer exists for these settings and every image of the splits decodes."""
    m = ctx.cfg.maps
    build_localizer(m.localizer, m.target_layer)
    for role in m.splits:
        split = ctx.split_name(role)
        check_images(ctx, ctx.reader.samples(split), f"split '{split}'")  # files already decoded are skipped


def covers(ctx: RunContext, stage: Stage) -> bool:
    """A complete maps variant covers this config when it holds every split of ``maps.splits``."""
    have = stage.info().get("splits") or {}
    return all(ctx.split_name(role) in have for role in ctx.cfg.maps.splits)


def compute(ctx: RunContext, inputs: dict, stage: Stage) -> dict:
    """The maps of every split of ``maps.splits`` not mapped yet; the splits a variant already holds keep their
    record (a variant is extended when ``maps.splits`` grows)."""
    model = inference_model(ctx, inputs[CLS].dir / "model.pt")
    info = dict(stage.info().get("splits") or {})
    for role in ctx.cfg.maps.splits:
        split = ctx.split_name(role)
        info[split] = extract_split(ctx, model, role, stage)
        log.info("maps: %s %s", split, info[split])
        verify_complete(ctx.reader.samples(split), stage.dir / split)
    return {"splits": info}


def verify_complete(samples, folder: Path, suffix: str = ".npz", what: str = "map file") -> None:
    """Before a per-image stage is marked done (by rank 0 under torchrun, once every process has written its share):
    every image has its file (files written here are complete by their atomic rename; map files kept from an
    interrupted run were loaded before being kept)."""
    missing = [s.id for s in samples if not (folder / f"{s.id}{suffix}").is_file()]
    if missing:
        raise DataError(f"{folder}: no {what} for {len(missing)} image(s) ({', '.join(missing[:10])}); the stage is "
                        "left unfinished, rerun to complete it")


def iter_maps(stage: Stage, ctx: RunContext, split: str, samples=None):
    """(sample, maps dict) for every image of a split (or of ``samples`` of it), in split order."""
    for s in ctx.reader.samples(split) if samples is None else samples:
        yield s, load_maps(stage.dir / split / f"{s.id}.npz")


__all__ = ["SafeItems", "check", "collate_with_errors", "compute", "covers", "extract", "size_batches", "inference_model",
           "iter_maps", "load_classifier", "usable_map_file"]
