"""Stage 2: localization maps of every image of the configured splits -> ``maps/<split>/<id>.npz``.

Images are batched by size (whole images, no padding, so maps are not distorted), loaded by worker processes, and
localized for all their positive classes in one pass per view. Files already written under the same stage key are
kept, so a killed extraction resumes where it stopped. An unreadable image is reported with its file name after the
other images are done; the stage is then left incomplete.
"""

from __future__ import annotations

import logging
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.data.datasets import InferenceDataset, batches_by_size, stack
from wsss.data.io import image_size
from wsss.engine.checkpoint import load_checkpoint
from wsss.engine.train import model_meta
from wsss.errors import DataError
from wsss.localize import build_localizer, multiscale_maps, save_maps
from wsss.methods import build_method
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


def load_classifier(ctx: RunContext):
    cfg = ctx.cfg
    cls_stage = train_cls.run(ctx)
    state = load_checkpoint(cls_stage.dir / "model.pt", model_meta(cfg, ctx.spec))
    model = build_method(cfg.method.name, cfg.method.options).build_model(
        _no_download(cfg.model), ctx.spec.num_fg)
    model.load_state_dict(state["model"])
    return model.eval()


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
    cfg = ctx.cfg
    m = cfg.maps
    split = ctx.split_name(split_role)
    out_dir = stage.dir / split
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = ctx.reader.samples(split)
    todo = [i for i, s in enumerate(samples) if not (out_dir / f"{s.id}.npz").exists()]
    if not todo:
        return {"images": len(samples), "computed": 0}
    sizes = [_size_or_unique(samples[i].image, i) for i in todo]
    batches = [[todo[j] for j in b] for b in batches_by_size(sizes, m.batch_size)]
    loader = DataLoader(_Safe(InferenceDataset(samples, ctx.spec)), batch_sampler=batches,
                        num_workers=cfg.data.workers, collate_fn=_collate)
    localizer = build_localizer(m.localizer, m.target_layer)
    fg_ids = torch.tensor(ctx.spec.fg_ids)
    errors: list[str] = []
    t0 = time.perf_counter()
    done = 0
    device = next(model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=m.precision == "bf16")
    bar = tqdm(total=len(todo), desc=f"maps {m.localizer} {split}", leave=False, disable=not cfg.train.progress,
               mininterval=1.0)
    for item in loader:
        errors += item["errors"]
        batch = item["batch"]
        bar.update(len(item["errors"]))
        if batch is None:
            continue
        x = batch["image"].to(device)
        scores = None
        if m.labels == "pred":
            with torch.no_grad(), autocast:
                scores = model(x)["logits"].float()
        idx, valid = class_indices(batch["labels"], None if scores is None else scores.cpu(), m.labels,
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
        raise DataError(f"maps: {len(errors)} image(s) of split '{split}' could not be read (maps of the other "
                        f"{done} are saved; fix or remove these and rerun):\n  " + "\n  ".join(errors))
    return {"images": len(samples), "computed": done, "seconds": round(elapsed, 2),
            "images_per_s": round(done / max(elapsed, 1e-9), 2)}


def run(ctx: RunContext) -> Stage:
    stage = Stage(ctx.run_dir, "maps", ctx.maps_key())
    if stage.complete:
        log.info("maps: reusing %s (config unchanged)", stage.dir)
        return stage
    resumed = stage.open()
    model = load_classifier(ctx).to(inference_device(ctx.cfg))
    if ctx.cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    info = {}
    for role in ctx.cfg.maps.splits:
        info[ctx.split_name(role)] = extract_split(ctx, model, role, stage)
        log.info("maps: %s %s", ctx.split_name(role), info[ctx.split_name(role)])
    stage.finish(splits=info, resumed=resumed)
    return stage


def iter_maps(stage: Stage, ctx: RunContext, split: str):
    """(sample, maps dict) for every image of a split, in split order."""
    from wsss.localize import load_maps

    for s in ctx.reader.samples(split):
        yield s, load_maps(stage.dir / split / f"{s.id}.npz")


__all__ = ["iter_maps", "load_classifier", "run"]
