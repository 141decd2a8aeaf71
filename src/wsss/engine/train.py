"""The shared training loop (Lightning Fabric): devices, precision, DDP, checkpoints, resume, progress.

Every classifier method and the segmentation network train through :func:`fit`; a :class:`TrainTask` only supplies
its model, dataset, batch transform and loss (a classifier method supplies those through :class:`ClassifierTask`).

- ``runtime.devices > 1`` runs DDP (``ddp_spawn``; on CPU through gloo). Under ``torchrun`` the processes already
  exist and Fabric joins them. The global batch stays ``batch_size`` whatever the number of processes; the logged
  loss and its parts are means over all processes' images, and the spawned processes' log records reach this
  process's handlers.
- A checkpoint (model, optimizer, epoch, history) is written atomically after every epoch; rerunning the stage
  resumes from it at the start of the epoch after it. Batches, augmentations, dropout and the loader workers' random
  state are a pure function of (seed, epoch, rank), so in fp32 a resumed run ends with the same weights, bit for bit,
  as an uninterrupted one.
- ``runtime.precision=bf16`` autocasts to bfloat16 (Fabric ``bf16-mixed``); fp32 is deterministic.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from lightning_fabric import Fabric
from torch.utils.data import DataLoader
from tqdm import tqdm

from wsss.config.schema import Config
from wsss.data.datasets import ClassificationDataset, SeededSampler, loader_workers
from wsss.data.readers import Sample
from wsss.data.spec import DatasetSpec
from wsss.data.transforms import TrainTransform
from wsss.engine import shard
from wsss.engine.checkpoint import load_checkpoint, save_checkpoint
from wsss.methods import build_method
from wsss.saliency import StoredSaliency, build_source

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
    t = cfg.runtime
    accelerator = t.accelerator
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    strategy = "auto"
    if t.devices > 1:
        strategy = "ddp" if _under_torchrun() else "ddp_spawn"
    precision = "bf16-mixed" if t.precision == "bf16" else "32-true"
    # under torchrun on several machines, Fabric checks devices x num_nodes against the processes torchrun started
    num_nodes = shard.nodes() if _under_torchrun() else 1
    return Fabric(accelerator=accelerator, devices=t.devices, num_nodes=num_nodes, strategy=strategy,
                  precision=precision)


@dataclass
class LoopSettings:
    """The optimisation schedule of one training job (the classifier takes it from ``train``, the segmentation
    network from ``seg.train``); devices, precision, memory format and progress always come from ``runtime``."""

    epochs: int
    batch_size: int
    lr: float
    head_lr_mult: float
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9


class TrainTask:
    """What a training job supplies to the shared loop. Subclasses are plain objects (picklable for ``ddp_spawn``;
    Fabric's launcher refuses frozen dataclass arguments)."""

    name = "task"

    def __init__(self, cfg: Config, settings: LoopSettings, meta: dict):
        self.cfg, self.settings, self.meta = cfg, settings, meta

    def prepare(self) -> None:
        """Work done once, in the process that launches the training, before any training process starts (e.g.
        computing per-image inputs that every epoch reads). Default: nothing."""

    def build_model(self) -> torch.nn.Module:  # must offer .param_groups(lr, head_lr_mult)
        raise NotImplementedError

    def dataset(self) -> torch.utils.data.Dataset:  # items are (index, seed) pairs
        raise NotImplementedError

    def transform_batch(self, batch: dict, generator: torch.Generator) -> dict:
        return batch

    def loss(self, out: dict, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError


class ClassifierTask(TrainTask):
    """The classifier of ``cfg.method`` on images and image-level labels."""

    def __init__(self, cfg: Config, samples: list[Sample], spec: DatasetSpec):
        t = cfg.train
        super().__init__(cfg, LoopSettings(t.epochs, t.batch_size, t.lr, t.head_lr_mult, t.momentum, t.weight_decay,
                                           t.poly_power), model_meta(cfg, spec))
        self.samples, self.spec = samples, spec
        self.name = cfg.method.name
        self.method = build_method(cfg.method.name, cfg.method.options, has_background=spec.background is not None)
        self.saliency: StoredSaliency | None = None

    def prepare(self) -> None:
        """A method that learns from saliency (:attr:`~wsss.methods.Method.uses_saliency`): the ``saliency`` source's
        map of every training image, computed once here (a model source stores them in the saliency cache; under
        torchrun each process computes its share), so that no epoch computes one again."""
        if not self.method.uses_saliency or self.saliency is not None:
            return
        source = build_source(self.cfg.saliency)
        source.precompute(shard.shard(self.samples), progress=self.cfg.runtime.progress)
        shard.barrier()
        self.saliency = StoredSaliency(source)

    def build_model(self):
        return self.method.build_model(self.cfg.model, self.spec.num_fg)

    def dataset(self):
        t = self.cfg.train
        self.prepare()  # already done by fit() in the launching process; here for a task used without fit()
        return ClassificationDataset(self.samples, self.spec,
                                     TrainTransform(t.crop_size, t.scale_range, t.hflip, self.spec.ignore_index),
                                     saliency=self.saliency)

    def transform_batch(self, batch, generator):
        return self.method.transform_batch(batch, generator)

    def loss(self, out, batch):
        return self.method.loss(out, batch)


def fit_classifier(cfg: Config, samples: list[Sample], spec: DatasetSpec, out_dir: Path,
                   after_epoch: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) the classifier of ``cfg.method`` on ``samples``; writes ``out_dir/model.pt``."""
    return fit(ClassifierTask(cfg, samples, spec), out_dir, after_epoch)


def fit(task: TrainTask, out_dir: Path, after_epoch: Callable[[int], None] | None = None) -> dict:
    """Train (or resume) ``task``; writes ``out_dir/last.ckpt`` every epoch and ``out_dir/model.pt`` at the end."""
    task.prepare()
    fabric = make_fabric(task.cfg)
    if task.cfg.runtime.devices > 1 and not _under_torchrun():
        with _logging_of_spawned_processes() as logs:
            return fabric.launch(_fit, task, Path(out_dir), after_epoch, logs)
    return fabric.launch(_fit, task, Path(out_dir), after_epoch)


class _HandleHere(logging.Handler):
    """Hands a record to this process's logger of the same name, as if it had been logged here."""

    def handle(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)
        return True


@contextmanager
def _logging_of_spawned_processes() -> Iterator[tuple[multiprocessing.Queue, int]]:
    """Processes started by ``ddp_spawn`` import wsss afresh and have no logging handlers, so their records would be
    dropped: they send them here instead (see :func:`_send_logs_to`), where this process's handlers (the CLI's
    stderr, a test's caplog) take them."""
    queue = multiprocessing.get_context("spawn").Queue()
    listener = logging.handlers.QueueListener(queue, _HandleHere())
    listener.start()
    try:
        yield queue, logging.getLogger("wsss").getEffectiveLevel()
    finally:
        listener.stop()


def _send_logs_to(logs: tuple[multiprocessing.Queue, int]) -> None:
    queue, level = logs
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)]
    root.setLevel(level)


def _epoch_seed(seed: int, epoch: int, rank: int, purpose: str) -> int:
    """A seed that depends only on its arguments (never on what ran before in the process)."""
    words = [seed % 2**64, epoch, rank, *purpose.encode()]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0] >> 1)


def _poly(it: int, total: int, power: float) -> float:
    return (1 - it / max(total, 1)) ** power if power > 0 else 1.0


def _fit(fabric: Fabric, task: TrainTask, out_dir: Path, after_epoch: Callable[[int], None] | None,
         logs: tuple[multiprocessing.Queue, int] | None = None) -> dict:
    if logs is not None:
        _send_logs_to(logs)
    cfg, t, st = task.cfg, task.cfg.runtime, task.settings
    world, rank = fabric.world_size, fabric.global_rank
    if fabric.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fabric.seed_everything(cfg.seed, verbose=False)
    model = task.build_model()
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.param_groups(st.lr, st.head_lr_mult), lr=st.lr, momentum=st.momentum,
                                weight_decay=st.weight_decay)
    meta = task.meta
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

    dataset = task.dataset()
    sampler = SeededSampler(len(dataset), cfg.seed, rank, world)
    per_process = max(1, st.batch_size // world)
    # Not fabric.setup_dataloaders: its wrapper calls sampler.set_epoch(<how often it was iterated>) on every
    # iteration, which restarts at 0 in a resumed process and replayed epoch 1's batches in epoch 2. Workers are not
    # persistent so that each epoch's workers are seeded from `worker_seeds`, a function of (seed, epoch, rank).
    worker_seeds = torch.Generator()
    loader = DataLoader(dataset, batch_size=per_process, sampler=sampler, num_workers=loader_workers(cfg.data.workers),
                        generator=worker_seeds, drop_last=len(sampler) >= per_process)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * st.epochs
    generator = torch.Generator()

    for epoch in range(start_epoch, st.epochs):
        sampler.set_epoch(epoch)
        generator.manual_seed(cfg.seed * 7919 + epoch)
        worker_seeds.manual_seed(_epoch_seed(cfg.seed, epoch, rank, "loader workers"))
        # dropout and anything else on the global RNG: a resumed epoch must draw what the uninterrupted one drew
        torch.manual_seed(_epoch_seed(cfg.seed, epoch, rank, "global"))
        model.train()
        t0 = time.perf_counter()
        loss_sum, seen, parts_sum = torch.zeros(()), 0, {}
        bar = tqdm(loader, desc=f"train {task.name} epoch {epoch + 1}/{st.epochs}", leave=False,
                   disable=not t.progress or rank != 0, mininterval=1.0)
        for step, batch in enumerate(bar):
            batch = fabric.to_device(batch)
            it = epoch * steps_per_epoch + step
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * _poly(it, total, st.poly_power)
            batch = task.transform_batch(batch, generator)
            x = batch["image"]
            if t.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            loss, parts = task.loss(out, batch)
            optimizer.zero_grad(set_to_none=True)
            fabric.backward(loss)
            optimizer.step()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"training loss became {float(loss.detach())} at epoch {epoch + 1}, step {step}; "
                                         "lower the learning rate or use runtime.precision=fp32")
            n = x.shape[0]
            loss_sum += loss.detach().float().cpu() * n
            seen += n
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0.0) + v * n
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        # every process's images count in the epoch's means; a task logs the same parts on every process
        names = sorted(parts_sum)
        stats = fabric.all_reduce(torch.tensor([float(loss_sum), float(seen), *(parts_sum[k] for k in names)],
                                               dtype=torch.float64, device=fabric.device), reduce_op="sum").cpu()
        images = max(float(stats[1]), 1.0)
        elapsed = time.perf_counter() - t0
        record = {
            "epoch": epoch + 1,
            "loss": float(stats[0]) / images,
            **{k: float(v) / images for k, v in zip(names, stats[2:])},
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(elapsed, 2),
            "images_per_s": round(float(stats[1]) / elapsed, 2),
        }
        history.append(record)
        if rank == 0:
            log.info("%s epoch %d/%d loss %.4f (%.1f s, %.1f img/s)", task.name, epoch + 1, st.epochs, record["loss"],
                     elapsed,
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
    return {"history": history, "world_size": world, "images": len(dataset)}
