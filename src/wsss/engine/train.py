"""The shared classifier-training loop (Lightning Fabric): devices, precision, DDP, checkpoints, resume, progress.

Every method trains through :func:`fit_classifier`; a method only supplies its model, batch transform and loss.

- ``train.devices > 1`` runs DDP (``ddp_spawn``; on CPU through gloo). Under ``torchrun`` the processes already
  exist and Fabric joins them. The global batch stays ``train.batch_size`` whatever the number of processes.
- A checkpoint (model, optimizer, epoch, history) is written atomically after every epoch; rerunning the stage
  resumes from it. Batches and augmentations are a pure function of (seed, epoch), so the resumed run sees exactly
  the batches of an uninterrupted one.
- ``train.precision=bf16`` autocasts to bfloat16 (Fabric ``bf16-mixed``); fp32 is deterministic.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.config.schema import Config
from wsss.data.datasets import ClassificationDataset, SeededSampler
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import TrainTransform
from wsss.engine.checkpoint import load_checkpoint, save_checkpoint
from wsss.methods import build_method

log = logging.getLogger("wsss.train")


def model_meta(cfg: Config, spec: DatasetSpec) -> dict:
    """What a classifier checkpoint must match to be loaded into the model a config builds."""
    return {
        "backbone": cfg.model.backbone,
        "output_stride": cfg.model.output_stride,
        "method": cfg.method.name,
        "classes": list(spec.fg_names),
    }


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def make_fabric(cfg: Config) -> Fabric:
    t = cfg.train
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = "auto"
    if t.devices > 1:
        strategy = "ddp" if _under_torchrun() else "ddp_spawn"
    precision = "bf16-mixed" if t.precision == "bf16" else "32-true"
    return Fabric(accelerator=accelerator, devices=t.devices, strategy=strategy, precision=precision)


def fit_classifier(
    cfg: Config,
    samples: list[Sample],
    spec: DatasetSpec,
    out_dir: Path,
    after_epoch: Callable[[int], None] | None = None,
) -> dict:
    """Train (or resume) the classifier of ``cfg.method`` on ``samples``; writes ``out_dir/model.pt``."""
    fabric = make_fabric(cfg)
    # a plain object: Fabric's spawn launcher walks dataclass arguments and refuses frozen ones
    return fabric.launch(_fit, _Job(cfg, samples, spec, Path(out_dir), after_epoch))


class _Job:
    def __init__(self, cfg, samples, spec, out_dir, after_epoch):
        self.cfg, self.samples, self.spec, self.out_dir, self.after_epoch = cfg, samples, spec, out_dir, after_epoch


def _poly(it: int, total: int, power: float) -> float:
    return (1 - it / max(total, 1)) ** power if power > 0 else 1.0


def _fit(fabric: Fabric, job: _Job) -> dict:
    cfg, samples, spec, out_dir, after_epoch = job.cfg, job.samples, job.spec, job.out_dir, job.after_epoch
    t = cfg.train
    world, rank = fabric.world_size, fabric.global_rank
    if fabric.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fabric.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg.method.name, cfg.method.options)
    model = method.build_model(cfg.model, spec.num_fg)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(t.lr, t.head_lr_mult), lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    meta = model_meta(cfg, spec)
    start_epoch, history = 0, []
    last = out_dir / "last.ckpt"
    if last.exists():
        state = load_checkpoint(last, meta)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]
        if rank == 0:
            log.info("resuming %s from epoch %d", out_dir, start_epoch)
    raw_model = model
    model, optimizer = fabric.setup(model, optimizer)

    sampler = SeededSampler(len(samples), cfg.seed, rank, world)
    per_process = max(1, t.batch_size // world)
    dataset = ClassificationDataset(samples, spec, TrainTransform(t.crop_size, t.scale_range, t.hflip,
                                                                  spec.ignore_index))
    loader = DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=cfg.data.workers,
                        persistent_workers=cfg.data.workers > 0, drop_last=len(sampler) >= per_process)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * t.epochs
    generator = torch.Generator()

    for epoch in range(start_epoch, t.epochs):
        sampler.set_epoch(epoch)
        generator.manual_seed(cfg.seed * 7919 + epoch)
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, parts_sum = torch.zeros(()), 0, {}
        bar = tqdm(loader, desc=f"train {cfg.method.name} epoch {epoch + 1}/{t.epochs}", leave=False,
                   disable=not t.progress or rank != 0, mininterval=1.0)
        for step, batch in enumerate(bar):
            it = epoch * steps_per_epoch + step
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * _poly(it, total, t.poly_power)
            batch = method.transform_batch(batch, generator)
            x = batch["image"]
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            loss, parts = method.loss(out, batch)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"training loss became {float(loss.detach())} at epoch {epoch + 1}, step {step}; "
                                         "lower train.lr or use train.precision=fp32")
            n = x.shape[0]
            loss_sum += loss.detach().float().cpu() * n
            seen += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        stats = fabric.all_reduce(torch.tensor([float(loss_sum), float(seen)]), reduce_op="sum")
        elapsed = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "loss": float(stats[0] / max(stats[1], 1)),
            **{k: v / max(seen, 1) for k, v in parts_sum.items()},
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(elapsed, 2),
            "images_per_s": round(float(stats[1]) / elapsed, 2),
        }
        history.append(record)
        if rank == 0:
            log.info("epoch %d/%d loss %.4f (%.1f s, %.1f img/s)", epoch + 1, t.epochs, record["loss"], elapsed,
                     record["images_per_s"])
            save_checkpoint(last, {"meta": meta, "model": raw_model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "epoch": epoch + 1, "history": history})
            with open(out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        fabric.barrier()
        if after_epoch is not None:
            after_epoch(epoch + 1)

    if rank == 0:
        save_checkpoint(out_dir / "model.pt", {"meta": meta, "model": raw_model.state_dict()})
    fabric.barrier()
    return {"history": history, "world_size": world, "images": len(samples)}
